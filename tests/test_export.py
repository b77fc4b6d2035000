"""bin/export: the directory loads with transformers' LlamaForCausalLM and gives our logits and our greedy
continuation; the tokenizer travels with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import EOT_ID, N_VOCAB, save_checkpoint, tiny_model

from storyllama.config import SampleConfig
from storyllama.export import export, main
from storyllama.sample import generate

transformers = pytest.importorskip("transformers", reason="the exported directory is checked by loading it")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model(tie_embeddings=request.param, rope_theta=500.0)
    _, ckpt = save_checkpoint(tmp, model)
    out = export(ckpt, tmp / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, hf, out


def test_exported_logits_match_ours(exported):
    model, hf, _ = exported
    torch.manual_seed(0)
    idx = torch.randint(0, N_VOCAB, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-5, atol=1e-5)
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    assert hf.config.rope_parameters["rope_theta"] == 500.0


def test_exported_greedy_continuation_matches_ours(exported):
    model, hf, _ = exported
    prompts = [[72, 101, 108, 108, 111], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    ours = generate(model, prompts, SampleConfig(max_new_tokens=30, temperature=0.0), EOT_ID, N_VOCAB)
    for prompt, row in zip(prompts, ours):
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30)[0, len(prompt):].tolist()
        if EOT_ID in ids:  # transformers stops at eos (our EOT) and keeps it; we drop it
            ids = ids[:ids.index(EOT_ID)]
        assert ids == row
        # (a tied random model repeats its input token; the untied one gives a varied continuation)
        assert model.cfg.tie_embeddings or len(set(row)) > 3


def test_exported_directory_carries_the_tokenizer_and_a_readme(exported):
    from storyllama.data_prep.tokenizer import load_encoding

    _, hf, out = exported
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.tiktoken", "meta.json", "README.md", "tokenizer.json",
                                               "tokenizer_config.json", ".storyllama-export.json"}
    enc = load_encoding(out)
    assert enc.n_vocab == N_VOCAB and enc.eot_token == EOT_ID
    readme = (out / "README.md").read_text()
    assert 'pipeline("text-generation"' in readme and "tokenizer.json" in readme
    assert hf.generation_config.eos_token_id == EOT_ID
    assert hf.generation_config.suppress_tokens == list(range(N_VOCAB, 320))


def test_bin_export_cli(tmp_path):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    res = subprocess.run([sys.executable, str(REPO / "bin" / "export"), "--run", str(run), "--out",
                          str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    # exporting again over an earlier export replaces it
    assert main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--run", "{tmp}/nowhere", "--out", "{tmp}/hf"], "no complete checkpoint"),
    (["--checkpoint", "{tmp}/notokenizer", "--out", "{tmp}/hf"], "has no usable meta.json"),
    (["--checkpoint", "{tmp}/notokenizer", "--out", "{tmp}/other"], "was not written by bin/export"),
    (["--checkpoint", "{tmp}/notokenizer", "--out", "{tmp}/hf", "--format", "onnx"], "invalid choice: 'onnx'"),
    (["--run", "{tmp}"], "the following arguments are required: --out"),
])
def test_export_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    from storyllama import checkpoint

    checkpoint.save(tmp_path / "r", 1, tiny_model(), None, {})  # no data dir: no tokenizer files
    (tmp_path / "notokenizer").symlink_to(tmp_path / "r" / "checkpoints" / "step_000001")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    try:
        rc = main([a.format(tmp=tmp_path) for a in args], prog="bin/export")
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and err.startswith("bin/export: error:"), err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# The tokenizer travels as a Hugging Face tokenizer: AutoTokenizer and pipeline() load the directory as it is


def test_autotokenizer_and_pipeline_load_the_export(exported):
    model, _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, a cat sat.\n\nThe end!"
    ids = tok(text).input_ids
    assert ids == list(text.encode()) and tok.decode(ids) == text  # the byte tokenizer: one id per byte
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == EOT_ID
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    story = pipe("Once upon", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ours = generate(model, [list(b"Once upon")], SampleConfig(max_new_tokens=12, temperature=0.0), EOT_ID, N_VOCAB)[0]
    assert story == "Once upon" + bytes(ours).decode("utf-8", errors="replace")


SHARED = Path("/work/shared/data")
VALID = SHARED / "tinystories" / "valid-sample.jsonl"
TRAIN = SHARED / "tinystories" / "train-sample.jsonl"


def _stories(path: Path) -> list[str]:
    import json

    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (VALID.is_file() and TRAIN.is_file() and (SHARED / "gpt2.tiktoken").is_file()),
                    reason="the shared TinyStories samples and gpt2.tiktoken (/work/shared/data) are absent")
@pytest.mark.parametrize("kind", ["gpt2", "bpe:2048"])
def test_exported_tokenizer_json_gives_our_ids_on_the_validation_sample(tmp_path, kind):
    import json

    from tokenizers import Tokenizer

    from storyllama.data_prep.tokenizer import (
        EOT,
        GPT2_PAT_STR,
        dump_ranks,
        file_sha256,
        gpt2_ranks,
        make_encoding,
        train_bpe,
    )

    ranks = gpt2_ranks(SHARED / "gpt2.tiktoken") if kind == "gpt2" else train_bpe(_stories(TRAIN), 2048)
    data = tmp_path / "data"
    data.mkdir()
    dump_ranks(ranks, data / "tokenizer.tiktoken")
    meta = {"tokenizer": {"name": kind, "vocab_size": len(ranks) + 1, "eot_id": len(ranks),
                          "file": "tokenizer.tiktoken", "sha256": file_sha256(data / "tokenizer.tiktoken"),
                          "pat_str": GPT2_PAT_STR, "special": EOT}}
    (data / "meta.json").write_text(json.dumps(meta))
    from storyllama import checkpoint

    model = tiny_model(vocab_size=(len(ranks) + 1 + 63) // 64 * 64)
    ckpt = checkpoint.save(tmp_path / "run", 1, model, None, {"step": 1}, data_dir=data)
    out = export(ckpt, tmp_path / "hf")
    enc = make_encoding(kind, ranks)
    theirs = Tokenizer.from_file(str(out / "tokenizer.json"))
    stories = _stories(VALID)
    for story in stories:
        ids = enc.encode_ordinary(story)
        assert theirs.encode(story, add_special_tokens=False).ids == ids
        assert theirs.decode(ids) == story
    joined = EOT.join(stories[:20]) + EOT  # EOT is the special token, with our id
    assert theirs.encode(joined, add_special_tokens=False).ids == enc.encode(joined, allowed_special="all")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(stories[0]).input_ids == enc.encode_ordinary(stories[0]) and tok.eos_token_id == len(ranks)


# ---------------------------------------------------------------------------------------------
# Nothing the user owns is removed (issue 15): an export replaces only an earlier export


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_into_a_run_directory_is_refused_and_changes_nothing(tmp_path, capsys):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    (run / "config.json").write_text("{}")  # what bin/train leaves at the top of a run
    before = _snapshot(run)
    assert main(["--run", str(run), "--out", str(run)], prog="bin/export") == 2
    err = capsys.readouterr().err
    assert "is a run or checkpoint directory" in err and err.count("\n") == 1
    assert _snapshot(run) == before
    assert main(["--run", str(run), "--out", str(run / "checkpoints" / "step_000010")], prog="bin/export") == 2
    assert _snapshot(run) == before


def test_export_over_user_files_beside_a_config_json_is_refused(tmp_path, capsys):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "notes.md").write_text("my notes")
    before = _snapshot(mine)
    assert main(["--run", str(run), "--out", str(mine)], prog="bin/export") == 2
    assert "was not written by bin/export" in capsys.readouterr().err
    assert _snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine", "run"]


def test_reexport_replaces_an_earlier_export_but_not_files_added_to_it(tmp_path, capsys):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    out = tmp_path / "hf"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    first = _snapshot(out)
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert _snapshot(out).keys() == first.keys()
    (out / "my_eval.txt").write_text("results")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["--run", str(run), "--out", str(out)], prog="bin/export") == 2
    assert "also holds files it did not write (my_eval.txt)" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_second_export_to_the_same_out_is_refused_while_one_runs(tmp_path, capsys):
    from storyllama.staging import Staging

    run, _ = save_checkpoint(tmp_path, tiny_model())
    out = tmp_path / "hf"
    with Staging(out):  # an export in progress: it holds the lock on the staging directory
        res = subprocess.run([sys.executable, str(REPO / "bin" / "export"), "--run", str(run), "--out", str(out)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "is in use by another bin/export" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and not out.exists()
    assert main(["--run", str(run), "--out", str(out)]) == 0  # once it is done, the next one runs


# ---------------------------------------------------------------------------------------------
# GGUF


gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install -e .[export])")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def gguf_export(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_model(tie_embeddings=request.param, rope_theta=500.0)
    _, ckpt = save_checkpoint(tmp, model)
    return model, export(ckpt, tmp / "story.gguf", format="gguf")


# Every field and tensor of the GGUF, in each precision, is checked in tests/test_gguf.py.


def test_gguf_carries_the_bpe_merges(tmp_path):
    import json

    from storyllama.data_prep.builtin import write_stories
    from storyllama.data_prep.tokenizer import EOT, GPT2_PAT_STR, dump_ranks, file_sha256, make_encoding, train_bpe
    from storyllama.gguf_export import gguf_metadata

    ranks = train_bpe(write_stories(100, 3), 300)
    data = tmp_path / "data"
    data.mkdir()
    dump_ranks(ranks, data / "tokenizer.tiktoken")
    meta = {"tokenizer": {"name": "bpe:300", "vocab_size": 300, "eot_id": 299, "file": "tokenizer.tiktoken",
                          "sha256": file_sha256(data / "tokenizer.tiktoken"), "pat_str": GPT2_PAT_STR, "special": EOT}}
    (data / "meta.json").write_text(json.dumps(meta))
    from storyllama import checkpoint

    ckpt = checkpoint.save(tmp_path / "run", 1, tiny_model(), None, {"step": 1}, data_dir=data)
    m = gguf_metadata(export(ckpt, tmp_path / "m.gguf", format="gguf"))
    merges = m["tokenizer.ggml.merges"]
    assert len(merges) >= len(ranks) - 256 and all(len(x.split(" ")) == 2 for x in merges)
    # every merged token is in the vocabulary, and each token past the bytes is made by some merge
    vocab = set(m["tokenizer.ggml.tokens"])
    made = {a + b for a, b in (x.split(" ") for x in merges)}
    assert made <= vocab and set(m["tokenizer.ggml.tokens"][256:299]) <= made
    assert m["tokenizer.ggml.tokens"][make_encoding("b", ranks).encode_ordinary(" the")[0]] == "\u0120the"


def test_gguf_greedy_continuation_in_llama_cpp_matches_ours(gguf_export):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    model, path = gguf_export
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=False, verbose=False)
    prompt = list(b"Once upon")
    ours = generate(model, [prompt], SampleConfig(max_new_tokens=10, temperature=0.0), EOT_ID, N_VOCAB)[0]
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        if tok == EOT_ID or len(theirs) == len(ours):
            break
        theirs.append(tok)
    assert theirs == ours


def test_gguf_over_a_file_it_did_not_write_is_refused(tmp_path, capsys):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    mine = tmp_path / "weights.gguf"
    mine.write_bytes(b"GGUF my own file")
    assert main(["--run", str(run), "--out", str(mine), "--format", "gguf"], prog="bin/export") == 2
    assert "not a GGUF file an earlier export wrote" in capsys.readouterr().err
    assert mine.read_bytes() == b"GGUF my own file"
    out = tmp_path / "story.gguf"
    assert main(["--run", str(run), "--out", str(out), "--format", "gguf"]) == 0
    assert main(["--run", str(run), "--out", str(out), "--format", "gguf"]) == 0  # an earlier export: replaced


@pytest.mark.parametrize("tool", ["export", "import"])
def test_writers_remove_only_staging_directories_they_can_prove_they_made(tmp_path, tool):
    """Folders beside --out with the names the writers once used (`.NAME.export-tmp`, `.NAME.export-old`,
    `.NAME.import-tmp`) are the user's: untouched. A staging directory of ours left by a killed writer (its
    marker, no live lock) is cleaned up; one a live writer holds makes the second writer refuse."""
    from storyllama.staging import STAGING_MARKER, Staging

    run, ckpt = save_checkpoint(tmp_path, tiny_model())
    out = tmp_path / "out"
    users = []
    for name in (f".out.{tool}-tmp", f".out.{tool}-old", ".out.export-tmp.done", f".out.{tool}-mine"):
        d = tmp_path / name
        d.mkdir()
        (d / "notes.txt").write_text("mine")
        users.append(d)
    debris = tmp_path / f".out.{tool}-k1ll3d00"
    debris.mkdir()
    (debris / STAGING_MARKER).write_text("{}")
    (debris / "model.safetensors").write_bytes(b"half")
    if tool == "export":
        export(ckpt, out)
    else:
        from storyllama.importer import main as import_main

        hf = tmp_path / "hf"
        export(ckpt, hf)
        assert import_main([str(hf), "--out", str(out)]) == 0
    assert all((d / "notes.txt").read_text() == "mine" for d in users)
    assert not debris.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert leftovers == sorted(d.name for d in users)  # the writer left nothing of its own beside --out
    with Staging(tmp_path / "again", tool=tool):
        with pytest.raises(ValueError, match=f"in use by another bin/{tool}"):
            with Staging(tmp_path / "again", tool=tool):
                pass
