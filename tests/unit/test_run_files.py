"""Files a run writes and reads back: replaced whole, with the umask's permissions; the last two
checkpoints kept; a full disk or an unreadable checkpoint reported in one line naming the file."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from sparse_detr.config import reports_config_errors
from sparse_detr.engine.checkpoint import atomic_save, load_training_checkpoint
from sparse_detr.errors import DiskFull, UnreadableFile
from sparse_detr.metrics.coco_eval import METRIC_NAMES
from sparse_detr.models.detr_checkpoint import read_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, write_json


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """umask(value): set the process umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_metrics_and_checkpoints_get_the_permissions_the_umask_gives(tmp_path, umask, mask, expected):
    umask(mask)
    write_json(tmp_path / "eval_metrics.json", {"AP": 0.5})
    write_json(tmp_path / "eval_val.json", {"AP": 0.6})
    atomic_save({"step": 1}, tmp_path / CHECKPOINT_NAME, keep_previous=True)
    atomic_save({"step": 2}, tmp_path / CHECKPOINT_NAME, keep_previous=True)
    for name in ("eval_metrics.json", "eval_val.json", CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["eval_metrics.json", "eval_val.json", CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME])


def test_the_replaced_checkpoint_is_kept_as_the_previous_one(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    for step in (1, 2, 3):
        atomic_save({"step": step}, path, keep_previous=True)
    assert read_checkpoint(path)["step"] == 3
    assert read_checkpoint(tmp_path / PREVIOUS_CHECKPOINT_NAME)["step"] == 2


def test_a_full_disk_names_the_file_and_leaves_both_checkpoints_as_they_were(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    atomic_save({"step": 1}, path, keep_previous=True)
    atomic_save({"step": 2}, path, keep_previous=True)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFull) as caught:
        atomic_save({"step": 3}, path, keep_previous=True)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "No space left on device" in message
    assert "is unchanged" in message
    assert read_checkpoint(path)["step"] == 2
    assert read_checkpoint(tmp_path / PREVIOUS_CHECKPOINT_NAME)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME])


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB file system (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", f"tmpfs-{uuid.uuid4().hex[:6]}",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_save_that_fills_a_real_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_tmpfs):
    path = tiny_tmpfs / CHECKPOINT_NAME
    atomic_save({"step": 1, "weights": torch.zeros(1000)}, path, keep_previous=True)
    with pytest.raises(DiskFull, match=r"cannot write .*checkpoint\.pth: No space left on device"):
        atomic_save({"step": 2, "weights": torch.zeros(1_000_000)}, path, keep_previous=True)
    assert read_checkpoint(path)["step"] == 1
    assert [p.name for p in tiny_tmpfs.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left behind


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_an_unreadable_checkpoint_names_the_file_and_the_previous_one_to_go_on_from(tmp_path, how):
    path = tmp_path / CHECKPOINT_NAME
    atomic_save({"state": {"global_step": 4}, "weights": torch.ones(1000)}, path, keep_previous=True)
    atomic_save({"state": {"global_step": 6}, "weights": torch.ones(1000)}, path, keep_previous=True)
    damage(path, how)
    damaged = path.read_bytes()
    with pytest.raises(UnreadableFile) as caught:
        load_training_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"checkpoint {path} is unreadable" in message
    assert f"mv {tmp_path / PREVIOUS_CHECKPOINT_NAME} {path}" in message
    assert path.read_bytes() == damaged  # nothing is deleted or replaced: the user decides
    assert load_training_checkpoint(tmp_path / PREVIOUS_CHECKPOINT_NAME)["state"]["global_step"] == 4


def test_an_unreadable_file_without_a_previous_one_is_still_one_line(tmp_path):
    path = tmp_path / "detr.pth"
    path.write_bytes(b"not a checkpoint at all\n" * 50)
    with pytest.raises(UnreadableFile, match=r"checkpoint .*detr\.pth is unreadable") as caught:
        read_checkpoint(path)
    assert "mv " not in str(caught.value)


@pytest.mark.parametrize("error", [DiskFull("cannot write /x/checkpoint.pth: No space left on device"),
                                   UnreadableFile("checkpoint /x/checkpoint.pth is unreadable")])
def test_entry_points_report_a_user_error_in_one_line_with_status_2(error, capsys):
    @reports_config_errors
    def entry_point():
        raise error

    with pytest.raises(SystemExit) as exited:
        entry_point()
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_metrics_json_is_written_atomically_with_nan_as_null(tmp_path):
    metrics = {name: 0.5 for name in METRIC_NAMES} | {"APs": math.nan}
    path = tmp_path / "eval" / "metrics.json"
    write_json(path, metrics)
    write_json(path, metrics)  # replaces the file
    assert json.loads(path.read_text()) == {name: 0.5 for name in METRIC_NAMES} | {"APs": None}
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind
