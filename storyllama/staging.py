"""Where writers (bin/export, bin/import) stage their output: a locked temporary sibling of --out, filled, then
renamed into place; and the rule for which --out they may replace (nothing, an empty directory, or an earlier
export whose marker lists every file in it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from storyllama.locking import LOCK_NAME, DirLock

MARKER = ".storyllama-export.json"


def check_out(out: Path, kind: str = "directory") -> None:
    """Refuse an --out that is not ours to replace: anything but nothing, an empty directory or an earlier export
    whose marker lists every file in it."""
    if not out.exists() and not out.is_symlink():
        return
    if kind == "file":
        if out.is_dir() or not _is_our_gguf(out):
            raise ValueError(f"--out {out} exists and is not a GGUF file an earlier export wrote; choose a new path "
                             "(nothing was changed)")
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


def _is_our_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return "storyllama.exported_from" in GGUFReader(str(path)).fields
    except Exception:  # unreadable, not GGUF, or gguf missing: not provably ours
        return False


class Staging:
    """The temporary sibling `.NAME.<tool>-tmp` of --out, locked while one writer (export, import) fills it."""

    def __init__(self, out: Path, tool: str = "export"):
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{tool}-tmp")
        self.lock = DirLock(self.tmp, f"bin/{tool}")

    def __enter__(self) -> Path:
        self.lock.acquire()  # LockedError (a ValueError) names the other export
        for p in self.tmp.iterdir():  # left by an export that was killed: never an output
            if p.name != LOCK_NAME:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()


def publish_dir(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the finished files into place: `out` holds either the old export or the new one, whole."""
    (tmp / MARKER).write_text(json.dumps({"tool": "storyllama export", "files": sorted(files)}, indent=2) + "\n")
    final = tmp.with_name(tmp.name + ".done")
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    for name in [*files, MARKER]:
        os.replace(tmp / name, final / name)
    check_out(out)  # again, now that the files are written: nothing changed underneath us
    old = out.with_name(f".{out.name}.export-old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    final.rename(out)
    shutil.rmtree(old, ignore_errors=True)
