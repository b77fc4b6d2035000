"""One writer per output directory: an OS file lock that dies with its process.

    with DirLock(out, "bin/prepare_data"):
        ...   # only this process writes into `out`

The lock is `flock` on `DIR/.storyllama.lock`. The kernel releases it when the process ends however
it ends (SIGKILL included), so a killed run never leaves a stale lock; the file itself stays, and its
text (tool, pid, start time) is only there to name the holder in the refusal. `release(remove=True)`
deletes the file while still holding the lock (for writers whose finished output should not keep it);
`acquire` checks after locking that the path still names the file it locked, so a file removed that
way can never leave two holders (one on the removed file, one on a new one).
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
        fd = None
        try:
            for _attempt in range(100):
                self.directory.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except FileNotFoundError:  # the directory was removed between mkdir and open: make it again
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    fd = None
                    raise LockedError(f"{self.directory} is in use by {holder}; wait for it to finish (or stop it), "
                                      "or choose another output directory") from None
                if _same_file(fd, self.path):
                    self._fd = fd  # ours now: from here release() drops it (and its file)
                    break
                os.close(fd)  # we locked a file its holder removed on release: lock the one there now
                fd = None
            else:
                raise LockedError(f"could not lock {self.path}: it keeps being removed and made again")
        except KeyboardInterrupt:  # Ctrl-C while taking the lock: hold no descriptor (the caller releases a held lock)
            if fd is not None and self._fd is None:
                os.close(fd)
            raise
        try:  # who holds it, for the refusal's sake only: a full disk must not stop the holder
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"tool": self.tool, "pid": os.getpid(), "started": time.time()}).encode(), 0)
        except OSError:
            pass
        return self

    def release(self, remove: bool = False) -> None:
        """Drop the lock; with `remove`, delete the lock file first (still holding it, so no one else has it)."""
        if self._fd is not None:
            if remove:
                try:
                    self.path.unlink()
                except OSError:  # already gone, or a read-only file system: the flock is what counts
                    pass
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"another {info['tool']} (pid {info['pid']}, started {started})"
    except (ValueError, KeyError, TypeError, OSError):
        return "another StoryLlama process"
