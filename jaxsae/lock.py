"""One writer per folder: an advisory `fcntl.flock` on `<folder>/.lock`, held while a trainer runs in a
run folder or a writer has a store open.

The kernel drops a flock when its holder dies (kill -9 included), so a dead process never blocks the
next one. Within one process the lock is re-entrant (counted per folder): a process may open its own
store twice. The lock file stays empty (store folders stay byte-identical across runs); the holder's
pid, when the error names it, comes from /proc/locks. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

LOCK_FILE = ".lock"

_held: dict[str, list[int]] = {}  # real path of a lock file -> [fd, holders in this process]
_guard = threading.Lock()


class LockError(RuntimeError):
    """The folder is in use by another process; one line naming the folder and, if known, the pid."""


class FolderLock:
    """A held lock on a folder; `release()` (or garbage collection) gives it back."""

    def __init__(self, key: str) -> None:
        self._key: str | None = key

    def release(self) -> None:
        with _guard:
            if self._key is None:
                return
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                os.close(entry[0])  # closing the only descriptor drops the flock
                del _held[self._key]
            self._key = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the module may be half torn down
            self.release()


def acquire(folder: str | os.PathLike, what: str) -> FolderLock:
    """Locks `folder` (created if missing) for this process; LockError if another process holds it.
    `what` names the holder in the message ("trainer", "store writer")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder / LOCK_FILE)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return FolderLock(key)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = holder_pid(fd)
            os.close(fd)
            by = f"pid {pid}" if pid else "another process"
            raise LockError(
                f"{folder}: in use by another {what} ({by}); wait for it to finish or stop it first"
            ) from None
        _held[key] = [fd, 1]
        return FolderLock(key)


def holder_pid(fd: int) -> int | None:
    """The pid holding a flock on the file open at `fd`, from /proc/locks (Linux), or None."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF"; blocked waiters carry a "->" field
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[-3] == dev:
            pid = parts[-4]
            if pid.isdigit() and int(pid) != os.getpid():
                return int(pid)
    return None
