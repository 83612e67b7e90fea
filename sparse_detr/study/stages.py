"""The stage of every run of a study, from its folder and (on SLURM) the scheduler.

    pending    not started, or waiting in the queue
    training   training now
    analysing  trained to the end, analysing its final checkpoint now
    done       trained and analysed: in the report
    failed     its job failed (run the study again to retry it)
    stopped    not running, not done (run the study again to resume it)

A live process is seen by the lock it holds on the run folder; a SLURM job by `sacct`
(`sparse_detr.sweep.status`, which also gives the epoch and the latest AP).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from sparse_detr.run_folder import analysis_is_current, read_json, run_folder_in_use, training_finished, write_json
from sparse_detr.sweep.slurm import SLURM_RUNNING, SLURM_WAITING
from sparse_detr.sweep.status import RunStatus, sweep_status

STAGES = ("pending", "training", "analysing", "done", "failed", "stopped")
PLAN_NAME = "study.json"     # <study dir>/study.json: the study's config and its runs, written before any launch
REPORT_DIR = "report"


@dataclass
class RunStage:
    run: str                       # the run folder, relative to <study dir>/runs
    stage: str
    job: str = ""
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    ap: Optional[float] = None
    queued: bool = False           # the scheduler holds a job of this run (waiting or running)


def stage_of(status: Optional[RunStatus], *, in_use: bool, trained: bool, analysed: bool) -> str:
    """One word per run (see the module's docstring)."""
    if trained and analysed:
        return "done"
    # A process on this machine holds the run folder's lock; a SLURM job is judged by the scheduler
    # (a local run stopped a minute ago has fresh files but no process: it is stopped, not running).
    active = in_use or (status is not None and bool(status.scheduler) and status.state in ("running", "requeued"))
    if active:
        return "analysing" if trained else "training"
    if status is None or status.state == "pending":
        return "pending"
    return "failed" if status.state == "failed" else "stopped"


def write_plan(study_dir: Path, plan: dict) -> None:
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(study_dir) / PLAN_NAME, plan)


def read_plan(study_dir: Path) -> Optional[dict]:
    try:
        return read_json(Path(study_dir) / PLAN_NAME)
    except (OSError, ValueError):
        return None


def study_stages(study_dir: Path, run_names: Sequence[str], use_sacct: bool = True,
                 notes: Optional[list[str]] = None) -> list[RunStage]:
    """The stage of each run (named relative to `<study dir>/runs`), in the order given."""
    runs_dir = Path(study_dir).absolute() / "runs"
    statuses = {s.run: s for s in sweep_status(runs_dir, use_sacct=use_sacct, notes=notes)} if runs_dir.is_dir() else {}
    stages = []
    for name in run_names:
        run_dir, status = runs_dir / name, statuses.get(name)
        stage = stage_of(status, in_use=run_folder_in_use(run_dir), trained=training_finished(run_dir),
                         analysed=analysis_is_current(run_dir))
        queued = status is not None and status.scheduler in (*SLURM_RUNNING, *SLURM_WAITING)
        stages.append(RunStage(name, stage, job=status.job if status else "", epoch=status.epoch if status else None,
                               epochs=status.epochs if status else None, ap=status.ap if status else None,
                               queued=queued))
    return stages


def format_stages(stages: Sequence[RunStage], study_dir: Path) -> str:
    """The table `sparse-detr-study status` prints, a count per stage, and where the report is."""
    header = ("run", "stage", "job", "epoch", "AP")
    rows = [(s.run, s.stage, s.job or "-", "-" if s.epoch is None else f"{s.epoch}/{s.epochs or '?'}",
             "-" if s.ap is None else f"{s.ap:.4f}") for s in stages]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    counts = {stage: sum(s.stage == stage for s in stages) for stage in STAGES}
    lines.append(f"{len(stages)} runs: " + ", ".join(f"{n} {stage}" for stage, n in counts.items() if n))
    report = Path(study_dir) / REPORT_DIR / "report.md"
    lines.append(f"report: {report} (written {time.strftime('%Y-%m-%d %H:%M', time.localtime(report.stat().st_mtime))})"
                 if report.is_file() else "report: not written yet")
    return "\n".join(lines)
