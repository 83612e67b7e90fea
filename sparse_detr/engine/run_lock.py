"""One process group per run folder: an advisory lock on `<run folder>/run.lock`, held for the run's life.

Two identical commands (or two sweeps over the same grid) would otherwise train one run folder
twice, interleaving `metrics.jsonl` and overwriting each other's checkpoints. The lock is an
`flock`, which the kernel drops when its holder ends in any way (`kill -9` included), so it is
never stale. Only rank 0 takes it; it tells the other ranks of its DDP run whether it got it,
so a second start stops on every rank at once. The file records the holder (pid, host, SLURM
job) for the error message. A SLURM requeue of the same job waits a while for its predecessor's
lock (on a shared file system a failed node's lock lingers until the server notices).

Limits: across machines, `flock` is only as good as the file system. Local disks and NFS (the
Linux client maps it onto NFS locks) honour it; Lustre does only when mounted with `-o flock`
(with `localflock` two nodes may both hold it). Where the file system refuses locks, the run
goes on unlocked, with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from sparse_detr.errors import UserError
from sparse_detr.run_folder import LOCK_NAME

log = logging.getLogger(__name__)
REQUEUE_WAIT_S = 120.0  # how long a requeued job waits for the lock its own earlier run may still hold


class RunFolderBusy(UserError):
    """Another process is training in this run folder."""


def holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (starting: it has not yet written who it is)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, since {holder.get('since', '?')}"


def read_holder(handle) -> dict:
    """What the holder wrote ({} while it is still writing, or if the file is not ours)."""
    with contextlib.suppress(OSError, ValueError):
        handle.seek(0)
        record = json.loads(handle.read() or "{}")
        return record if isinstance(record, dict) else {}
    return {}


def try_lock(path: Path, wait_s: float = REQUEUE_WAIT_S):
    """(open handle holding the lock, None), or (None, the holder's record) when another holds it.
    A holder from our own SLURM job (a requeue) is waited for up to `wait_s` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+", encoding="utf-8")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = read_holder(handle)
            ours = os.environ.get("SLURM_JOB_ID")
            if not (ours and holder.get("slurm_job_id") == ours and time.monotonic() < deadline):
                handle.close()
                return None, holder
            time.sleep(1.0)
        except OSError as error:  # ENOLCK, ENOSYS, EOPNOTSUPP: this file system does not lock
            log.warning("cannot lock %s (%s): nothing stops a second process from training in this run "
                        "folder at the same time", path, os.strerror(error.errno or errno.ENOLCK))
            break
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder_record()) + "\n")
    handle.flush()
    return handle, None


@contextlib.contextmanager
def hold_run_folder(run_dir: str | Path, ctx) -> Iterator[None]:
    """Own `run_dir` for the block (ctx: the DistributedContext); RunFolderBusy on every rank if
    another process group owns it. Released on leaving the block, or by the kernel at any exit."""
    path = Path(run_dir) / LOCK_NAME
    handle, holder = try_lock(path) if ctx.is_main else (None, None)
    if ctx.enabled:
        shared = [holder]
        dist.broadcast_object_list(shared, src=0)
        holder = shared[0]
    if holder is not None:
        raise RunFolderBusy(f"run folder {Path(run_dir).resolve()} is in use by {describe(holder)} "
                            f"(lock {path.name}); wait for that run to end, or choose another output_dir")
    try:
        yield
    finally:
        if handle is not None:
            handle.close()
