"""Which code made a run: package version, git commit and dirty flag, Python/torch/CUDA, host.

Two runs with the same config are comparable only if the same code ran them. Every start of a
run (the first and each resume) records where it ran into the run folder's `provenance.json`
(the latest start at the top level, earlier starts under "earlier"), and the same record goes
into the W&B config under `provenance`. The git fields are null when the package does not run
from a git checkout (an installed wheel) or git is not there.
"""
from __future__ import annotations

import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sparse_detr.run_folder import PROVENANCE_NAME, read_json, write_json

PACKAGE_DIR = Path(__file__).resolve().parent
DISTRIBUTION = "sparse-detr"


def _git(checkout: Path, *args: str) -> str | None:
    """stdout of `git -C checkout args`, or None when git is missing or fails."""
    try:
        result = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the checkout that holds `package_dir` as its top-level package.

    A package installed inside some other repository (a virtual environment in a project's
    checkout) is not that repository's code: both fields are then None. Dirty: any change to a
    tracked file or any untracked file that .gitignore does not hide."""
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() / package_dir.name != package_dir.resolve():
        return {"git_commit": None, "git_dirty": None}
    commit = _git(package_dir, "rev-parse", "HEAD")
    status = _git(package_dir, "status", "--porcelain")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def package_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def collect(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The provenance of this process: what `provenance.json` and the W&B config record."""
    return {
        "package_version": package_version(),
        **git_state(package_dir),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,          # None for a CPU-only torch
        "host": socket.gethostname(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_provenance(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's provenance.json, or None if it has none (or it cannot be read)."""
    try:
        return read_json(Path(run_dir) / PROVENANCE_NAME)
    except (OSError, ValueError):
        return None


def record_provenance(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Write `record` as the run's latest start, keeping every earlier start under "earlier"."""
    previous = read_provenance(run_dir) or {}
    earlier = previous.pop("earlier", [])
    if previous:
        earlier.append(previous)
    write_json(Path(run_dir) / PROVENANCE_NAME, {**record, "earlier": earlier})


def run_commits(provenance: dict[str, Any] | None) -> set[str]:
    """Every code state a run was trained with, over all its starts: the commit, with "+dirty"
    when the tree had uncommitted changes, or "unknown" where git was not available."""
    if not provenance:
        return {"unknown"}
    starts = [provenance, *provenance.get("earlier", [])]
    return {(start.get("git_commit") or "unknown") + ("+dirty" if start.get("git_dirty") else "") for start in starts}
