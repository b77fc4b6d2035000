"""storyllama.locking.DirLock: one writer per directory, the refusal names the holder, the lock dies with
its process, and a lock file removed on release never leaves two holders."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storyllama import locking
from storyllama.locking import LOCK_NAME, DirLock, LockedError

REPO = Path(__file__).resolve().parent.parent


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with DirLock(tmp_path / "d", "bin/prepare_data"):
        with pytest.raises(LockedError, match=rf"in use by another bin/prepare_data \(pid {os.getpid()},"):
            DirLock(tmp_path / "d", "bin/train").acquire()
    DirLock(tmp_path / "d", "bin/train").acquire().release()  # free again once released


def test_release_remove_deletes_the_file_and_the_lock_can_be_taken_again(tmp_path):
    lock = DirLock(tmp_path, "t").acquire()
    lock.release(remove=True)
    assert not (tmp_path / LOCK_NAME).exists()
    DirLock(tmp_path, "t").acquire().release(remove=True)


def test_a_killed_holder_leaves_no_lock(tmp_path):
    code = f"from storyllama.locking import DirLock; DirLock({str(tmp_path)!r}, 'x').acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; its lock died with the process
    DirLock(tmp_path, "y").acquire().release()


def test_a_file_removed_while_we_locked_it_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """Another holder releases with remove=True between our open() and flock(): we must lock the new file."""
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:  # the file we opened goes away and another is made in its place
            (tmp_path / LOCK_NAME).unlink()
            (tmp_path / LOCK_NAME).write_text("")
        return real_flock(fd, op)

    monkeypatch.setattr(locking.fcntl, "flock", flock)
    lock = DirLock(tmp_path, "t").acquire()
    assert len(calls) == 2 and os.stat(tmp_path / LOCK_NAME).st_ino == calls[1] != calls[0]
    lock.release()
