"""The installed names: everything of ours lives under `storyllama`, so nothing we install shadows another
distribution's top-level package (Hugging Face's `kernels` is one) or is shadowed by it."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, json, sys
sys.path = [p for p in sys.path if p not in ("", ".")]
import storyllama.kernels, storyllama.data_prep.prepare
out = {"ours": [storyllama.kernels.__file__, storyllama.data_prep.__file__]}
for name in ("kernels", "data_prep"):
    spec = importlib.util.find_spec(name)
    out[name] = spec.origin if spec else None
print(json.dumps(out))
"""


def test_no_top_level_kernels_or_data_prep_is_installed(tmp_path):
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [Path(p).resolve().parent for p in out["ours"]] == [ROOT / "kernels", ROOT / "data_prep"]
    for name in ("kernels", "data_prep"):
        # absent, or someone else's (e.g. Hugging Face's kernels package): never our folder
        assert out[name] is None or ROOT not in Path(out[name]).resolve().parents, (name, out[name])


def test_console_scripts_point_into_the_storyllama_namespace():
    scripts = [ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.name.startswith("storyllama")]
    assert {ep.name for ep in scripts} >= {"storyllama-train", "storyllama-prepare-data", "storyllama-sample",
                                           "storyllama-export", "storyllama-import"}
    assert all(ep.value.startswith("storyllama.") for ep in scripts), [ep.value for ep in scripts]


def test_hugging_face_kernels_imports_beside_ours(tmp_path):
    import pytest

    probe = "import kernels, storyllama.kernels; print(kernels.__file__, storyllama.kernels.__file__)"
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if "No module named 'kernels'" in res.stderr:
        pytest.skip("Hugging Face's kernels package is not installed here")
    assert res.returncode == 0, res.stderr
    theirs, ours = res.stdout.split()
    assert Path(ours).resolve().parent == ROOT / "kernels" and ROOT not in Path(theirs).resolve().parents
