"""Files replaced whole or not at all, created with the permissions the user's umask gives.

A file is written under a temporary name in its own folder, flushed to disk and renamed over the
old one, so a reader, a crash or a `kill -9` at any moment sees the old file or the new one, never
half of one. The temporary file is created as `open()` creates files (mode 0666 less the umask),
not as `tempfile.mkstemp` does (always 0600): collaborators who may read a run's checkpoint may
read its metrics too. A full disk or quota is reported as `DiskFull`, one line naming the file.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Callable, Optional

from sparse_detr.errors import DiskFull

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def temporary_name(path: Path) -> Path:
    """A hidden, unique name beside `path`: same folder, so renaming it over `path` is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def no_space_error(error: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError in an exception's chain (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


def keep_as_previous(path: Path, previous: Path) -> None:
    """Make `previous` the file `path` is now, atomically (a hard link; a copy where links fail)."""
    staged = temporary_name(previous)
    try:
        try:
            os.link(path, staged)
        except OSError as error:
            if error.errno in NO_SPACE:
                raise
            shutil.copyfile(path, staged)
        os.replace(staged, previous)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True,
                     keep_previous: str | os.PathLike | None = None) -> None:
    """Write `path` through `write(handle)`, replacing any old file only once the new one is on disk.

    keep_previous: where the file being replaced is kept (e.g. `checkpoint.prev.pth`), so the
    last two versions exist; at every moment `path` itself is a complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.is_file():
            keep_as_previous(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = no_space_error(error)
        if full is None:
            raise
        kept = f"; {path} is unchanged" if path.is_file() else ""
        raise DiskFull(f"cannot write {path}: {os.strerror(full.errno)}{kept}. "
                       f"Free some space, then run the same command again") from error
