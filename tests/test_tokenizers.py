"""The two tokenizer kinds behind one interface: tiktoken ranks and Hugging Face tokenizer.json files. Both
round-trip the shared TinyStories samples exactly; an HF tokenizer answers the names train.py and sample.py use;
a GPT-2 ranks file that is not GPT-2's is refused by its hash."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from storyllama.data_prep.builtin import write_stories
from storyllama.data_prep.hf_tokenizer import HFEncoding, ranks_to_hf_tokenizer, sentencepiece_to_hf_tokenizer
from storyllama.data_prep.tokenizer import (
    EOT,
    GPT2_PAT_STR,
    GPT2_RANKS_SHA256,
    TokenizerError,
    file_sha256,
    gpt2_ranks,
    load_encoding,
    load_hf_spec,
    load_ranks,
    make_encoding,
    ranks_sha256,
    train_bpe,
    write_hf_tokenizer,
)

SHARED = Path("/work/shared/data")
SAMPLES = [SHARED / "tinystories" / f"{s}-sample.jsonl" for s in ("train", "valid")]
GPT2_FILE = SHARED / "gpt2.tiktoken"
needs_samples = pytest.mark.skipif(not all(p.is_file() for p in SAMPLES),
                                   reason="the shared TinyStories samples (/work/shared/data/tinystories) are absent")
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.is_file(), reason=f"GPT-2 ranks file {GPT2_FILE} is absent")
EXTRA = ["Zoë said: \"Wow!\" 🙂\n\n\tThe end.", "  two  spaces ", "<|endoftext|> and </s> as text", "", "\n"]


def stories() -> list[str]:
    return [json.loads(line)["text"] for p in SAMPLES for line in p.read_text().splitlines() if line.strip()]


def byte_level_tokenizer(vocab: int = 1000):
    """A byte-level BPE tokenizer.json trained by `tokenizers` (GPT-2-like), with </s> as its end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(write_stories(300, 4), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def llama_style_tokenizer(tmp_path: Path):
    """Llama-2's kind: SentencePiece BPE with byte fallback and a dummy prefix, converted to tokenizer.json."""
    spm = pytest.importorskip("sentencepiece", reason="the Llama-style tokenizer is made from a SentencePiece model")
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(write_stories(300, 4)), model_writer=buf, vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok, bos, eos = sentencepiece_to_hf_tokenizer(tmp_path / "tokenizer.model")
    return tok, eos, spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))


def _kinds(tmp_path: Path) -> dict:
    bl = byte_level_tokenizer()
    llama, eos, _ = llama_style_tokenizer(tmp_path)
    return {"hf-byte-level": HFEncoding(bl, bl.token_to_id("</s>")), "hf-llama": HFEncoding(llama, eos)}


@needs_samples
def test_every_kind_round_trips_the_shared_samples_exactly(tmp_path):
    texts = stories() + EXTRA
    encs = _kinds(tmp_path)
    encs["bpe:2048"] = make_encoding("bpe:2048", train_bpe(texts[:500], 2048))
    if GPT2_FILE.is_file():
        encs["gpt2"] = make_encoding("gpt2", gpt2_ranks(GPT2_FILE))
    for name, enc in encs.items():
        for text in texts:
            ids = enc.encode_ordinary(text)
            back = enc.decode_document(ids) if isinstance(enc, HFEncoding) else enc.decode(ids)
            assert back == text, (name, text[:60])
            assert b"".join(enc.decode_single_token_bytes(i) for i in ids).decode() == enc.decode(ids), name


def test_llama_style_tokenizer_gives_sentencepiece_ids(tmp_path):
    tok, eos, sp = llama_style_tokenizer(tmp_path)
    enc = HFEncoding(tok, eos)
    assert enc.dummy_prefix == " " and enc.n_vocab == 600 and enc.eot_token == 2
    texts = (stories()[:300] if all(p.is_file() for p in SAMPLES) else write_stories(50, 8)) + EXTRA
    for text in texts:
        assert enc.encode_ordinary(text) == sp.encode(text)
    # tiktoken's semantics: decode concatenates, so prompt + decode(continuation) reads right
    ids = enc.encode_ordinary("Once upon a time there was")
    cut = len(enc.encode_ordinary("Once upon a time"))
    assert enc.decode(ids[cut:]) == " there was"


def test_hf_encoding_answers_the_tiktoken_names(tmp_path):
    enc = _kinds(tmp_path)["hf-byte-level"]
    eot = "</s>"
    docs = write_stories(5, 1) + ["a story that says </s> in its text"]
    # documents joined by the EOT text with it allowed == each document alone followed by EOT (encode.py's fast path)
    joined = enc.encode_to_numpy(eot.join(docs) + eot, allowed_special={eot}, disallowed_special=())
    per_doc = np.concatenate([np.array(enc.encode_ordinary(d) + [enc.eot_token]) for d in docs[:-1]])
    assert joined.dtype == np.uint32 and joined[:per_doc.size].tolist() == per_doc.tolist()
    assert enc.eot_token not in enc.encode_ordinary("say </s>")  # special text in a story is plain text
    assert enc.encode("hi </s>", allowed_special="all")[-1] == enc.eot_token
    with pytest.raises(ValueError, match="special token '</s>'"):
        enc.encode("hi </s>")
    assert enc.n_vocab == 1000 and enc.name == "hf"


def test_data_directory_with_a_tokenizer_json_loads_by_its_meta(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    byte_level_tokenizer().save(str(src / "tokenizer.json"))
    (src / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    enc = load_hf_spec(f"hf:{src}")
    assert enc.eot_token == 1
    data = tmp_path / "data"
    data.mkdir()
    entry = write_hf_tokenizer(enc, data, source=str(src))
    (data / "meta.json").write_text(json.dumps({"tokenizer": entry}))
    again = load_encoding(data)
    assert isinstance(again, HFEncoding) and again.eot_token == 1 and again.n_vocab == enc.n_vocab
    # written again from the loaded copy: the same bytes, so the trainer's tokenizer check (name + sha256) agrees
    other = tmp_path / "other"
    other.mkdir()
    assert write_hf_tokenizer(again, other)["sha256"] == entry["sha256"] == file_sha256(data / "tokenizer.json")
    (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text().replace("</s>", "<s/>"))
    with pytest.raises(TokenizerError, match="sha256 differs"):
        load_encoding(data)


def test_hf_vocabulary_over_65536_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"</s>": 70_000}, unk_token="w0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"70,001 tokens, more than the 65,536"):
        load_hf_spec(f"hf:{tmp_path}")
    with pytest.raises(TokenizerError, match="holds no tokenizer.json"):
        load_hf_spec(f"hf:{tmp_path / 'nowhere'}")


@needs_samples
def test_tiktoken_ranks_convert_to_a_tokenizer_json_with_the_same_ids():
    texts = stories()
    ranks = train_bpe(texts[:500], 1024)
    enc = make_encoding("bpe:1024", ranks)
    hf = HFEncoding(ranks_to_hf_tokenizer(ranks, GPT2_PAT_STR, {EOT: len(ranks)}), len(ranks))
    for text in texts + EXTRA:
        assert hf.encode_ordinary(text) == enc.encode_ordinary(text)


# ---------------------------------------------------------------------------------------------
# GPT-2's ranks are checked by hash (issue 15)


@needs_gpt2
def test_gpt2_known_hash_is_the_published_file():
    assert file_sha256(GPT2_FILE) == GPT2_RANKS_SHA256 == ranks_sha256(load_ranks(GPT2_FILE))


@needs_gpt2
def test_gpt2_file_with_two_ranks_swapped_is_refused_naming_both_hashes(tmp_path, capsys):
    lines = GPT2_FILE.read_bytes().splitlines()
    a, b = lines[1000].split(), lines[2000].split()
    lines[1000], lines[2000] = a[0] + b" " + b[1], b[0] + b" " + a[1]  # tokens keep their lines, ranks swap
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    assert base64.b64decode(a[0]) != base64.b64decode(b[0])
    digest = ranks_sha256(load_ranks(bad))  # still a valid ranks file: only the hash tells
    with pytest.raises(TokenizerError) as e:
        gpt2_ranks(bad)
    msg = str(e.value)
    assert str(bad) in msg and digest in msg and GPT2_RANKS_SHA256 in msg and "--tokenizer bpe:50257" in msg
    # the same file, reformatted (another order of lines) but with GPT-2's ranks, is accepted
    shuffled = tmp_path / "shuffled.tiktoken"
    good = GPT2_FILE.read_bytes().splitlines()
    shuffled.write_bytes(b"\n".join(good[::-1]) + b"\n")
    assert len(gpt2_ranks(shuffled)) == 50_256
    from storyllama.data_prep.prepare import main as prepare_main

    rc = prepare_main(["--builtin", "--builtin_stories", "20", "--tokenizer", "gpt2", "--tokenizer_file", str(bad),
                       "--out", str(tmp_path / "data"), "--num_proc", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not GPT-2's ranks" in err and "Traceback" not in err
