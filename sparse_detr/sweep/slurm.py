"""What the sweep knows of SLURM: the sbatch script a cluster profile submits (built by submitit,
without SLURM installed here) and, for `status`, the jobs' states from sacct and submitit's files.

Nothing read here is ever executed: submitit's result pickles are read as opcodes.
"""
from __future__ import annotations

import io
import os
import pickletools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import submitit
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf
from submitit.slurm import slurm
from submitit.slurm.slurm import _make_sbatch_string

from sparse_detr.sweep.compose import compose_with_hydra, hydra_config_of

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"

SUBMITIT_DIR = ".submitit"

# sacct states, grouped by what `status` shows
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"}
SLURM_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def submitit_executor(config: DictConfig):
    """The submitit executor that hydra-submitit-launcher 1.2.0's `launch()` builds from
    `hydra.launcher`, made without SLURM being installed here."""
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
    executor = submitit_executor(compose_with_hydra(overrides))._executor
    parameters = dict(executor.parameters)
    if num_jobs > 1:
        parameters["map_count"] = num_jobs
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **parameters)


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


def array_id(job_id: str) -> int:
    return int(job_id.split("_")[0])


def pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
        return True
    except (ValueError, OSError):
        return False
