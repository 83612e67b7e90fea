"""`<sweep dir>/sweep_runs.json`: the runs a launch validated, written before anything starts, so
that `status` lists the runs that have not started yet."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sparse_detr.atomic_files import write_atomically

MANIFEST_NAME = "sweep_runs.json"


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
    text = json.dumps({"runs": list(entries.values())}, indent=1)
    write_atomically(path, lambda handle: handle.write(text), binary=False)
    return path


def read_manifest(sweep_dir: Path) -> list[dict]:
    try:
        return list(json.loads((sweep_dir / MANIFEST_NAME).read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
