"""The run folder lock: one holder, named in the refusal; a requeue of the same SLURM job waits for
its own earlier run, any other start is refused at once; ranks other than 0 take no lock."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from sparse_detr.engine.distributed import DistributedContext
from sparse_detr.engine.run_lock import RunFolderBusy, hold_run_folder, try_lock
from sparse_detr.run_folder import LOCK_NAME


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_is_free_after(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with hold_run_folder(tmp_path, DistributedContext()):
        monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused at once, not waited for
        with pytest.raises(RunFolderBusy) as caught:
            with hold_run_folder(tmp_path, DistributedContext()):
                pass
        message = str(caught.value)
        assert str(tmp_path.resolve()) in message
        assert f"pid {os.getpid()} on {socket.gethostname()}, SLURM job 4242" in message
    with hold_run_folder(tmp_path, DistributedContext()):  # released on leaving the block
        pass


def test_a_requeue_of_the_same_job_waits_for_its_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first, _ = try_lock(tmp_path / LOCK_NAME)
    threading.Timer(0.5, first.close).start()
    second, holder = try_lock(tmp_path / LOCK_NAME, wait_s=30)
    assert holder is None and second is not None
    second.close()


def test_another_job_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first, _ = try_lock(tmp_path / LOCK_NAME)
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    start = time.monotonic()
    second, holder = try_lock(tmp_path / LOCK_NAME, wait_s=30)
    assert second is None and holder["slurm_job_id"] == "77" and time.monotonic() - start < 5
    first.close()


def test_ranks_other_than_0_take_no_lock(tmp_path):
    first, _ = try_lock(tmp_path / LOCK_NAME)
    with hold_run_folder(tmp_path, DistributedContext(rank=1)):  # one process: nothing to broadcast
        pass
    first.close()
