"""`sparse-detr-sweep status`: every run of a sweep with its state, progress and latest AP, from the
run folders, the sweep's run list, submitit's job folders and sacct (a stand-in here)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from sparse_detr.sweep import main
from sparse_detr.sweep.manifest import MANIFEST_NAME, write_manifest
from sparse_detr.sweep.status import decide_state, format_table, sweep_status


def make_run(sweep: Path, name: str, *, epochs: int = 4, done_epochs: int | None = None, step: int = 0,
             ap: float | None = None, age_s: float = 0.0, hydra_job_id: str | None = None) -> Path:
    run = sweep / name / "seed_42"
    (run / ".hydra").mkdir(parents=True)
    (run / "config.yaml").write_text(f"schedule:\n  epochs: {epochs}\ntrain:\n  max_steps: null\n")
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    id: '{hydra_job_id or '0'}'\n")
    if done_epochs is not None:
        torch.save({"state": {"epoch": done_epochs, "batch_in_epoch": 0, "global_step": step}}, run / "checkpoint.pth")
    if ap is not None:
        (run / "eval_metrics.json").write_text(json.dumps({"AP": ap, "epoch": done_epochs, "global_step": step}))
    (run / "metrics.jsonl").write_text(json.dumps({"global_step": step}) + "\n")
    stamp = time.time() - age_s
    for path in run.iterdir():
        os.utime(path, (stamp, stamp))
    return run


def manifest(sweep: Path, names: list[str], launcher: str) -> None:
    """The list of runs the sweep callback writes before launching (one job array)."""
    write_manifest(sweep, [{"job_num": i, "array_index": i, "overrides": [f"attention={n}"],
                            "run_dir": str(sweep / n / "seed_42")} for i, n in enumerate(names)],
                   launcher=launcher, cluster="x")


def fake_sacct(tmp_path: Path, monkeypatch, rows: str) -> None:
    """A `sacct` that prints `rows` (JobID|State lines, oldest run first) whatever it is asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sacct"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{rows}\nEOF\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def by_run(statuses):
    return {s.run.split("/")[0]: s for s in statuses}


def test_runs_of_a_local_sweep_are_judged_from_their_folders(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    manifest(sweep, ["softmax", "sparsemax", "entmax15", "alpha_entmax"], launcher="basic")
    make_run(sweep, "softmax", done_epochs=4, step=32, ap=0.25, age_s=3600)
    make_run(sweep, "sparsemax", done_epochs=2, step=19, ap=0.1, age_s=5)
    make_run(sweep, "entmax15", done_epochs=1, step=8, ap=None, age_s=7200)
    statuses = by_run(sweep_status(sweep, use_sacct=False))

    assert statuses["softmax"].state == "done"
    assert (statuses["softmax"].epoch, statuses["softmax"].epochs, statuses["softmax"].step) == (4, 4, 32)
    assert statuses["softmax"].ap == 0.25 and statuses["softmax"].job == ""
    assert statuses["sparsemax"].state == "running" and statuses["sparsemax"].step == 19
    assert statuses["entmax15"].state == "stopped"
    assert statuses["alpha_entmax"].state == "pending" and statuses["alpha_entmax"].epoch is None

    assert main(["status", str(sweep), "--no-sacct"]) == 0
    out = capsys.readouterr().out
    assert "softmax/seed_42" in out and "0.2500 @4" in out and "4/4" in out
    assert out.strip().endswith("4 runs: 1 done, 1 running, 1 pending, 1 stopped")


def test_slurm_runs_take_their_state_from_sacct(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    names = ["softmax", "sparsemax", "entmax15", "alpha_entmax"]
    manifest(sweep, names, launcher="submitit_slurm")
    for i in range(len(names)):  # what the launcher leaves right after submitting the array
        (sweep / ".submitit" / f"77_{i}").mkdir(parents=True)
    make_run(sweep, "softmax", done_epochs=4, step=32, ap=0.25, age_s=60, hydra_job_id="77_0")
    make_run(sweep, "sparsemax", done_epochs=2, step=16, ap=0.1, age_s=600, hydra_job_id="77_1")
    make_run(sweep, "entmax15", done_epochs=1, step=9, age_s=60, hydra_job_id="77_2")
    fake_sacct(tmp_path, monkeypatch, "77_0|COMPLETED\n77_1|REQUEUED\n77_1|PENDING\n77_2|REQUEUED\n77_2|RUNNING\n"
                                      "77_3|CANCELLED by 0")
    statuses = by_run(sweep_status(sweep))

    assert {n: s.job for n, s in statuses.items()} == {n: f"77_{i}" for i, n in enumerate(names)}
    assert statuses["softmax"].state == "done"
    assert statuses["sparsemax"].state == "requeued" and statuses["sparsemax"].requeues == 1
    assert statuses["entmax15"].state == "running" and statuses["entmax15"].requeues == 1
    assert statuses["alpha_entmax"].state == "failed" and statuses["alpha_entmax"].scheduler == "CANCELLED"
    table = format_table(list(statuses.values()))
    assert "running (1x requeued)" in table and "1 done, 1 running, 1 requeued, 1 failed" in table


def test_without_sacct_slurm_runs_fall_back_to_their_files_and_submitits_results(tmp_path, monkeypatch):
    import cloudpickle

    sweep = tmp_path / "sweep"
    manifest(sweep, ["softmax", "sparsemax"], launcher="submitit_slurm")
    for i in range(2):
        (sweep / ".submitit" / f"5_{i}").mkdir(parents=True)
    make_run(sweep, "softmax", done_epochs=1, step=8, age_s=3600, hydra_job_id="5_0")
    (sweep / ".submitit" / "5_0" / "5_0_0_result.pkl").write_bytes(cloudpickle.dumps(("error", "Traceback...")))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    notes: list[str] = []
    statuses = by_run(sweep_status(sweep, notes=notes))
    assert statuses["softmax"].state == "failed"
    assert statuses["sparsemax"].state == "pending" and statuses["sparsemax"].job == "5_1"
    assert notes and "sacct" in notes[0]


def test_a_relaunch_keeps_the_earlier_runs_in_the_list(tmp_path):
    sweep = tmp_path / "sweep"
    manifest(sweep, ["softmax", "sparsemax"], launcher="basic")
    write_manifest(sweep, [{"job_num": 0, "overrides": [], "run_dir": str(sweep / "entmax15" / "seed_42")}],
                   launcher="basic", cluster="local")
    runs = json.loads((sweep / MANIFEST_NAME).read_text())["runs"]
    assert sorted(r["run_dir"] for r in runs) == ["entmax15/seed_42", "softmax/seed_42", "sparsemax/seed_42"]
    assert len(sweep_status(sweep, use_sacct=False)) == 3


@pytest.mark.parametrize("scheduler,expected", [
    (["RUNNING"], "running"), (["PENDING"], "pending"), (["REQUEUED"], "requeued"),
    (["REQUEUED", "PENDING"], "requeued"), (["REQUEUED", "COMPLETED"], "done"), (["TIMEOUT"], "failed"),
    (["OUT_OF_MEMORY"], "failed"), (["PREEMPTED"], "failed"),
])
def test_scheduler_states(scheduler, expected):
    assert decide_state(started=True, finished=False, scheduler=scheduler, result="", local_alive=None,
                        updated=None, now=0.0) == expected


def test_status_of_a_missing_folder_fails(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "no sweep folder" in capsys.readouterr().err


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", ["whole", "inside_success"])
def test_status_never_unpickles_a_result_file(tmp_path, capsys, payload):
    import pickle

    import cloudpickle

    sweep = tmp_path / "sweep"
    marker = tmp_path / "marker"
    manifest(sweep, ["softmax", "sparsemax", "entmax15"], launcher="submitit_slurm")
    results = {"softmax": _CreatesMarker(marker) if payload == "whole" else ("success", _CreatesMarker(marker)),
               "sparsemax": ("success", {"AP": 0.1}), "entmax15": ("error", "Traceback ...")}
    for i, (name, result) in enumerate(results.items()):
        folder = sweep / ".submitit" / f"7_{i}"
        folder.mkdir(parents=True)
        (folder / f"7_{i}_0_result.pkl").write_bytes(cloudpickle.dumps(result, pickle.HIGHEST_PROTOCOL))
        make_run(sweep, name, done_epochs=1, step=8, age_s=3600, hydra_job_id=f"7_{i}")
    assert main(["status", str(sweep), "--no-sacct"]) == 0
    assert not marker.exists(), "status ran code from a result file"
    statuses = by_run(sweep_status(sweep, use_sacct=False))
    assert statuses["softmax"].state == ("stopped" if payload == "whole" else "done")
    assert statuses["sparsemax"].state == "done" and statuses["entmax15"].state == "failed"


def test_no_sacct_means_no_remark_about_sacct(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "sweep"
    manifest(sweep, ["softmax"], launcher="submitit_slurm")
    (sweep / ".submitit" / "5_0").mkdir(parents=True)
    make_run(sweep, "softmax", done_epochs=1, step=8, age_s=3600, hydra_job_id="5_0")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert main(["status", str(sweep), "--no-sacct"]) == 0
    assert "sacct did not answer" not in capsys.readouterr().out
    assert main(["status", str(sweep)]) == 0
    assert "sacct did not answer" in capsys.readouterr().out
