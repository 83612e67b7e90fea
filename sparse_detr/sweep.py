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
`<sweep dir>/sweep_runs.json`, which `status` reads to list runs that have not started yet.

`status` states: `pending` (not started), `running`, `requeued` (signalled and waiting to run
again), `done`, `failed`, `stopped` (not running, not finished: start the sweep again to resume it).
For SLURM jobs the state comes from `sacct`; otherwise from the run folder's files.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import pickletools
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sparse_detr import naming  # noqa: F401  (registers ${sparse_detr.variant:}, which run folders use)

try:  # Hydra is a dependency; the callback base class is only needed when Hydra instantiates it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object

MANIFEST_NAME = "sweep_runs.json"
SUBMITIT_DIR = ".submitit"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# what conf/train.yaml selects (hydra/sweeper=distinct_runs): the basic sweeper, each distinct run launched once
DISTINCT_RUNS_SWEEPER = "hydra_plugins.sparse_detr_sweeper.distinct_runs_sweeper.DistinctRunsSweeper"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
EXIT_INVALID = 2
ACTIVE_WINDOW_S = 600   # files touched this recently: the run is taken to be running

# sacct states, grouped by what `status` shows
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"}
SLURM_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


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
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sparse_detr.tracking import looks_secret

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
        from sparse_detr.config import ConfigError, validate

        refuse_secrets(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        try:
            with hydra_config_of(config):
                validate(job_config(config))
        except ConfigError as error:
            fail(f"invalid configuration: {error}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from sparse_detr.config import ConfigError, validate

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
                with hydra_config_of(sweep_config):
                    validate(job_config(sweep_config))
                run_dirs.append(run_dir_of(sweep_config))
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


def write_manifest(sweep_dir: Path, runs: list[dict], launcher: str, cluster: str) -> Path:
    """Add this launch's runs to `<sweep dir>/sweep_runs.json` (a relaunch updates its entries)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / MANIFEST_NAME
    entries = {r["run_dir"]: r for r in read_manifest(sweep_dir)}
    launched_at = time.time()
    for run in runs:
        run_dir = Path(run["run_dir"])
        relative = os.path.relpath(run_dir, sweep_dir) if run_dir.is_relative_to(sweep_dir) else str(run_dir)
        entries[relative] = {**run, "run_dir": relative, "launcher": launcher, "cluster": cluster,
                             "launched_at": launched_at, "launch_size": len(runs)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"runs": list(entries.values())}, indent=1))
    tmp.replace(path)
    return path


def read_manifest(sweep_dir: Path) -> list[dict]:
    try:
        return list(json.loads((sweep_dir / MANIFEST_NAME).read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ---------------------------------------------------------------------------------------------
# the sbatch script of a cluster profile

def compose_with_hydra(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The config with its `hydra` node, as the launcher sees it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sparse_detr.config import config_dir

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
# the state of every run

@dataclass
class RunStatus:
    run: str                          # run folder, relative to the sweep folder
    state: str                        # pending running requeued done failed stopped
    job: str = ""                     # SLURM (or submitit) job id
    epoch: Optional[int] = None       # epochs completed
    epochs: Optional[int] = None      # epochs configured
    step: Optional[int] = None        # optimizer steps completed
    ap: Optional[float] = None        # COCO AP of the latest evaluation
    ap_epoch: Optional[int] = None
    requeues: int = 0
    scheduler: str = ""               # the scheduler's own state word
    updated: Optional[float] = None   # newest file time in the run folder


def _load_yaml(path: Path) -> Optional[DictConfig]:
    try:
        return OmegaConf.load(path)
    except Exception:
        return None


def read_checkpoint_state(path: Path) -> Optional[dict]:
    """`state` of a training checkpoint (epoch, global_step, ...) without reading its tensors."""
    if not path.is_file():
        return None
    try:
        import torch

        return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"])
    except Exception:  # being replaced right now, or not a checkpoint
        return None


def read_eval_metrics(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_metrics_position(path: Path) -> tuple[Optional[int], Optional[int]]:
    """(epochs, step) from `metrics.jsonl` when there is no checkpoint to read."""
    epoch = step = None
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "global_step" in row:
                    step = max(step or 0, int(row["global_step"]))
                if "epoch" in row and any(k.startswith("train-epoch") for k in row):
                    epoch = max(epoch or 0, int(row["epoch"]) + 1)
    except OSError:
        pass
    return epoch, step


def discover_run_dirs(sweep_dir: Path) -> list[Path]:
    """Folders of the sweep that Hydra or the trainer wrote a run into."""
    found = set()
    for marker in ("config.yaml", ".hydra"):
        for path in sweep_dir.rglob(marker):
            if SUBMITIT_DIR in path.parts or path.parent.name == ".hydra":
                continue
            found.add(path.parent)
    return sorted(found)


def run_dir_from_hydra(folder: Path) -> Path:
    """A run started with `output_dir=` writes there, not into its Hydra folder."""
    cfg = _load_yaml(folder / ".hydra" / "config.yaml")
    output_dir = OmegaConf.select(cfg, "output_dir") if cfg is not None else None
    return Path(output_dir).absolute() if output_dir else folder


def hydra_job_id(folder: Path) -> str:
    """The job id the latest start of this run had (the submitit launcher writes it)."""
    cfg = _load_yaml(folder / ".hydra" / "hydra.yaml")
    value = OmegaConf.select(cfg, "hydra.job.id", default=None) if cfg is not None else None
    return str(value) if value not in (None, "???") and re.fullmatch(r"\d+(_\d+)?", str(value)) else ""


def submitit_jobs(sweep_dir: Path) -> dict[str, Path]:
    """submitit's job folders of the sweep: job id -> folder."""
    root = sweep_dir / SUBMITIT_DIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)}


SUBMITIT_OUTCOMES = ("success", "error")
STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def submitit_result(folder: Path, job_id: str) -> str:
    """'success' or 'error' when the job has written its result, else ''.

    submitit writes `("success", value)` or `("error", traceback)`. The file is never unpickled
    (unpickling runs whatever code a crafted file names): the outcome is the first string the
    pickle pushes, read from its opcodes by `pickletools.genops`, which decodes and executes nothing.
    """
    path = folder / f"{job_id}_0_result.pkl"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
        for opcode, argument, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name in ("PROTO", "FRAME"):
                continue
            return argument if opcode.name in STRING_OPCODES and argument in SUBMITIT_OUTCOMES else ""
    except (OSError, ValueError):  # absent, unreadable, or not a pickle
        pass
    return ""


def sacct_states(job_ids: Sequence[str]) -> Optional[dict[str, list[str]]]:
    """job id -> the states of each of its runs, oldest first (REQUEUED for each requeue);
    None when sacct is not there or does not answer."""
    if not job_ids or shutil.which("sacct") is None:
        return None
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-o", "JobID,State",
                              "-j", ",".join(sorted(set(job_ids)))],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    states: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            states.setdefault(parts[0], []).append(parts[1].split()[0] if parts[1] else "")
    return states


def _array_id(job_id: str) -> int:
    return int(job_id.split("_")[0])


def _pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
        return True
    except (ValueError, OSError):
        return False


def newest_mtime(run_dir: Path) -> Optional[float]:
    times = []
    for name in ("metrics.jsonl", "checkpoint.pth", "eval_metrics.json", "config.yaml"):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times) if times else None


def decide_state(*, started: bool, finished: bool, scheduler: list[str], result: str,
                 local_alive: Optional[bool], updated: Optional[float], now: float) -> str:
    """One word per run; the scheduler's word wins when there is one."""
    if scheduler:
        current, requeued = scheduler[-1], "REQUEUED" in scheduler[:-1] or scheduler[-1].startswith("REQUEUE")
        if current in SLURM_RUNNING:
            return "running"
        if current in SLURM_WAITING:
            return "requeued" if requeued else "pending"
        if current == "COMPLETED":
            return "done"
        if current in SLURM_FAILED:
            return "failed"
    if result == "error":
        return "failed"
    if finished or result == "success":
        return "done"
    if local_alive:
        return "running"
    if not started:
        return "pending" if local_alive is None else "stopped"
    if updated is not None and now - updated < ACTIVE_WINDOW_S:
        return "running"
    return "stopped"


def sweep_status(sweep_dir: str | Path, use_sacct: bool = True, notes: Optional[list[str]] = None) -> list[RunStatus]:
    """The state, progress and latest AP of every run of the sweep in `sweep_dir`; remarks on how
    the states were found are appended to `notes`."""
    notes = [] if notes is None else notes
    sweep_dir = Path(sweep_dir).absolute()
    manifest = read_manifest(sweep_dir)
    runs: dict[Path, dict] = {}
    for entry in manifest:
        path = Path(entry["run_dir"])
        runs[(sweep_dir / path).absolute() if not path.is_absolute() else path] = entry
    for folder in discover_run_dirs(sweep_dir):
        runs.setdefault(run_dir_from_hydra(folder), {}).setdefault("hydra_dir", str(folder))

    jobs = submitit_jobs(sweep_dir)
    job_of: dict[Path, str] = {}
    for run_dir, entry in runs.items():
        job = hydra_job_id(Path(entry.get("hydra_dir", run_dir)))
        job = job if job in jobs else ""  # the basic launcher numbers its runs 0, 1, ...: no job
        if "array_index" in entry and "launched_at" in entry:
            # The array task of this run in the latest launch that covered it, which also finds
            # runs that have not started. (A launch of one run is a plain job, not an array.)
            single = entry.get("launch_size") == 1
            candidates = [(folder.stat().st_mtime, jid) for jid, folder in jobs.items()
                          if (jid.endswith(f"_{entry['array_index']}") or (single and "_" not in jid))
                          and folder.stat().st_mtime >= entry["launched_at"] - 5]
            if candidates and (not job or _array_id(max(candidates)[1]) >= _array_id(job)):
                job = max(candidates)[1]
        job_of[run_dir] = job

    slurm_ids = [j for r, j in job_of.items() if j and runs[r].get("launcher", "submitit_slurm") != "submitit_local"]
    scheduler = sacct_states(slurm_ids) if use_sacct else None
    if slurm_ids and use_sacct and scheduler is None:
        notes.append("sacct did not answer: states of SLURM runs are judged from their folders")

    now, statuses = time.time(), []
    for run_dir, entry in sorted(runs.items(), key=lambda item: str(item[0])):
        job = job_of[run_dir]
        cfg = _load_yaml(run_dir / "config.yaml")
        epochs = OmegaConf.select(cfg, "schedule.epochs") if cfg is not None else None
        max_steps = OmegaConf.select(cfg, "train.max_steps") if cfg is not None else None
        state = read_checkpoint_state(run_dir / "checkpoint.pth")
        epoch, step = (state.get("epoch"), state.get("global_step")) if state else last_metrics_position(run_dir / "metrics.jsonl")
        metrics = read_eval_metrics(run_dir / "eval_metrics.json")
        finished = bool(metrics) and (
            (epochs is not None and metrics.get("epoch") == epochs)
            or (max_steps is not None and (metrics.get("global_step") or 0) >= max_steps))
        launcher = entry.get("launcher", "")
        local = launcher == "submitit_local"
        updated = newest_mtime(run_dir)
        statuses.append(RunStatus(
            run=os.path.relpath(run_dir, sweep_dir) if run_dir.is_relative_to(sweep_dir) else str(run_dir),
            state=decide_state(
                started=updated is not None, finished=finished,
                scheduler=(scheduler or {}).get(job, []) if not local else [],
                result=submitit_result(jobs[job], job) if job in jobs else "",
                local_alive=_pid_alive(job) if local and job else None,
                updated=updated, now=now),
            job=job, epoch=epoch, epochs=epochs, step=step,
            ap=metrics.get("AP") if metrics else None, ap_epoch=metrics.get("epoch") if metrics else None,
            requeues=(scheduler or {}).get(job, []).count("REQUEUED"),
            scheduler=((scheduler or {}).get(job) or [""])[-1], updated=updated))
    return statuses


def _age(seconds: Optional[float], now: float) -> str:
    if seconds is None:
        return "-"
    age = max(0.0, now - seconds)
    return f"{age:.0f}s ago" if age < 120 else f"{age / 60:.0f}m ago" if age < 7200 else f"{age / 3600:.1f}h ago"


def format_table(statuses: Sequence[RunStatus], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    header = ("run", "state", "job", "epoch", "step", "AP", "updated")
    rows = []
    for s in statuses:
        state = s.state + (f" ({s.requeues}x requeued)" if s.requeues and s.state != "requeued" else "")
        epoch = "-" if s.epoch is None else f"{s.epoch}/{s.epochs}" if s.epochs else str(s.epoch)
        ap = "-" if s.ap is None else f"{s.ap:.4f}" + (f" @{s.ap_epoch}" if s.ap_epoch is not None else "")
        rows.append((s.run, state, s.job or "-", epoch, "-" if s.step is None else str(s.step), ap, _age(s.updated, now)))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    order = ["done", "running", "requeued", "pending", "failed", "stopped"]
    summary = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
    lines.append(f"{len(statuses)} runs: {summary or 'none found'}")
    return "\n".join(lines)


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
