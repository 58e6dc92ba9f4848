"""One writer per run directory: the advisory lock ``<run_dir>/.lock`` (``utils.run_dir.LOCK_FILE``) that the one
process training or resuming in a run holds. No torch."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any, Optional

from utils.run_dir import LOCK_FILE


class RunLockedError(RuntimeError):
    """Another live process trains in this run directory (it holds ``.lock``)."""


class RunLock:
    """The advisory lock (``fcntl.flock`` on ``<run_dir>/.lock``) that the one process training or resuming in a run
    directory holds. The kernel releases it when the process ends, however it ends (kill -9 included), so a lock file
    left behind by a dead process never blocks. A second writer stops at once with :class:`RunLockedError` naming
    the run and the holder's pid (and host) as the holder wrote them into the file.

    Use ``with RunLock(run_dir):`` or :meth:`acquire` / :meth:`release`; ``RunLock(None)`` holds nothing (the
    processes of a DDP run other than rank 0, which write nothing).
    """

    def __init__(self, run_dir: Optional[str]) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE) if run_dir else None
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self.path is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"{self.run_dir} is in use: another process ({holder or 'pid unknown'}) trains in it (it holds "
                    f"{self.path}). Wait for it to end or stop it; two writers would mix their checkpoints and "
                    f"metrics.") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """What the holder wrote into the lock file ("pid N on HOST"), or ""."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return text if text.startswith("pid ") else ""
