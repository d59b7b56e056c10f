"""One server per data directory: an exclusive lock on `<data_dir>/parallm.lock`, held for the
life of the process (the OS drops it when the process ends, however it ends).

At start a server recovers the fine-tuning jobs the last one left behind ("running" -> requeued).
A second server on the same directory would take the first one's running job for an orphan and
requeue it; so the lock is taken before anything opens the job store, and a server that cannot
take it stops having written nothing (the lock file is only created if it does not exist yet).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("parallm.server")

LOCK_NAME = "parallm.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None


class DataDirInUse(Exception):
    """Another process holds the data directory's lock."""


@dataclass
class DataDirLock:
    path: Path
    fd: Optional[int]  # a raw descriptor, never closed: the lock lasts as long as the process

    def release(self) -> None:
        """For tests and embedders; `parallm serve` keeps it until it exits."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _try_lock(fd: int) -> bool:
    """True when locked (or when the platform has no lock, after a warning); False when held elsewhere."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:  # pragma: no cover
            log.warning("no file locking on this platform: nothing stops two servers sharing one data directory")
        return True
    except OSError:
        return False


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip() if hasattr(os, "pread") else ""
    except OSError:
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Take the data directory for this process. Raises DataDirInUse, naming the holder's pid."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if not _try_lock(fd):
        holder = _holder(fd)
        os.close(fd)
        raise DataDirInUse(f"the data directory {data_dir} is in use by another parallm serve{holder}; "
                           "stop that one first, or give this one its own --data-dir")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for the message a second server prints
    return DataDirLock(path, fd)
