"""The installed and importable names: everything of ours lives under `storyllama`, so nothing of ours shadows
another distribution's top-level package (Hugging Face's `kernels`, which transformers imports) or is shadowed
by it, wherever Python starts: the repository root (`python -m pytest`, `python -c`, a REPL, a notebook),
`bin/*` (which put the repository root on sys.path), or anywhere else.

Every probe runs in a fresh interpreter with cwd = the repository root, as users run it."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
try:  # Hugging Face's `kernels` distribution (a transformers dependency), asked by its metadata, not by import
    importlib.metadata.distribution("kernels")
    HF_KERNELS = True
except importlib.metadata.PackageNotFoundError:
    HF_KERNELS = False

# What `import kernels` / `import data_prep` give: the file of a regular package, None for a namespace folder.
NAMES = """
import importlib.util, json
out = {}
for name in ("kernels", "data_prep"):
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else {"origin": spec.origin if spec.has_location else None,
                                           "paths": [str(p) for p in (spec.submodule_search_locations or [])]}
import storyllama.kernels.ops, storyllama.data_prep.prepare
out["ours"] = [storyllama.kernels.ops.__file__, storyllama.data_prep.prepare.__file__]
print("PROBE" + json.dumps(out))
"""


def run_probe(code: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def probe_output(res: subprocess.CompletedProcess) -> dict:
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


def is_ours(path: str) -> bool:
    """A file in one of our source folders (the repository holds .venv too, which is not ours)."""
    p = Path(path).resolve()
    return any(p.is_relative_to(ROOT / d) for d in ("kernels", "data_prep", "storyllama"))


def assert_never_ours_as_a_regular_package(out: dict) -> None:
    for name in ("kernels", "data_prep"):
        found = out[name]
        if found is None:
            continue
        # a namespace folder of ours (no __init__.py) is allowed: any regular package of the name wins over it
        assert found["origin"] is None or not is_ours(found["origin"]), (name, found)
    assert [Path(p).resolve().parent for p in out["ours"]] == [ROOT / "kernels", ROOT / "data_prep"]


def test_our_top_level_folders_are_not_regular_packages():
    # the mechanism itself: a regular package (an __init__.py) in either folder would shadow, from the root
    assert not (ROOT / "kernels" / "__init__.py").exists() and not (ROOT / "data_prep" / "__init__.py").exists()


def test_from_the_repository_root_with_nothing_installed_beside_us():
    # site-packages' own `kernels` taken away: what remains of the name is at most our namespace folder
    code = ("import sys, importlib.util, json\n"
            "site = [p for p in sys.path if 'site-packages' in p]\n"
            "import storyllama.kernels.ops, storyllama.data_prep.prepare\n"
            "sys.path[:] = [p for p in sys.path if p not in site]\n"
            "out = {}\n"
            "for name in ('kernels', 'data_prep'):\n"
            "    sys.modules.pop(name, None)\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    out[name] = None if spec is None else {'origin': spec.origin if spec.has_location else None}\n"
            "out['ours'] = [storyllama.kernels.ops.__file__, storyllama.data_prep.prepare.__file__]\n"
            "print('PROBE' + json.dumps(out))\n")
    assert_never_ours_as_a_regular_package(probe_output(run_probe(code)))


def test_from_the_repository_root_python_c():
    out = probe_output(run_probe(NAMES))
    assert_never_ours_as_a_regular_package(out)
    if HF_KERNELS:
        assert "site-packages" in out["kernels"]["origin"], out["kernels"]


def test_through_bin_scripts_sys_path():
    # bin/* insert the repository root first on sys.path; run one of them for real (its --help), then probe
    code = ("import runpy, sys\nsys.argv = ['bin/import', '--help']\n"
            "try:\n    runpy.run_path('bin/import', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n" + NAMES)
    out = probe_output(run_probe(code))
    assert_never_ours_as_a_regular_package(out)
    if HF_KERNELS:
        assert "site-packages" in out["kernels"]["origin"], out["kernels"]


@pytest.mark.parametrize("tool", ["prepare_data", "train", "sample", "export", "import", "serve", "bench",
                                  "instruct_score"])
def test_every_bin_tool_starts_from_the_repository_root(tool):
    res = subprocess.run([sys.executable, f"bin/{tool}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout


def test_hugging_face_kernels_is_theirs_from_the_repository_root():
    if not HF_KERNELS:
        pytest.skip("Hugging Face's kernels package is not installed here (transformers >= 5 brings it)")
    code = ("import json, kernels, storyllama.kernels.ops as o\n"
            "print('PROBE' + json.dumps([kernels.__file__, o.__file__]))")
    theirs, ours = probe_output(run_probe(code))
    assert not is_ours(theirs) and Path(ours).resolve().parent == ROOT / "kernels"


def test_transformers_loads_an_export_from_the_repository_root(tmp_path):
    """The README's flow where the README tells people to stand: export, then pipeline() and from_pretrained."""
    pytest.importorskip("transformers", reason="the export is loaded with transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_checkpoint import save_checkpoint, tiny_model

    from storyllama.export import export

    _, ckpt = save_checkpoint(tmp_path, tiny_model())
    out = export(ckpt, tmp_path / "hf")
    code = (f"import torch, transformers, json\nout = {str(out)!r}\n"
            "m = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)\n"
            "p = transformers.pipeline('text-generation', model=out)\n"
            "text = p('Once upon a time', max_new_tokens=8, do_sample=False)[0]['generated_text']\n"
            "import kernels\n"
            "print('PROBE' + json.dumps([type(m).__name__, text, getattr(kernels, '__file__', None)]))\n")
    name, text, kernels_file = probe_output(run_probe(code))
    assert name == "LlamaForCausalLM" and text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert kernels_file is None or not is_ours(kernels_file)


def test_console_scripts_point_into_the_storyllama_namespace():
    scripts = [ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.name.startswith("storyllama")]
    assert {ep.name for ep in scripts} >= {"storyllama-train", "storyllama-prepare-data", "storyllama-sample",
                                           "storyllama-export", "storyllama-import"}
    assert all(ep.value.startswith("storyllama.") for ep in scripts), [ep.value for ep in scripts]


def test_a_wheel_holds_the_files_under_storyllama_only(tmp_path):
    """A non-editable install (`pip install .`): the wheel carries kernels/ and data_prep/ as real files under
    storyllama/, and no top-level kernels or data_prep."""
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("storyllama-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "data_prep" not in tops, sorted(tops)
    assert "storyllama/kernels/ops.py" in names and "storyllama/data_prep/prepare.py" in names
    assert "storyllama/kernels/rmsnorm.py" in names and "storyllama/data_prep/tokenizer.py" in names


def _module_imports() -> dict[str, set[str]]:
    """Our modules -> the modules of ours each imports (at the top or inside a function), read with ast."""
    import ast

    mods: dict[str, set[str]] = {}
    for folder, pkg in (("storyllama", "storyllama"), ("kernels", "storyllama.kernels"),
                        ("data_prep", "storyllama.data_prep")):
        for f in sorted((ROOT / folder).glob("*.py")):
            deps = set()
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom):
                    mod = f"{pkg}.{node.module}" if node.level else node.module or ""
                    deps |= {mod, *(f"{mod}.{a.name}" for a in node.names)}
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
            mods[f"{pkg}.{f.stem}"] = deps
    return {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}


def test_no_import_circles_among_our_modules():
    """Shared pieces live in the module both sides use (tokenizer <-> hf_tokenizer, export <-> gguf_export and
    kernels.ops <-> the Triton backend were circles once)."""
    graph = _module_imports()
    assert "storyllama.data_prep.hf_tokenizer" in graph["storyllama.data_prep.tokenizer"]  # the reader sees edges

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, circles
