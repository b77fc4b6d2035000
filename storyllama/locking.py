"""One writer per output directory: an OS file lock that dies with its process.

    with DirLock(out, "bin/prepare_data"):
        ...   # only this process writes into `out`

The lock is `flock` on `DIR/.storyllama.lock`. The kernel releases it when the process ends however
it ends (SIGKILL included), so a killed run never leaves a stale lock; the file itself stays, and its
text (tool, pid, start time) is only there to name the holder in the refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

LOCK_NAME = ".storyllama.lock"


class LockedError(ValueError):
    """Another live process holds the directory's lock; the message names it."""


class DirLock:
    def __init__(self, directory: str | Path, tool: str):
        self.directory = Path(directory)
        self.tool = tool
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> DirLock:
        """Create the directory if needed and take its lock, or raise LockedError at once (never waits)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(f"{self.directory} is in use by {holder}; wait for it to finish (or stop it), or "
                              "choose another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"tool": self.tool, "pid": os.getpid(), "started": time.time()}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"another {info['tool']} (pid {info['pid']}, started {started})"
    except (ValueError, KeyError, TypeError, OSError):
        return "another StoryLlama process"
