"""Sweeps: check every run before anything is launched, and `sparse-detr-sweep`, to follow them.

    sparse-detr-sweep status outputs/sweeps/smoke            # one line per run: state, epoch, AP
    sparse-detr-sweep status outputs/sweeps/smoke --watch 30 # the same, every 30 s
    sparse-detr-sweep sbatch cluster=berzelius               # the sbatch script a profile submits

`ValidateSweep` is a Hydra callback (registered in conf/train.yaml). A single run is validated
before Hydra makes its folder. Before the launcher starts or submits anything, it composes every
run of a `-m` sweep the way the launcher will, validates it, and checks that the launcher's
settings resolve (e.g. `$SPARSE_DETR_ACCOUNT`); on any error it names the run and the bad value
and exits with status 2. A key that looks like a secret stops either, naming the key only. Jobs
that get the same run folder are the same run: it names them, and the sweeper conf/train.yaml
selects (hydra_plugins/sparse_detr_sweeper) launches each once. It then records the launched runs in
`<sweep dir>/sweep_runs.json`, which `status` (sparse_detr/sweep_status.py) reads to list runs
that have not started yet.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sparse_detr import naming  # noqa: F401  (registers ${sparse_detr.variant:}, which run folders use)
from sparse_detr.config import ConfigError, config_dir, validate_run
from sparse_detr.tracking import looks_secret
from sparse_detr.errors import EXIT_USER_ERROR as EXIT_INVALID
from sparse_detr.sweep_status import format_table, sweep_status, write_manifest

try:  # Hydra is a dependency; the callback base class is only needed when Hydra instantiates it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# what conf/train.yaml selects (hydra/sweeper=distinct_runs): the basic sweeper, each distinct run launched once
DISTINCT_RUNS_SWEEPER = "hydra_plugins.sparse_detr_sweeper.distinct_runs_sweeper.DistinctRunsSweeper"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


# ---------------------------------------------------------------------------------------------
# composing the runs of a sweep

@contextlib.contextmanager
def hydra_config_of(cfg: DictConfig) -> Iterator[None]:
    """Make `${hydra:...}` resolve against `cfg` for a while (the sweep dir and subdir use it)."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    previous, readonly = instance.cfg, OmegaConf.is_readonly(cfg.hydra)
    instance.set_config(cfg)  # (makes cfg.hydra read-only)
    try:
        yield
    finally:
        instance.cfg = previous
        OmegaConf.set_readonly(cfg.hydra, readonly)


def sweep_overrides(config: DictConfig, config_loader) -> Optional[list[list[str]]]:
    """The override list of every run of the sweep, as Hydra's basic sweeper expands it
    (`hydra.sweeper.params` and the command line); None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = config.hydra.sweeper
    if OmegaConf.select(sweeper, "_target_") not in (BASIC_SWEEPER, DISTINCT_RUNS_SWEEPER):
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=config_loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + list(task)), sweeper.max_batch_size)
    return [list(job) for batch in batches for job in batch]


def job_config(sweep_config: DictConfig) -> DictConfig:
    """What the task function gets: the composed config without its `hydra` node."""
    task = copy.deepcopy(sweep_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def run_dir_of(sweep_config: DictConfig) -> Path:
    """The run folder of one run of a sweep (`output_dir`, else hydra.sweep.dir/subdir)."""
    with hydra_config_of(sweep_config):
        if sweep_config.get("output_dir"):
            return Path(str(sweep_config.output_dir)).absolute()
        return (Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)).absolute()


def _message(error: BaseException) -> str:
    """Hydra wraps some errors in an exception without a message of its own."""
    while not str(error) and error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INVALID)


def refuse_secrets(overrides: Sequence[str]) -> None:
    """A value given on the command line is saved in the run folder (`.hydra/`, `command.txt`) and
    recorded by W&B: a key that looks like a secret stops the run before anything is written.
    The message names the key, never the value."""
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if looks_secret(override.key_or_group):
            fail(f"{override.key_or_group} looks like a secret; command-line values are saved in the run folder "
                 "(.hydra/, command.txt) and by W&B, so pass it in the environment instead "
                 "(W&B reads WANDB_API_KEY); nothing was started")


def run_dirs_of_jobs(config: DictConfig, loader, jobs: Sequence[Sequence[str]]) -> list[Path]:
    """The run folder each job of a sweep writes into (jobs that name the same model share one)."""
    return [run_dir_of(loader.load_sweep_config(config, list(overrides))) for overrides in jobs]


def distinct_jobs(jobs: Sequence[Sequence[str]], run_dirs: Sequence[Path]) -> tuple[list[int], dict[int, int]]:
    """(indices of the jobs to launch: the first for each run folder, {duplicate index: the index it repeats})."""
    first: dict[Path, int] = {}
    kept, duplicates = [], {}
    for num, run_dir in enumerate(run_dirs):
        if run_dir in first:
            duplicates[num] = first[run_dir]
        else:
            first[run_dir] = num
            kept.append(num)
    return kept, duplicates


def _describe(num: int, overrides: Sequence[str]) -> str:
    return f"#{num} ({' '.join(overrides) or 'no overrides'})"


class ValidateSweep(Callback):
    """Hydra callback: validate a run before Hydra makes its folder, and every run of a -m sweep
    before the launcher launches or submits anything."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_secrets(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        try:
            with hydra_config_of(config):
                task = job_config(config)
                validate_run(task, task.output_dir or config.hydra.run.dir)
        except ConfigError as error:
            fail(f"invalid configuration: {error}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        refuse_secrets(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        loader = GlobalHydra.instance().config_loader()
        try:
            jobs = sweep_overrides(config, loader)
        except Exception as error:  # a malformed sweep value: Hydra would stop on it too
            fail(f"cannot expand the sweep: {_message(error)}")
        if jobs is None:
            print("warning: not the basic sweeper: runs are validated as they start", file=sys.stderr)
            return
        self._check_launcher(config)
        run_dirs = []
        for num, overrides in enumerate(jobs):
            where = f"sweep run {_describe(num, overrides)}"
            try:
                sweep_config = loader.load_sweep_config(config, list(overrides))
                run_dirs.append(run_dir_of(sweep_config))
                with hydra_config_of(sweep_config):
                    validate_run(job_config(sweep_config), run_dirs[-1])
            except ConfigError as error:
                fail(f"invalid configuration: {error}\n  in {where}; nothing was launched")
            except Exception as error:  # a misspelt group option, a wrong type: Hydra's message
                fail(f"invalid configuration in {where}; nothing was launched:\n{_message(error)}")
        kept, duplicates = distinct_jobs(jobs, run_dirs)
        if config.hydra.sweeper._target_ != DISTINCT_RUNS_SWEEPER:  # hydra/sweeper=basic launches every job
            kept, once = list(range(len(jobs))), "launched again into the same folder (hydra/sweeper=basic)"
        else:
            once = "launched once"
        with hydra_config_of(config):
            sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        for num, same in duplicates.items():
            print(f"sweep: run {_describe(num, jobs[num])} is the same model as run {_describe(same, jobs[same])} "
                  f"({os.path.relpath(run_dirs[num], sweep_dir)}): {once}", file=sys.stderr)
        # One batch (the default) is one job array: launched run i is array task i. With
        # hydra.sweeper.max_batch_size each batch is an array of its own, submitted after the last.
        one_array = config.hydra.sweeper.get("max_batch_size") in (None, -1)
        runs = [{"job_num": position, "overrides": list(jobs[num]), "run_dir": str(run_dirs[num]),
                 **({"array_index": position} if one_array else {})} for position, num in enumerate(kept)]
        choices = config.hydra.runtime.choices
        write_manifest(sweep_dir, runs, launcher=str(choices.get("hydra/launcher")),
                       cluster=str(choices.get("cluster", "")))
        print(f"sweep: {len(runs)} runs validated; follow them with: sparse-detr-sweep status {sweep_dir}",
              file=sys.stderr, flush=True)

    @staticmethod
    def _check_launcher(config: DictConfig) -> None:
        """The launcher's settings must resolve here, before submission (env vars, interpolations)."""
        with hydra_config_of(config):
            try:
                OmegaConf.to_container(config.hydra.launcher, resolve=True)
            except Exception as error:
                hint = ""
                match = re.search(r"Environment variable '([^']+)' not found", str(error))
                key = re.search(r"full_key: (\S+)", str(error))
                if match:
                    hint = (f"\n  set {match.group(1)} in the environment"
                            + (f", or pass {key.group(1)}=<value>" if key else ""))
                choice = config.hydra.runtime.choices.get("cluster")
                fail(f"the launcher settings of cluster={choice} do not resolve: {error}{hint}\n  nothing was submitted")


# ---------------------------------------------------------------------------------------------
# the sbatch script of a cluster profile

def compose_with_hydra(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The config with its `hydra` node, as the launcher sees it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # The job name the entry point has (`sparse-detr-train` runs the `train` module).
    overrides = [f"hydra.job.name={config_name}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def submitit_executor(config: DictConfig):
    """The submitit executor that hydra-submitit-launcher 1.2.0's `launch()` builds from
    `hydra.launcher`, made without SLURM being installed here."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm import slurm

    with hydra_config_of(config):
        params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    target = params.pop("_target_", "")
    if target != SLURM_LAUNCHER:
        choice = config.hydra.runtime.choices.get("cluster")
        raise ValueError(f"cluster={choice} does not submit to SLURM (hydra.launcher is {target or 'basic'})")
    # As in BaseSubmititLauncher.launch():
    init_keys = {"max_num_timeout", "submitit_folder"}
    init_params = {"folder": params["submitit_folder"], "slurm_max_num_timeout": params["max_num_timeout"]}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys}
    original = slurm.SlurmExecutor.affinity
    slurm.SlurmExecutor.affinity = classmethod(lambda cls: 1)  # "is srun here?": not needed to write a script
    try:
        executor = submitit.AutoExecutor(cluster="slurm", **init_params)
    finally:
        slurm.SlurmExecutor.affinity = original
    executor.update_parameters(**params)
    return executor


def sbatch_script(overrides: Sequence[str], num_jobs: int = 1) -> str:
    """The sbatch script that `sparse-detr-train -m <overrides>` submits (a job array for
    num_jobs > 1), without submitting anything."""
    from submitit.slurm.slurm import _make_sbatch_string

    executor = submitit_executor(compose_with_hydra(overrides))._executor
    parameters = dict(executor.parameters)
    if num_jobs > 1:
        parameters["map_count"] = num_jobs
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **parameters)


# ---------------------------------------------------------------------------------------------
# the command

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-detr-sweep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="every run of a sweep: state, epoch, step, latest AP")
    status.add_argument("sweep_dir", help="the sweep folder, e.g. outputs/sweeps/<experiment>")
    status.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    status.add_argument("--no-sacct", action="store_true", help="judge from the run folders only")
    sbatch = commands.add_parser("sbatch", help="print the sbatch script a cluster profile submits (nothing is submitted)")
    sbatch.add_argument("overrides", nargs="*", help="config overrides, e.g. cluster=berzelius hydra.launcher.nodes=2")
    sbatch.add_argument("--jobs", type=int, default=1, help="number of runs (a job array above 1)")
    args = parser.parse_args(argv)

    if args.command == "sbatch":
        try:
            print(sbatch_script(args.overrides, args.jobs))
        except Exception as error:
            print(f"error: {_message(error)}", file=sys.stderr)
            return EXIT_INVALID
        return 0

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: no sweep folder {str(sweep_dir)!r}", file=sys.stderr)
        return EXIT_INVALID
    while True:
        notes: list[str] = []
        statuses = sweep_status(sweep_dir, use_sacct=not args.no_sacct, notes=notes)
        if args.json:
            output = "\n".join(json.dumps(asdict(s)) for s in statuses)
        else:
            output = "\n".join([str(sweep_dir.absolute()), format_table(statuses), *(f"note: {n}" for n in notes)])
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + output, flush=True)
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0
            continue
        print(output)
        return 0


if __name__ == "__main__":
    sys.exit(main())
