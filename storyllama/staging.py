"""Where writers (bin/export, bin/import) stage their output: a locked temporary sibling of --out, filled, then
renamed into place; and the rule for which --out they may replace (nothing, an empty directory, or an earlier
export whose marker lists every file in it; for a GGUF --out: nothing or an earlier GGUF export, and beside it nothing
or the Ollama Modelfile an earlier export wrote)."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

from storyllama.locking import DirLock, LockedError

MARKER = ".storyllama-export.json"


def check_out(out: Path, kind: str = "directory") -> None:
    """Refuse an --out that is not ours to replace: anything but nothing, an empty directory or an earlier export
    whose marker lists every file in it."""
    if kind == "file":  # a GGUF file, and the Ollama Modelfile written beside it
        if (out.exists() or out.is_symlink()) and (out.is_dir() or not _is_our_gguf(out)):
            raise ValueError(f"--out {out} exists and is not a GGUF file an earlier export wrote; choose a new path "
                             "(nothing was changed)")
        mf = modelfile_path(out)
        if mf == out:
            raise ValueError(f"--out {out}: name the GGUF file NAME.gguf (the Modelfile is written beside it as "
                             "NAME.Modelfile)")
        if (mf.exists() or mf.is_symlink()) and not _is_our_modelfile(mf):
            raise ValueError(f"--out {out}: {mf} beside it exists and was not written by bin/export (the export writes "
                             f"its Ollama Modelfile there); move it or choose a new path (nothing was changed)")
        return
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"--out {out} exists and is not a directory; choose a new path (nothing was changed)")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if (out / "checkpoints").exists() or (out / "trainer_state.json").exists():
        raise ValueError(f"--out {out} is a run or checkpoint directory; an export never replaces one: choose a new "
                         "path (nothing was changed)")
    try:
        ours = set(json.loads((out / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        ours = None
    if ours is None:
        raise ValueError(f"--out {out} exists and was not written by bin/export (no {MARKER}); choose a new path "
                         "(nothing was changed)")
    foreign = sorted(names - ours)
    if foreign:
        raise ValueError(f"--out {out} is an earlier export but also holds files it did not write "
                         f"({', '.join(foreign[:3])}); move them or choose a new path (nothing was changed)")


GGUF_MARKER = "storyllama.exported_from"  # a GGUF metadata key: the file is ours (its value: "RUN, step N")
MODELFILE_HEADER = "# Ollama Modelfile written by storyllama export"  # the first line of every Modelfile of ours


def modelfile_path(gguf: Path) -> Path:
    """The Ollama Modelfile written beside GGUF file `gguf`: NAME.Modelfile for NAME.gguf (so two GGUFs in one
    directory each have their own)."""
    return gguf.with_name(gguf.stem + ".Modelfile")


def _is_our_modelfile(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\r\n") == MODELFILE_HEADER.encode()
    except OSError:
        return False


def _is_our_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return GGUF_MARKER in GGUFReader(str(path)).fields
    except Exception:  # unreadable, not GGUF, or gguf missing: not provably ours
        return False


STAGING_MARKER = ".storyllama-staging.json"  # inside every staging directory: proof that a writer of ours made it


class Staging:
    """A fresh temporary sibling of --out, `.NAME.<tool>-XXXXXXXX` (a unique name made here, with our marker in it),
    locked while one writer (export, import) fills it, and removed on exit with everything in it.

    Nothing of the user's is ever removed: a sibling is cleaned up only when its name has that pattern, it holds
    our marker and no live writer holds its lock (debris of a killed writer); one that is locked means another
    writer fills --out now, and this one is refused."""

    def __init__(self, out: Path, tool: str = "export"):
        self.out, self.tool = out, tool
        self.prefix = f".{out.name}.{tool}-"
        self.tmp: Path | None = None
        self.lock: DirLock | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.out.parent))
        self.lock = DirLock(self.tmp, f"bin/{self.tool}")
        try:
            self.lock.acquire()
            # the marker after the lock: a sibling with our marker and no lock is always a dead writer's
            (self.tmp / STAGING_MARKER).write_text(json.dumps({"tool": f"bin/{self.tool}", "out": self.out.name,
                                                               "pid": os.getpid()}) + "\n")
            self._clean_siblings()
        except BaseException:
            self.__exit__()
            raise
        return self.tmp

    def _clean_siblings(self) -> None:
        for other in self.out.parent.glob(glob.escape(self.prefix) + "*"):
            if other == self.tmp or not other.is_dir() or other.is_symlink() or not (other / STAGING_MARKER).is_file():
                continue  # not a staging directory of ours: never touched
            probe = DirLock(other, f"bin/{self.tool}")
            try:
                probe.acquire()  # LockedError (a ValueError) names the writer at work there
            except LockedError:
                raise LockedError(f"--out {self.out} is in use by another bin/{self.tool} (its staging directory "
                                  f"{other.name} is locked); wait for it to finish") from None
            try:
                shutil.rmtree(other)  # a killed writer's: ours (marker, name) and abandoned (unlocked)
            finally:
                probe.release()

    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
        reason = _write_failure(exc)
        if reason is not None:  # the staging directory is gone: say so, with the space there is now
            try:
                free = f"{shutil.disk_usage(self.out.parent).free / 2**20:,.1f} MB free there now"
            except OSError:
                free = "its free space unknown"
            raise WriteError(f"could not write {self.out}: {reason} ({free}); nothing was changed: --out is as it "
                             "was and the partial files were removed. Free some space or choose an --out on "
                             "another disk, then run the same command again") from None


class WriteError(ValueError):
    """A staged write that failed (a full disk, a quota, an I/O error); nothing was published."""


def _write_failure(exc) -> str | None:
    """What went wrong, when `exc` is a failed write rather than a refusal or a bug: an OSError (numpy's short
    write says "N requested and M written"), or safetensors' error wrapping one."""
    safetensors_error = type(exc).__name__ == "SafetensorError"
    if exc is None or (isinstance(exc, (ValueError, KeyboardInterrupt)) and not safetensors_error):
        return None  # a refusal (one line already) or Ctrl-C
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
        s in text for s in ("No space left", "StorageFull", "requested and", "Disk quota", "File too large"))
    if full:
        return "the disk is full"
    if isinstance(exc, OSError):
        return f"{exc.strerror or text} ({exc.filename})" if exc.filename else (exc.strerror or text)
    if safetensors_error and "IoError" in text:
        return text.splitlines()[0][:200]
    return None


def publish_dir(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the finished files from the staging directory `tmp` into place: `out` holds either the old export or
    the new one, whole. Every intermediate name is inside `tmp` (ours), none beside --out."""
    final = tmp / ".publish"
    final.mkdir()
    (final / MARKER).write_text(json.dumps({"tool": "storyllama export", "files": sorted(files)}, indent=2) + "\n")
    for name in files:
        os.replace(tmp / name, final / name)
    check_out(out)  # again, now that the files are written: nothing changed underneath us
    if out.exists():
        out.rename(tmp / ".replaced")  # an empty directory or an earlier export (checked just above)
    final.rename(out)
