"""bin/import: a transformers Llama directory or a llama2.c checkpoint becomes a run directory whose model gives
the source's logits and greedy continuation, which the trainer, sampler and exporter take; what we cannot
represent is refused by name, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storyllama import checkpoint
from storyllama.config import SampleConfig
from storyllama.data_prep.builtin import write_stories
from storyllama.data_prep.shards import ShardWriter
from storyllama.data_prep.tokenizer import load_encoding, write_hf_tokenizer
from storyllama.importer import import_model, init_weights_from, main
from storyllama.sample import generate

transformers = pytest.importorskip("transformers", reason="the source models are built with transformers")
REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)


def train_tokenizer(path: Path, vocab: int = 300):
    """A byte-level BPE tokenizer.json with </s> (id 0), trained on built-in stories by `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(write_stories(60, 1), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def hf_model_dir(tmp: Path, tied: bool, **overrides) -> tuple[Path, object]:
    torch.manual_seed(1)
    conf = transformers.LlamaConfig(**{**SHAPE, "tie_word_embeddings": tied, "eos_token_id": 0, "bos_token_id": 0,
                                       **overrides})
    model = transformers.LlamaForCausalLM(conf).eval()
    d = tmp / f"hf_{'tied' if tied else 'untied'}"
    model.save_pretrained(d)
    train_tokenizer(d / "tokenizer.json")
    return d, model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def imported_hf(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import_hf")
    src, hf = hf_model_dir(tmp, request.param)
    run = import_model(src, tmp / "run")
    model, _ = checkpoint.load_model(run)
    return src, hf, run, model


def test_transformers_import_gives_the_source_logits(imported_hf):
    _, hf, _, model = imported_hf
    assert model.cfg.n_kv_heads == 2 and model.cfg.rope_theta == 500.0
    assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    idx = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_transformers_import_greedy_continuation_matches(imported_hf):
    _, hf, run, model = imported_hf
    enc = load_encoding(run)
    prompt = enc.encode_ordinary("Once upon a time there was")
    ours = generate(model, [prompt], SampleConfig(max_new_tokens=20, temperature=0.0), None, model.cfg.vocab_size)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert model.cfg.tie_embeddings or len(set(ours)) > 3


def test_imported_run_is_an_ordinary_run(imported_hf):
    _, _, run, _ = imported_hf
    ckpt = checkpoint.resolve(run)
    assert ckpt.name == "step_000000"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "model_config.json", "trainer_state.json",
                                                "optimizer.pt", "meta.json", "tokenizer.json", "checksums.json"}
    enc = load_encoding(ckpt)
    assert enc.eot_token == 0 and enc.n_vocab == 300
    text = "Once upon a time, Lily saw a big red ball.\n\nShe said \"hi\"."
    assert enc.decode(enc.encode_ordinary(text)) == text
    res = subprocess.run([sys.executable, str(REPO / "bin" / "sample"), "--run", str(run), "--prompt", "Once upon",
                          "--max_length", "8", "--temperature", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Once upon")


# ---------------------------------------------------------------------------------------------
# llama2.c


def meta_llama_logits(sd: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """An independent forward of a Meta/llama2.c-layout Llama: q and k rotate adjacent pairs as complex numbers."""
    dim, H, L = args["dim"], args["n_heads"], args["n_layers"]
    Hkv, D = args["n_kv_heads"], args["dim"] // args["n_heads"]
    B, T = idx.shape
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    rot = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, D/2) complex

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x):  # (B, T, h, D)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)

    h = sd["tok_embeddings.weight"][idx]
    for i in range(L):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, T, H, D)).transpose(1, 2)
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, T, Hkv, D)).transpose(1, 2)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = (q @ k.transpose(-1, -2)) / D ** 0.5 + torch.full((T, T), float("-inf")).triu(1)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, dim)
        h = h + y @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ sd[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


def write_sentencepiece(path: Path, vocab: int = 400) -> None:
    spm = pytest.importorskip("sentencepiece", reason="llama2.c's tokenizer.model is a SentencePiece model")
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(write_stories(200, 2)), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, minloglevel=2)
    path.write_bytes(buf.getvalue())


def write_llama2c(tmp: Path, tied: bool = True) -> tuple[Path, dict, dict]:
    """A llama2.c-style ckpt.pt (its key names, Meta's interleaved q/k, model_args) + tokenizer.model."""
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=448, multiple_of=32, max_seq_len=64,
                dropout=0.0)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    dim, hd, hidden = 64, 16, 192
    sd = {"tok_embeddings.weight": r(448, dim), "norm.weight": 1 + r(dim)}
    for i in range(2):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": r(4 * hd, dim), p + "attention.wk.weight": r(2 * hd, dim),
                   p + "attention.wv.weight": r(2 * hd, dim), p + "attention.wo.weight": r(dim, 4 * hd),
                   p + "feed_forward.w1.weight": r(hidden, dim), p + "feed_forward.w2.weight": r(dim, hidden),
                   p + "feed_forward.w3.weight": r(hidden, dim), p + "attention_norm.weight": 1 + r(dim),
                   p + "ffn_norm.weight": 1 + r(dim)})
    sd["output.weight"] = sd["tok_embeddings.weight"] if tied else r(448, dim)
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "model_args": args, "iter_num": 1000,
            "best_val_loss": 1.5, "config": {"batch_size": 128, "compile": True}}
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, tmp / "ckpt.pt")
    write_sentencepiece(tmp / "tokenizer.model")
    return tmp / "ckpt.pt", sd, args


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama2c_import_gives_the_source_logits_and_greedy(tmp_path, tied):
    pt, sd, args = write_llama2c(tmp_path / "l2c", tied)
    run = import_model(pt, tmp_path / "run")
    model, ckpt = checkpoint.load_model(run)
    assert model.cfg.tie_embeddings == tied and model.cfg.hidden_dim == 192 and model.cfg.block_size == 64
    idx = torch.randint(0, 448, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = meta_llama_logits(sd, args, idx)
        torch.testing.assert_close(model(idx), ref, rtol=1e-4, atol=1e-4)
    # greedy: ours (KV cache) against the reference recomputing the whole sequence each step
    enc = load_encoding(ckpt)
    assert enc.eot_token == 1  # llama2.c separates stories by BOS
    from storyllama.data_prep.tokenizer import load_hf_spec

    assert load_hf_spec(f"hf:{run}").eot_token == 1  # what prepare_data --tokenizer hf:RUN takes
    prompt = [1] + enc.encode_ordinary("Once upon a time")
    ours = generate(model, [prompt], SampleConfig(max_new_tokens=12, temperature=0.0), None, 448)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(meta_llama_logits(sd, args, torch.tensor([seq]))[0, -1].argmax()))
    assert ours == seq[len(prompt):]


def test_llama2c_tokenizer_gives_sentencepiece_ids(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pt, _, _ = write_llama2c(tmp_path / "l2c")
    run = import_model(pt, tmp_path / "run")
    enc = load_encoding(run)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "l2c" / "tokenizer.model"))
    texts = write_stories(40, 9) + ["Tom said: \"Wow!\"\n\nZoë ate 12 cakes 🙂.", "  two  spaces ", ""]
    for text in texts:
        assert enc.encode_ordinary(text) == sp.encode(text)
        assert enc.decode_document(enc.encode_ordinary(text)) == text


def test_llama2c_pickled_code_is_refused(tmp_path, capsys):
    pt, _, _ = write_llama2c(tmp_path / "l2c")
    torch.save({"model": {}, "model_args": {}, "evil": Path("/")}, pt)  # a class: needs unpickling code
    assert main([str(pt), "--out", str(tmp_path / "run")], prog="bin/import") == 2
    err = capsys.readouterr().err
    assert "weights_only" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Refusals


def _no_weights(d: Path) -> None:
    for f in d.glob("*.safetensors"):
        f.unlink()


REFUSALS = {
    "rope_scaling": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), None, "rope scaling"),
    "attention_bias": (dict(attention_bias=True), None, "attention_bias"),
    "mlp_bias": (dict(mlp_bias=True), None, "mlp_bias"),
    "gelu": (dict(hidden_act="gelu"), None, "activation 'gelu'"),
    "head_dim": (dict(head_dim=32), None, "head_dim 32"),
    "vocab": (dict(vocab_size=70_000), None, "70,000"),
    "no_weights": ({}, _no_weights, "has no weights"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unrepresentable_sources_are_refused_by_name(tmp_path, capsys, case):
    overrides, damage, message = REFUSALS[case]
    src = tmp_path / "src"
    conf = transformers.LlamaConfig(**{**SHAPE, **overrides})
    conf.save_pretrained(src)
    if case != "no_weights":  # the config is refused before any weights are read: none are needed
        (src / "model.safetensors").write_bytes(b"")
    else:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(src)
        damage(src)
    train_tokenizer(src / "tokenizer.json")
    capsys.readouterr()  # (transformers' own progress bars)
    rc = main([str(src), "--out", str(tmp_path / "run")], prog="bin/import")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("bin/import: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no temporary left


def test_hub_id_offline_says_how_to_pass_a_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    res = subprocess.run([sys.executable, str(REPO / "bin" / "import"), "someone/tiny-llama-xyz", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2
    assert "cannot reach the Hugging Face hub" in res.stderr and "local directory" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_out_that_is_not_an_untouched_import_is_refused(tmp_path, capsys):
    src, _ = hf_model_dir(tmp_path, tied=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([str(src), "--out", str(mine)], prog="bin/import") == 2
    assert "not written by bin/import" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    run = import_model(src, tmp_path / "run")
    import_model(src, run)  # an untouched earlier import is replaced
    (run / "notes.txt").write_text("mine now")
    assert main([str(src), "--out", str(run)], prog="bin/import") == 2
    assert "changed since" in capsys.readouterr().err and (run / "notes.txt").is_file()


# ---------------------------------------------------------------------------------------------
# Import -> fine-tune -> export -> transformers


def prepare_with(enc, out: Path, stories: list[str]) -> Path:
    """A data directory tokenized with `enc` (what `prepare_data --tokenizer hf:RUN` writes)."""
    from storyllama.data_prep.shards import FORMAT_VERSION

    out.mkdir(parents=True)
    splits = {}
    for split, docs in (("train", stories[:-20]), ("val", stories[-20:])):
        eot = enc.decode_single_token_bytes(enc.eot_token).decode()
        tokens = enc.encode_to_numpy(eot.join(docs) + eot, allowed_special={eot}, disallowed_special=()).astype(
            np.uint16)
        w = ShardWriter(out, split, 1_000_000, np.dtype(np.uint16))
        w.add(tokens)
        names = w.close()
        splits[split] = {"tokens": int(tokens.size), "documents": len(docs), "shards": names,
                         "bytes": sum(len(d.encode()) for d in docs), "shard_token_counts": w.counts}
    meta = {"format_version": FORMAT_VERSION, "tokenizer": write_hf_tokenizer(enc, out), "dtype": "uint16",
            "source": {"kind": "test"}, "options": {}, "splits": splits}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_import_finetune_export_reload_in_transformers(tmp_path):
    from storyllama.export import export
    from storyllama.train import main as train_main

    src, _ = hf_model_dir(tmp_path, tied=False)
    run = import_model(src, tmp_path / "run")
    data = prepare_with(load_encoding(run), tmp_path / "data", write_stories(120, 5))
    before = checkpoint.load_model(run)[0].state_dict()["layers.0.attention.wq.weight"].clone()
    args = ["--data", str(data), "--out", str(run), "--resume", "auto", "--total_iters", "20", "--batch_size", "4",
            "--eval_interval", "10", "--eval_iters", "2", "--save_interval", "10", "--warmup_iters", "2",
            "--sample_tokens", "0", "--device", "cpu", "--log_interval", "10"]
    assert train_main(args) == 0
    tuned, ckpt = checkpoint.load_model(run)
    assert ckpt.name == "step_000020"
    assert not torch.equal(tuned.state_dict()["layers.0.attention.wq.weight"], before)
    assert train_main(args[:4] + ["--eval_only", "--resume", "auto", "--device", "cpu", "--batch_size", "4"]) == 0
    out = export(run, tmp_path / "hf_out")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, tuned(idx), rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Once upon a time", add_special_tokens=False).input_ids == load_encoding(run).encode_ordinary(
        "Once upon a time")


def test_init_weights_from_checks_shape_and_tokenizer(tmp_path):
    from storyllama.model import Llama

    src, _ = hf_model_dir(tmp_path, tied=True)
    run = import_model(src, tmp_path / "run")
    cfg = checkpoint.load_model_config(checkpoint.resolve(run))
    model = Llama(cfg)
    meta = json.loads((run / "meta.json").read_text())
    assert init_weights_from(model, run, meta).name == "step_000000"
    torch.testing.assert_close(model.state_dict()["norm.weight"], checkpoint.load_model(run)[0].norm.weight.data)
    other = {"tokenizer": {**meta["tokenizer"], "sha256": "0" * 64}}
    with pytest.raises(ValueError, match="is not the data's"):
        init_weights_from(model, run, other)
    cfg.n_layers = 3
    with pytest.raises(ValueError, match="n_layers: checkpoint 2, model 3"):
        init_weights_from(Llama(cfg), run)
    shutil.rmtree(run)


def test_imported_runs_export_to_gguf_with_their_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package")
    from storyllama.export import export
    from storyllama.gguf_export import gguf_metadata

    src, _ = hf_model_dir(tmp_path, tied=True)
    m = gguf_metadata(export(import_model(src, tmp_path / "run_hf"), tmp_path / "hf.gguf", format="gguf"))
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert m["tokenizer.ggml.tokens"][:300] == sorted(vocab["vocab"], key=vocab["vocab"].get)
    assert len(m["tokenizer.ggml.merges"]) == len(vocab["merges"]) and m["tokenizer.ggml.eos_token_id"] == 0
    assert m["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL and len(m["tokenizer.ggml.tokens"]) == 300
    assert m["llama.vocab_size"] == 300  # the tokenizer's rows: the model's 20 padding rows are not tokens

    pt, _, _ = write_llama2c(tmp_path / "l2c")
    m = gguf_metadata(export(import_model(pt, tmp_path / "run_l2c"), tmp_path / "l2c.gguf", format="gguf"))
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    assert m["tokenizer.ggml.model"] == "llama" and len(tokens) == 400 and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert m["llama.vocab_size"] == 400  # the SentencePiece model's 400 pieces; the model's 448 rows are cut
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert tokens[3] == "<0x00>"
    merges = json.loads((tmp_path / "run_l2c" / "tokenizer.json").read_text())["model"]["merges"]
    merges = [x if isinstance(x, str) else " ".join(x) for x in merges]
    scores = m["tokenizer.ggml.scores"]
    first, later = (tokens.index(x.replace(" ", "")) for x in (merges[0], merges[10]))
    assert scores[first] == 0.0 and scores[later] <= -10.0  # earlier merges score higher
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (1, 1)
    assert m["tokenizer.ggml.add_bos_token"] is True
