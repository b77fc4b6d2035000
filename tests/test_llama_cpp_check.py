"""benchmarks/llama_cpp_check.py on a tiny model: every precision loads in llama.cpp, gives our ids on the hard
texts, our greedy text (f32) and bits per byte within the bounds. Needs llama-cpp-python (the `llama` extra)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from tiny_checkpoint import save_checkpoint, tiny_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]', builds from "
                    "source for several minutes)")
pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install -e .[export])")

CHECK = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "llama_cpp_check.py"))


def test_llama_cpp_check_passes_on_a_tiny_model(tmp_path, capsys):
    from storyllama.data_prep.builtin import write_stories

    run, _ = save_checkpoint(tmp_path, tiny_model())
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": s}) + "\n" for s in write_stories(6, 1)))
    out = tmp_path / "check.json"
    rc = CHECK["main"](["--run", str(run), "--val", str(val), "--new_tokens", "20", "--rounds", "1", "--json",
                        str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [r["dtype"] for r in res["rows"]] == ["f32", "f16", "bf16", "q8_0"]
    for r in res["rows"]:
        assert r["ids_equal"] == r["ids_total"] == 6, r
        assert abs(r["bpb_rel"]) <= r["bpb_bound"], r
        assert r["cpp_tok_s"] > 0 and r["ours_tok_s"] > 0
    f32 = res["rows"][0]
    assert f32["greedy_equal"] and f32["max_dlogit"] < 1e-3 and f32["top1"] > 0.99
    assert rc == 0 and res["ok"] and "| q8_0 |" in printed
