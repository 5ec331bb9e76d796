"""An exclusive lock on a path, held by one process at a time: the one writer of a run folder or file.

    fd, stale = acquire(path)   # flock path and write our pid into it; Busy(holder) if a live process holds it
    fd, stale = acquire(path, wait=True)  # or wait until its holder releases it
    ... write what the lock guards ...
    release(fd, path)           # unlink it while holding it, then close

The lock is an flock, so the kernel releases it when its holder dies (kill -9 included); the pid a
dead holder left in the file comes back as `stale`, for the caller to report. A waiter that opened
the file before its holder unlinked it notices that the path is now another file and retries, so
two processes never both believe they hold it.
"""

import fcntl
import os


class Busy(Exception):
    """The lock is held by a live process; holder is the pid written in the file ("?" if none yet)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def acquire(path: str, wait: bool = False) -> tuple:
    """(open file descriptor holding the lock, pid of a dead holder or ""), or raise Busy (wait=False)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder released it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)
    stale = os.read(fd, 32).decode(errors="replace").strip()  # the kernel released it: its holder is gone
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, stale


def release(fd: int, path: str):
    """Unlink while still holding it, so a waiter that opened it retries on a fresh file."""
    os.unlink(path)
    os.close(fd)
