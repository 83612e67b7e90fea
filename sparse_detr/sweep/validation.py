"""`ValidateSweep`, the Hydra callback conf/train.yaml registers: check every run before anything starts.

A single run is validated before Hydra makes its folder. Before the launcher starts or submits
anything, it composes every run of a `-m` sweep the way the launcher will, validates it, and
checks that the launcher's settings resolve (e.g. `$SPARSE_DETR_ACCOUNT`); on any error it names
the run and the bad value and exits with status 2. A key that looks like a secret stops either,
naming the key only. Jobs that get the same run folder are the same run: it names them, and the
sweeper conf/train.yaml selects (hydra_plugins/sparse_detr_sweeper) launches each once. It then
records the launched runs in the sweep's manifest (`manifest.py`).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sparse_detr.config import ConfigError, hydra_message, validate_run
from sparse_detr.errors import EXIT_USER_ERROR as EXIT_INVALID
from sparse_detr.final_analysis import check_analysis
from sparse_detr.sweep.compose import (DISTINCT_RUNS_SWEEPER, distinct_jobs, hydra_config_of, job_config,
                                       run_dir_of, run_is_finished, sweep_overrides)
from sparse_detr.sweep.manifest import write_manifest
from sparse_detr.tracking import looks_secret

try:  # Hydra is a dependency; the callback base class is only needed when Hydra instantiates it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


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
                run_dir = task.output_dir or config.hydra.run.dir
                check_analysis(validate_run(task, run_dir), run_dir)
        except ConfigError as error:
            fail(f"invalid configuration: {error}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_secrets(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        loader = GlobalHydra.instance().config_loader()
        try:
            jobs = sweep_overrides(config, loader)
        except Exception as error:  # a malformed sweep value: Hydra would stop on it too
            fail(f"cannot expand the sweep: {hydra_message(error)}")
        if jobs is None:
            print("warning: not the basic sweeper: runs are validated as they start", file=sys.stderr)
            return
        self._check_launcher(config)
        run_dirs, finished = [], []
        skip_finished = bool(config.hydra.sweeper.get("skip_finished"))
        for num, overrides in enumerate(jobs):
            where = f"sweep run {_describe(num, overrides)}"
            try:
                sweep_config = loader.load_sweep_config(config, list(overrides))
                run_dirs.append(run_dir_of(sweep_config))
                with hydra_config_of(sweep_config):
                    task = job_config(sweep_config)
                    check_analysis(validate_run(task, run_dirs[-1]), run_dirs[-1])
                finished.append(skip_finished and run_is_finished(task, run_dirs[-1]))
            except ConfigError as error:
                fail(f"invalid configuration: {error}\n  in {where}; nothing was launched")
            except Exception as error:  # a misspelt group option, a wrong type: Hydra's message
                fail(f"invalid configuration in {where}; nothing was launched:\n{hydra_message(error)}")
        kept, duplicates = distinct_jobs(jobs, run_dirs, finished)
        if config.hydra.sweeper._target_ != DISTINCT_RUNS_SWEEPER:  # hydra/sweeper=basic launches every job
            kept, once = list(range(len(jobs))), "launched again into the same folder (hydra/sweeper=basic)"
        else:
            once = "launched once"
        with hydra_config_of(config):
            sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        for num, same in duplicates.items():
            print(f"sweep: run {_describe(num, jobs[num])} is the same model as run {_describe(same, jobs[same])} "
                  f"({os.path.relpath(run_dirs[num], sweep_dir)}): {once}", file=sys.stderr)
        for num in (n for n in range(len(jobs)) if finished[n] and n not in duplicates):
            print(f"sweep: run {_describe(num, jobs[num])} is finished ({os.path.relpath(run_dirs[num], sweep_dir)}): "
                  "not launched again", file=sys.stderr)
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
