"""`sparse-detr-sweep status`: the state, progress and latest AP of every run of a sweep.

States: `pending` (not started), `running`, `requeued` (signalled and waiting to run again),
`done`, `failed`, `stopped` (not running, not finished: start the sweep again to resume it).
For SLURM jobs the state comes from `sacct`; otherwise from the run folder's files, read through
`sparse_detr.run_folder`. Nothing read here is ever executed: checkpoints are read with
`weights_only`. The runs not started yet come from the sweep's manifest (`manifest.py`).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from sparse_detr.run_folder import (CONFIG_NAME, EPOCH_METRIC, STEP_METRIC, checkpoint_path, newest_mtime,
                                    read_checkpoint_state, read_config, read_eval_metrics, read_metrics_log,
                                    training_finished)
from sparse_detr.sweep.manifest import read_manifest
from sparse_detr.sweep.slurm import (SLURM_FAILED, SLURM_RUNNING, SLURM_WAITING, SUBMITIT_DIR, array_id, pid_alive,
                                     sacct_states, submitit_jobs, submitit_result)
from sparse_detr.tracking import TRAIN_EPOCH_MAIN

ACTIVE_WINDOW_S = 600   # files touched this recently: the run is taken to be running


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


def last_metrics_position(run_dir: Path) -> tuple[Optional[int], Optional[int]]:
    """(epochs, step) from `metrics.jsonl` when there is no checkpoint to read."""
    epoch = step = None
    try:
        rows = read_metrics_log(run_dir)
    except OSError:
        rows = []
    for row in rows:
        if STEP_METRIC in row:
            step = max(step or 0, int(row[STEP_METRIC]))
        if EPOCH_METRIC in row and any(k.startswith(TRAIN_EPOCH_MAIN) for k in row):
            epoch = max(epoch or 0, int(row[EPOCH_METRIC]) + 1)
    return epoch, step


def discover_run_dirs(sweep_dir: Path) -> list[Path]:
    """Folders of the sweep that Hydra or the trainer wrote a run into."""
    found = set()
    for marker in (CONFIG_NAME, ".hydra"):
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
            if candidates and (not job or array_id(max(candidates)[1]) >= array_id(job)):
                job = max(candidates)[1]
        job_of[run_dir] = job

    slurm_ids = [j for r, j in job_of.items() if j and runs[r].get("launcher", "submitit_slurm") != "submitit_local"]
    scheduler = sacct_states(slurm_ids) if use_sacct else None
    if slurm_ids and use_sacct and scheduler is None:
        notes.append("sacct did not answer: states of SLURM runs are judged from their folders")

    now, statuses = time.time(), []
    for run_dir, entry in sorted(runs.items(), key=lambda item: str(item[0])):
        job = job_of[run_dir]
        cfg = read_config(run_dir)
        epochs = OmegaConf.select(cfg, "schedule.epochs") if cfg is not None else None
        state = read_checkpoint_state(checkpoint_path(run_dir))
        epoch, step = (state.get("epoch"), state.get("global_step")) if state else last_metrics_position(run_dir)
        metrics = read_eval_metrics(run_dir)
        finished = training_finished(run_dir, cfg)
        launcher = entry.get("launcher", "")
        local = launcher == "submitit_local"
        updated = newest_mtime(run_dir)
        statuses.append(RunStatus(
            run=os.path.relpath(run_dir, sweep_dir) if run_dir.is_relative_to(sweep_dir) else str(run_dir),
            state=decide_state(
                started=updated is not None, finished=finished,
                scheduler=(scheduler or {}).get(job, []) if not local else [],
                result=submitit_result(jobs[job], job) if job in jobs else "",
                local_alive=pid_alive(job) if local and job else None,
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
