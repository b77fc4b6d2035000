"""bin/export --format gguf, read back with the gguf package alone (no llama.cpp): for each precision
(f32, f16, bf16, q8_0) every metadata field and every tensor is what llama.cpp reads, the tensors dequantise
(gguf.quants.dequantize) to the checkpoint's within the precision's rounding, the vocabulary is exactly the
tokenizer's rows, the Ollama Modelfile beside it is right and replaced only when ours, and no exported file
names a path of the machine that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_checkpoint import EOT_ID, N_VOCAB, save_checkpoint, tiny_model

from storyllama.export import export, hf_tokenizer_for, main

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install -e .[export])")
T, Q = gguf.TokenType, gguf.GGMLQuantizationType

DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# ours (state dict) -> llama.cpp's, per layer
LAYER = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
         "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
         "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[Q, np.ndarray]]]:
    """(metadata, {tensor name: (GGML type, dequantised float32 array shaped (rows, cols) as in torch)})."""
    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists the fastest dimension first
        tensors[t.name] = (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return meta, tensors


def expected_tensors(model, n_vocab: int) -> dict[str, torch.Tensor]:
    """llama.cpp's names -> our weights in its layout: q/k rows permuted to adjacent RoPE pairs, token_embd and
    output cut to the tokenizer's rows. The permutation here is written independently of gguf_export's."""
    cfg, sd = model.cfg, model.state_dict()

    def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
        d = w.shape[0] // heads
        order = [h * d + (i // 2 if i % 2 == 0 else d // 2 + i // 2) for h in range(heads) for i in range(d)]
        return w[order]  # row 2i of a head <- its row i, row 2i+1 <- its row d/2 + i

    want = {"token_embd.weight": sd["tok_embeddings.weight"][:n_vocab], "output_norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        want["output.weight"] = sd["output.weight"][:n_vocab]
    for i in range(cfg.n_layers):
        for theirs, ours in LAYER.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                w = interleave(w, cfg.n_heads)
            elif theirs == "attn_k":
                w = interleave(w, cfg.n_kv_heads)
            want[f"blk.{i}.{theirs}.weight"] = w
    return {k: v.detach().float().numpy() for k, v in want.items()}


def assert_dequantised_close(got: np.ndarray, want: np.ndarray, qtype: Q, name: str) -> None:
    """Within the rounding of the type: exact for F32; half an ulp for F16 (11 bits) and BF16 (8 bits); for Q8_0,
    per block of 32 values, half a step of the block's scale max|x|/127 (its f16 rounding included)."""
    assert got.shape == want.shape, name
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    err = np.abs(got.astype(np.float64) - want)
    if qtype in (Q.F16, Q.BF16):
        bits = 11 if qtype == Q.F16 else 8
        bound = np.abs(want) * 2.0 ** -bits + (2.0 ** -25 if qtype == Q.F16 else 0.0)  # f16 subnormals: 2^-24 apart
    else:
        assert qtype == Q.Q8_0
        # x ~ q * d16 with d = max|x| / 127, q = round(x / d), d16 = d in f16: |error| <= d / 2 + 127 |d16 - d|
        d = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=-1, keepdims=True) / 127
        bound = np.broadcast_to(d * (0.5 + 127 * 2.0 ** -11) * 1.0001 + 1e-12, (*d.shape[:2], 32)).reshape(want.shape)
    assert (err <= bound).all(), f"{name}: max error {err.max():.3g} over the bound {qtype.name}"
    assert not np.array_equal(got, want) or np.abs(want).max() == 0, f"{name}: {qtype.name} rounded nothing"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exports(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_model(tie_embeddings=request.param, rope_theta=500.0)
    _, ckpt = save_checkpoint(tmp, model, step=10)
    paths = {dt: export(ckpt, tmp / f"story-{dt}.gguf", format="gguf", dtype=dt) for dt in DTYPES}
    return model, ckpt, paths


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_tensor_is_the_checkpoints_in_the_precision_asked_for(exports, dtype):
    model, _, paths = exports
    _, tensors = read_gguf(paths[dtype])
    want = expected_tensors(model, N_VOCAB)
    assert set(tensors) == set(want)
    matrix_type = DTYPES[dtype][0]
    for name, w in want.items():
        qtype, got = tensors[name]
        assert qtype == (matrix_type if w.ndim == 2 else Q.F32), name  # 1-D (the norms) stay F32
        assert_dequantised_close(got, w, qtype, name)
    assert tensors["token_embd.weight"][1].shape == (N_VOCAB, model.cfg.dim)  # the tokenizer's rows, not 320
    # the RoPE permutation is not the identity: the stored q rows are not ours as they are
    assert not np.allclose(tensors["blk.0.attn_q.weight"][1], model.state_dict()["layers.0.attention.wq.weight"],
                           atol=1e-2)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_field_is_what_llama_cpp_reads(exports, dtype):
    model, ckpt, paths = exports
    cfg = model.cfg
    meta, _ = read_gguf(paths[dtype])
    hf_tok = hf_tokenizer_for(ckpt)  # the tokenizer as the tokenizers library sees it: an independent reading
    tokens = [hf_tok.id_to_token(i) for i in range(N_VOCAB)]
    assert tokens[EOT_ID] == "<|endoftext|>" and tokens[ord(" ")] == "\u0120" and hf_tok.get_vocab_size() == N_VOCAB
    want = {
        "GGUF.version": 3, "GGUF.tensor_count": 2 + (not cfg.tie_embeddings) + 9 * cfg.n_layers, "GGUF.kv_count": 23,
        "general.architecture": "llama", "general.name": f"story-{dtype}",
        "storyllama.exported_from": "run, step 10",
        "llama.context_length": cfg.block_size, "llama.embedding_length": cfg.dim, "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim, "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.rope.dimension_count": cfg.head_dim,
        "llama.rope.freq_base": 500.0, "llama.vocab_size": N_VOCAB,
        "general.file_type": int(DTYPES[dtype][1]), "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [T.NORMAL] * EOT_ID + [T.CONTROL],
        # single bytes have no merges; llama.cpp needs the key: one that never applies (two multi-character parts)
        "tokenizer.ggml.merges": ["<|endoftext|> <|endoftext|>"],
        "tokenizer.ggml.bos_token_id": EOT_ID, "tokenizer.ggml.eos_token_id": EOT_ID,
        "tokenizer.ggml.add_bos_token": False,
    }
    eps = meta.pop("llama.attention.layer_norm_rms_epsilon")
    assert abs(eps - cfg.norm_eps) < 1e-9 * cfg.norm_eps + 1e-12
    assert meta == want  # every field: none missing, none extra (no [PADn] token)


def test_file_sizes_shrink_with_the_precision(exports):
    _, _, paths = exports
    size = {dt: p.stat().st_size for dt, p in paths.items()}
    assert size["q8_0"] < size["f16"] == size["bf16"] < size["f32"]


def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path, caplog):
    """As llama.cpp's converter: a matrix whose rows (dim 48) are not whole 32-value Q8_0 blocks is written F16."""
    model = tiny_model(dim=48, n_heads=4, n_kv_heads=2, hidden_dim=64)
    _, ckpt = save_checkpoint(tmp_path, model)
    meta, tensors = read_gguf(export(ckpt, tmp_path / "odd.gguf", format="gguf", dtype="q8_0"))
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"][0] == Q.F16 and tensors["blk.0.ffn_down.weight"][0] == Q.Q8_0  # 64 per row
    assert "writing it as F16" in caplog.text
    for name, w in expected_tensors(model, N_VOCAB).items():
        assert_dequantised_close(tensors[name][1], w, tensors[name][0], name)


def test_bin_export_dtype_flag_and_its_line(tmp_path, capsys):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    out = tmp_path / "story.gguf"
    assert main(["--run", str(run), "--out", str(out), "--format", "gguf", "--dtype", "q8_0"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out} (GGUF, llama architecture, q8_0) and {tmp_path / 'story.Modelfile'}"), line
    assert read_gguf(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["--run", str(run), "--out", str(tmp_path / "hf"), "--dtype", "f16"], prog="bin/export") == 2
    assert "--dtype f16 is for --format gguf" in capsys.readouterr().err and not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------
# The Ollama Modelfile: beside the GGUF, staged and replaced like it, and only when ours


def test_modelfile_names_the_file_the_stop_and_the_trained_context(exports):
    model, _, paths = exports
    text = paths["q8_0"].with_name("story-q8_0.Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Ollama Modelfile written by storyllama export"
    assert "FROM ./story-q8_0.gguf" in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert f"PARAMETER num_ctx {model.cfg.block_size}" in lines and 'TEMPLATE "{{ .Prompt }}"' in lines
    assert all(line.startswith(("#", "FROM ", "TEMPLATE ", "PARAMETER ")) for line in lines)


def test_reexport_replaces_gguf_and_modelfile_but_a_users_modelfile_is_refused(tmp_path, capsys):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    out = tmp_path / "story.gguf"
    mf = tmp_path / "story.Modelfile"
    args = ["--run", str(run), "--out", str(out), "--format", "gguf"]
    assert main(args) == 0
    first = mf.read_text()
    mf.write_text(first.replace("num_ctx 64", "num_ctx 9"))  # still ours (the header): a re-export replaces it
    assert main(args + ["--dtype", "f16"]) == 0
    assert mf.read_text() == first and read_gguf(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    before = sorted(p.name for p in tmp_path.iterdir())
    mf.write_text("FROM llama3\nPARAMETER temperature 0.2\n")  # the user's own Modelfile at that name
    gguf_bytes = out.read_bytes()
    capsys.readouterr()
    assert main(args + ["--dtype", "q8_0"], prog="bin/export") == 2
    err = capsys.readouterr().err
    assert "story.Modelfile beside it exists and was not written by bin/export" in err and err.count("\n") == 1
    assert mf.read_text() == "FROM llama3\nPARAMETER temperature 0.2\n" and out.read_bytes() == gguf_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging directory left behind
    # another GGUF in the same directory has its own Modelfile: neither touches the other's
    mf.unlink()
    assert main(args) == 0 and main(["--run", str(run), "--out", str(tmp_path / "tale.gguf"), "--format", "gguf"]) == 0
    assert "FROM ./story.gguf" in mf.read_text() and "FROM ./tale.gguf" in (tmp_path / "tale.Modelfile").read_text()


# ---------------------------------------------------------------------------------------------
# No private paths in what people publish


def test_no_exported_file_names_a_path_of_the_machine_that_wrote_it(tmp_path):
    from tiny_checkpoint import write_tokenizer

    from storyllama import checkpoint

    data = tmp_path / "data"
    write_tokenizer(data)
    meta = json.loads((data / "meta.json").read_text())
    # what bin/prepare_data records: the absolute paths of the files the data came from
    meta["source"] = {"kind": "files", "train": [{"path": str(tmp_path / "stories.jsonl"), "bytes": 10}], "val": None}
    meta["tokenizer"]["source"] = str(tmp_path / "tokenizer-src")
    (data / "meta.json").write_text(json.dumps(meta))
    ckpt = checkpoint.save(tmp_path / "runs" / "demo", 600, tiny_model(), None, {"step": 600}, data_dir=data)
    hf = export(ckpt, tmp_path / "hf")
    files = sorted(p for p in hf.iterdir() if p.is_file())
    assert {p.suffix for p in files} >= {".json", ".md", ".safetensors"}
    for dt in DTYPES:
        files += [export(ckpt, tmp_path / f"m-{dt}.gguf", format="gguf", dtype=dt), tmp_path / f"m-{dt}.Modelfile"]
    private = {str(tmp_path), str(tmp_path.resolve()), str(Path.home()), "pytest-of-"} - {"/"}
    for f in files:
        body = f.read_bytes()
        for p in private:
            assert p.encode() not in body, f"{f.name} holds {p}"
    assert read_gguf(tmp_path / "m-f32.gguf")[0]["storyllama.exported_from"] == "demo, step 600"
    assert "exported from demo, step 600 for Hugging Face" in (hf / "README.md").read_text().replace("\n", " ")
    assert json.loads((hf / "meta.json").read_text()) == {"tokenizer": {k: v for k, v in meta["tokenizer"].items()
                                                                         if k != "source"}}
    from storyllama.data_prep.tokenizer import load_encoding

    assert load_encoding(hf).n_vocab == N_VOCAB  # the published meta.json still loads


# ---------------------------------------------------------------------------------------------
# The GPT-2 vocabulary: 50,257 tokens, the model's 47 padding rows cut


SHARED = Path("/work/shared/data")


@pytest.mark.skipif(not (SHARED / "gpt2.tiktoken").is_file(), reason="gpt2.tiktoken (/work/shared/data) is absent")
def test_gpt2_vocabulary_is_exactly_the_tokenizers_rows(tmp_path):
    from storyllama import checkpoint
    from storyllama.data_prep.tokenizer import EOT, GPT2_PAT_STR, dump_ranks, file_sha256, gpt2_ranks

    ranks = gpt2_ranks(SHARED / "gpt2.tiktoken")
    data = tmp_path / "data"
    data.mkdir()
    dump_ranks(ranks, data / "tokenizer.tiktoken")
    (data / "meta.json").write_text(json.dumps({"tokenizer": {
        "name": "gpt2", "vocab_size": 50257, "eot_id": 50256, "file": "tokenizer.tiktoken",
        "sha256": file_sha256(data / "tokenizer.tiktoken"), "pat_str": GPT2_PAT_STR, "special": EOT}}))
    model = tiny_model(vocab_size=50304, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32)
    ckpt = checkpoint.save(tmp_path / "run", 1, model, None, {"step": 1}, data_dir=data)
    meta, tensors = read_gguf(export(ckpt, tmp_path / "g.gguf", format="gguf", dtype="q8_0"))
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == meta["llama.vocab_size"] == 50257 and tokens[-1] == "<|endoftext|>"
    assert not any(t.startswith("[PAD") for t in tokens) and T.UNUSED not in meta["tokenizer.ggml.token_type"]
    assert tokens[:3] == ["!", '"', "#"] and tokens[220] == "\u0120" and len(meta["tokenizer.ggml.merges"]) >= 50000
    assert tensors["token_embd.weight"][1].shape == tensors["output.weight"][1].shape == (50257, 32)
    hf_tok = hf_tokenizer_for(ckpt)
    assert tokens == [hf_tok.id_to_token(i) for i in range(50257)]
