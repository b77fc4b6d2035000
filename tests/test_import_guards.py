"""Models from outside are not trusted (issue 30, class 2): a transformers directory whose config.json or weights
lie is refused by bin/import with one line naming what to change, exit 2, and nothing written. A table: how the
directory is made to lie, the message fragment; then a seeded mutation fuzzer over config.json."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoint import save_checkpoint, tiny_model

from storyllama.export import export
from storyllama.importer import main as import_main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hf")
    _, ckpt = save_checkpoint(tmp, tiny_model(n_layers=2))
    return export(ckpt, tmp / "hf")


def conf_set(**kw):
    def f(d: Path):
        conf = json.loads((d / "config.json").read_text())
        conf.update(kw)
        (d / "config.json").write_text(json.dumps(conf))
    return f


def conf_drop(key):
    def f(d: Path):
        conf = json.loads((d / "config.json").read_text())
        conf.pop(key)
        (d / "config.json").write_text(json.dumps(conf))
    return f


def weights(change):
    def f(d: Path):
        w = load_file(str(d / "model.safetensors"))
        change(w)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return f


def nan_weight(w):
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")


def raw_bytes(data_of):
    def f(d: Path):
        p = d / "model.safetensors"
        p.write_bytes(data_of(p.read_bytes()))
    return f


CASES = {
    "config for 1 layer, weights for 2": (conf_set(num_hidden_layers=1), "tensor(s) its config.json does not describe"),
    "a string for an int": (conf_set(hidden_size="64"), "hidden_size must be a whole number"),
    "null layers": (conf_set(num_hidden_layers=None), "has no num_hidden_layers"),
    "a float for an int": (conf_set(num_attention_heads=4.5), "num_attention_heads must be a whole number"),
    "zero heads": (conf_set(num_attention_heads=0), "num_attention_heads must be a whole number in [1, 1,024], got 0"),
    "negative vocabulary": (conf_set(vocab_size=-5), "vocab_size must be a whole number in [1, 65,536], got -5"),
    "1e9 layers": (conf_set(num_hidden_layers=10**9), "num_hidden_layers must be a whole number in [1, 1,024], got "
                   "1,000,000,000"),
    "1e12 hidden size": (conf_set(hidden_size=10**12), "hidden_size must be a whole number in [1, 65,536], got "
                         "1,000,000,000,000"),
    "a 1e9 context": (conf_set(max_position_embeddings=10**9), "max_position_embeddings must be a whole number in "
                      "[1, 131,072], got 1,000,000,000"),
    "missing intermediate_size": (conf_drop("intermediate_size"), "has no intermediate_size"),
    "NaN eps": (conf_set(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number"),
    "a string theta": (conf_set(rope_theta="big"), "rope_theta must be a finite number"),
    "kv heads not dividing": (conf_set(num_key_value_heads=3), "does not describe a model StoryLlama can build"),
    "tie flag a string": (conf_set(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "holds a JSON list, not the dict"),
    "deeply nested config": (lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                             "nested too deeply"),
    "NaN weights": (weights(nan_weight), "holds NaN or infinite values"),
    "truncated safetensors": (raw_bytes(lambda b: b[: len(b) // 2]), "is not a readable safetensors file"),
    "empty safetensors": (raw_bytes(lambda b: b""), "is not a readable safetensors file"),
    "corrupt header": (raw_bytes(lambda b: b[:8] + b"{garbage" + b[16:]), "is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_lying_model_directory_is_refused_in_one_line(hf_dir, tmp_path, capsys, case):
    make, message = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    make(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rc = import_main([str(src), "--out", str(tmp_path / "out")], prog="bin/import")
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err[-800:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_the_untouched_directory_imports(hf_dir, tmp_path):
    assert import_main([str(hf_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "checkpoints" / "step_000000" / "checksums.json").is_file()


def _mutations(conf: dict, rng: random.Random):
    hostile = [None, "x", -1, 0, 1.5, 10**12, float("inf"), True, [], {}, 2**63, "64"]
    for _ in range(60):
        mutated = dict(conf)
        for key in rng.sample(sorted(conf), k=rng.randint(1, 3)):
            mutated[key] = rng.choice(hostile)
        yield mutated


def test_fuzzed_config_json_never_gives_a_traceback(hf_dir, tmp_path, capsys):
    """Seeded mutations of config.json: each import ends with exit 0 or 2, one line on error, and writes nothing
    outside --out (more rounds: STORYLLAMA_FUZZ_ROUNDS)."""
    import os

    rounds = int(os.environ.get("STORYLLAMA_FUZZ_ROUNDS", "1"))
    conf = json.loads((hf_dir / "config.json").read_text())
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    torch.manual_seed(0)
    for r in range(rounds):
        for i, mutated in enumerate(_mutations(conf, random.Random(1000 + r))):
            (src / "config.json").write_text(json.dumps(mutated))
            out = tmp_path / f"out{r}_{i}"
            try:
                rc = import_main([str(src), "--out", str(out)], prog="bin/import")
            except Exception as e:  # a traceback a user would see
                pytest.fail(f"config {mutated} raised {type(e).__name__}: {e}")
            err = capsys.readouterr().err
            assert rc in (0, 2), (mutated, err)
            assert rc == 0 or (len(err.strip().splitlines()) == 1 and not out.exists()), (mutated, err)
            names = {p.name for p in tmp_path.iterdir()}
            assert all(n == "src" or n.startswith("out") for n in names), names  # no debris beside --out
