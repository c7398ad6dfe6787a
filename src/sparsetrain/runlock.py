"""One run per run directory: an exclusive lock on ``--out`` for as long as a run writes there.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<out>/.lock``. The kernel drops it when the
process dies (kill -9 included), so a lock left by a killed run never blocks ``--resume``; a
second live writer is refused at once with a one-line :class:`~sparsetrain.errors.UsageError`.
The file holds the owner's pid (for the message) and is removed when the lock is released.
Where ``fcntl`` does not exist (Windows) no lock is taken.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """``RunLock(out)`` holds ``out``'s lock until :meth:`release` (or garbage collection)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(f"--out: {out} is in use by another running sparsetrain process (pid {owner}); "
                                 f"allowed: another --out, or wait until that run ends") from None
            try:   # the holder may have released and removed the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.unlink(self.path)       # while still held: nobody can have locked this inode
        except OSError:
            pass
        os.close(fd)

    def __del__(self):
        self.release()
