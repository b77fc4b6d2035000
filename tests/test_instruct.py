"""Story requests: the TinyStoriesInstruct parser, the loss mask, the template the sampler shares with training,
fine-tuning on requests with --init_from, and the score's word-form rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storyllama.data import RandomBatches, TokenData, bytes_per_token, val_batches
from storyllama.data_prep import builtin
from storyllama.data_prep.instruct import InstructError, Request, encode_pair, parse_instruct_lines, read_pairs
from storyllama.data_prep.prepare import main as prepare_main
from storyllama.data_prep.tokenizer import load_encoding
from storyllama.instruct_score import check_feature, uses_word, word_forms
from storyllama.sample import request_prompt

# The real data set's layout (TinyStoriesInstruct's train.txt): field lines in varying order and subsets,
# "Story: " then the story on the following lines, blocks separated by <|endoftext|> lines.
TSI_FIXTURE = """\
Features: Dialogue, Twist
Words: kite, rain, happy
Summary: Lily loses her kite in the rain, but a surprise makes her happy again.
Random sentence: The wind was very strong.
Story:

Once upon a time, there was a girl named Lily. She had a red kite.
One day it began to rain. "Oh no!" said Lily.

The wind was very strong. But then the sun came out, and Lily was happy.
<|endoftext|>
Summary: Tom shares his toy with Sue.
Words: share, toy, fun
Story:

Tom had a new toy. Sue wanted to play too. Tom shared it, and they had fun.
<|endoftext|>
Random sentence: The cat sat on the mat.
Features: BadEnding
Words: cat, mat, sleep
Story:

The cat sat on the mat. It went to sleep and never woke up in time for dinner.
<|endoftext|>
""".replace("Story:\n", "Story: \n")  # the real files have a space after "Story:"


def test_tinystoriesinstruct_parser_reads_the_real_layout(tmp_path):
    path = tmp_path / "TinyStoriesInstruct-train.txt"
    path.write_text(TSI_FIXTURE)
    pairs = list(read_pairs(path))
    assert len(pairs) == 3
    req, story = pairs[0]
    assert req.words == ("kite", "rain", "happy") and req.features == ("Dialogue", "Twist")
    assert req.summary.startswith("Lily loses her kite") and req.random_sentence == "The wind was very strong."
    assert story.startswith("Once upon a time, there was a girl named Lily.")
    assert story.endswith("Lily was happy.") and "\n" in story  # the story keeps its own lines
    assert pairs[1][0].features == () and pairs[1][0].words == ("share", "toy", "fun")
    assert pairs[2][0].features == ("BadEnding",) and pairs[2][1].startswith("The cat sat on the mat.")
    # the fixed template: fields in one order whatever the file's, "Story:" and a newline at the end
    assert pairs[2][0].text() == ("Words: cat, mat, sleep\nFeatures: BadEnding\n"
                                  "Random sentence: The cat sat on the mat.\nStory:\n")


def test_parser_refuses_a_block_without_a_story_naming_file_and_line(tmp_path):
    path = tmp_path / "broken.txt"
    second_block = "Summary: A dog runs.\nWords: dog, run, fast\nFeatures: Dialogue\n"
    path.write_text(TSI_FIXTURE.split("<|endoftext|>\n")[0] + "<|endoftext|>\n" + second_block + "<|endoftext|>\n")
    first_block_lines = TSI_FIXTURE.split("<|endoftext|>\n")[0].count("\n") + 1  # + its separator line
    with pytest.raises(InstructError, match=rf"broken.txt line {first_block_lines + 1}: .*no 'Story:' line"):
        list(read_pairs(path))
    with pytest.raises(InstructError, match=r"x.txt line 2: the block starting at line 1 has an empty story"):
        list(parse_instruct_lines(["Words: a, b\n", "Story: \n", "\n", "<|endoftext|>\n"], "x.txt"))


def _prepare_jsonl(tmp_path: Path, pairs: list[dict], tokenizer_args: list[str]) -> Path:
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    val.write_text(json.dumps(pairs[0]) + "\n")
    out = tmp_path / "data"
    assert prepare_main(["--train", str(train), "--val", str(val), "--instruct", *tokenizer_args, "--out", str(out),
                         "--num_proc", "1", "--no_progress"]) == 0
    return out


def test_loss_mask_excludes_exactly_the_request_tokens(tmp_path, builtin_data):
    pairs = [{"words": ["kite", "rain"], "features": ["dialogue"], "story": "Lily flew her kite in the rain."},
             {"request": "a story about a frog", "story": 'The frog said, "Hop!" and jumped away.'}]
    tok = ["--tokenizer", "bpe:512", "--tokenizer_file", str(builtin_data / "tokenizer.tiktoken")]
    data = _prepare_jsonl(tmp_path, pairs, tok)
    enc = load_encoding(data)
    expected_tokens, expected_mask = [], []
    for p in pairs:
        req = Request.make(p.get("words"), p.get("features"), request=p.get("request"))
        ids, n_head = encode_pair(enc, req, p["story"])
        assert enc.decode(ids[:n_head]) == req.text() and enc.decode(ids[n_head:-1]) == p["story"]
        expected_tokens += ids
        expected_mask += [0] * n_head + [1] * (len(ids) - n_head)
    td = TokenData(data, "train")
    assert td.shards[0].tolist() == expected_tokens and td.masks[0].tolist() == expected_mask
    # one window over the whole split: the targets are -100 exactly where the target token is a request token
    T = len(expected_tokens) - 1
    x, y = next(val_batches(td, 1, T))
    assert x[0].tolist() == expected_tokens[:-1]
    want = [t if m else -100 for t, m in zip(expected_tokens[1:], expected_mask[1:], strict=True)]
    assert y[0].tolist() == want
    assert (y != -100).sum().item() == sum(expected_mask[1:])  # the first token is never a target
    # bits per byte divide by the stories' bytes per story token (requests are not scored)
    meta = json.loads((data / "meta.json").read_text())
    story_bytes = sum(len(p["story"].encode()) for p in pairs)
    assert meta["splits"]["train"]["bytes"] == story_bytes
    assert bytes_per_token(meta, "train") == story_bytes / sum(expected_mask)
    # the masks are part of the finished output: the same command again finds it complete, a lost mask is damage
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    again = ["--train", str(train), "--val", str(val), "--instruct", *tok, "--out", str(data), "--num_proc", "1"]
    assert prepare_main(again) == 0
    (data / "val_000000.mask").unlink()
    assert prepare_main(again) == 2


@pytest.mark.parametrize("T", [64, 512])  # the pairs are 200-300 tokens: longer than a window, or all fit
def test_doc_aligned_request_windows_start_at_a_request_and_score_the_story_in_view(tmp_path, builtin_data, T):
    """--doc_aligned on request/story data: a window starts at a pair's first request token (or goes on inside a
    pair longer than the window, whose request it then cannot see), its targets are exactly the story tokens
    of the pairs whose request is in view (never one after an EOT input), and the per-window count the trainer
    divides by is that number."""
    pairs = [{"words": list(r.words), "features": list(r.features), "story": story}
             for r, story in builtin.write_instruct_stories(12, seed=5)]
    tok = ["--tokenizer", "bpe:512", "--tokenizer_file", str(builtin_data / "tokenizer.tiktoken")]
    td = TokenData(_prepare_jsonl(tmp_path, pairs, tok), "train")
    tokens, mask = td.shards[0].astype(np.int64), td.masks[0].astype(bool)
    eots = np.flatnonzero(tokens == td.eot_id)
    pairs_at = list(zip(np.concatenate([[0], eots[:-1] + 1]), eots + 1, strict=True))  # [start, end) of each pair
    pair_starts = {int(a) for a, _ in pairs_at}
    whole = set()  # pairs some window holds from their first request token to their EOT
    rb = RandomBatches(td, 1, T, seed=3, doc_aligned=True)
    seen_from_start = 0
    for pos in range(rb.batches_per_epoch):
        (w,) = rb.window_ids(pos)
        start = int(rb.win_start[w])
        x, y = rb.batch_at(pos)
        assert x[0].tolist() == tokens[start : start + T].tolist()
        if start in pair_starts:  # the window opens with a request: its first input is a request token
            seen_from_start += 1
            assert not mask[start]
        request = np.flatnonzero(~mask[start : start + T + 1])  # window offsets of its request tokens
        first = request[0] if len(request) else T + 1  # story tokens before it had their request cut off
        target_mask = mask[start + 1 : start + T + 1] & (np.arange(1, T + 1) >= first)
        target_mask &= tokens[start : start + T] != td.eot_id
        want = np.where(target_mask, tokens[start + 1 : start + T + 1], -100)
        assert y[0].masked_fill(x[0] == td.eot_id, -100).tolist() == want.tolist()
        assert rb.window_targets[w] == rb.step_targets(pos) == target_mask.sum()
        whole |= {a for a, b in pairs_at if start <= a and b <= start + T + 1}
    fits = {a for a, b in pairs_at if b - a <= T + 1}
    assert (fits == whole and len(fits) == len(pairs_at)) if T == 512 else (not fits and seen_from_start > 0)


def test_a_jsonl_pair_without_a_story_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"request": "a frog", "story": "A frog."}) + "\n" + json.dumps({"request": "x"}) + "\n")
    with pytest.raises(InstructError, match=r"pairs.jsonl line 2 has no non-empty string 'story'"):
        list(read_pairs(path))


def test_sampler_request_is_the_training_template(tmp_path, builtin_data):
    """bin/sample --words kite,rain --features dialogue,happy_ending --summary ... builds, token for token, the
    head of the training pair with that request."""
    pair = {"words": "Kite, rain", "features": "Dialogue, HappyEnding", "summary": "A kite  in the rain.",
            "story": "Once upon a time, a kite flew."}
    tok = ["--tokenizer", "bpe:512", "--tokenizer_file", str(builtin_data / "tokenizer.tiktoken")]
    data = _prepare_jsonl(tmp_path, [pair], tok)
    enc = load_encoding(data)
    prompt = request_prompt(enc, "kite,rain", "dialogue,happy_ending", "A kite in the rain.")
    td = TokenData(data, "train")
    head = td.shards[0][: int(np.argmax(td.masks[0]))].tolist()
    assert prompt == head
    assert enc.decode(prompt) == ("Words: kite, rain\nFeatures: Dialogue, HappyEnding\nSummary: A kite in the rain.\n"
                                  "Story:\n")
    with pytest.raises(ValueError, match="unknown story feature 'dragons'"):
        request_prompt(enc, "kite", "dragons")


def test_builtin_writer_emits_pairs_it_honours():
    """Every word a built-in request asks for is one of the writer's slot words and is in its story, the words
    come from different slots where the story has several, and every checkable feature holds by rule."""
    slot_of = {w: slot for slot, words in reversed(builtin.SLOT_WORDS.items()) for w in words}
    sizes = set()
    for i in range(60):
        req, story = builtin.write_instruct_story(1337, i)
        sizes.add(len(req.words))
        assert all(w in slot_of and uses_word(story, w) for w in req.words), (req, story)
        slots = [slot_of[w] for w in req.words]
        assert len(set(slots)) == min(len(slots), len(builtin.slot_words(story))), (req, story)
        for f in req.features:
            assert check_feature(story, f) is True, (f, story)
        if "Dialogue" not in req.features:
            assert '"' not in story
    assert {2, 3} <= sizes <= {1, 2, 3}  # one only where the story has a single slot word
    # the object a story is about is a word a request can name: "blue kite" -> kite
    assert builtin.slot_words("Mia flew her blue kite near the old shed.") == {"object": ["kite"], "plot": ["shed"]}
    # the plain corpus is what it was before requests existed (its meta.json identity is unchanged)
    assert builtin.write_story(1337, 0).startswith("Once upon a time, in a little house near the woods, there lived "
                                                   "a girl named Ros")


@pytest.mark.parametrize(("asked", "story_word", "match"), [
    ("kite", "kites", True), ("kites", "kite", True), ("run", "ran", True), ("run", "running", True),
    ("ran", "runs", True), ("happy", "happier", True), ("make", "making", True), ("stop", "stopped", True),
    ("puppy", "puppies", True), ("cry", "cried", True), ("like", "liked", True), ("mouse", "mice", True),
    ("go", "went", True), ("box", "boxes", True), ("kite", "rain", False), ("red", "reading", False),
    ("bed", "be", False), ("sing", "song", False), ("car", "care", False),
])
def test_score_word_forms(asked, story_word, match):
    assert bool(word_forms(asked) & word_forms(story_word)) is match
    assert uses_word(f"Then the {story_word.capitalize()}, said Tom.", asked) is match


def test_score_feature_rules():
    assert check_feature('Tom said, "Hi!" and left.', "Dialogue") and not check_feature("Tom left.", "Dialogue")
    assert check_feature("Tom played. In the end, Tom learned to share.", "MoralValue")
    assert not check_feature("Tom learned to swim. Then he played all day. He ate. He slept.", "MoralValue")
    assert check_feature("Tom lost his ball. He cried all the way home.", "BadEnding")
    assert check_feature("Tom was not scared anymore. He smiled.", "HappyEnding")
    assert not check_feature("Tom smiled, then he sat alone and felt sad.", "HappyEnding")
    assert check_feature("Tom ran.", "Foreshadowing") is None


def test_init_from_fine_tunes_on_requests_with_a_fresh_optimizer(tmp_path, builtin_data):
    """A pretrained run's weights and a fresh optimizer, step 0, on request data: the loss counts story tokens,
    and the windows are document-aligned by default."""
    from storyllama import checkpoint
    from storyllama.train import main as train_main

    small = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
             "--hidden_dim", "128", "--block_size", "128", "--batch_size", "4", "--device", "cpu", "--eval_iters", "2",
             "--sample_tokens", "0", "--log_interval", "1", "--warmup_iters", "1"]
    pre = tmp_path / "pre"
    assert train_main(["--data", str(builtin_data), "--out", str(pre), *small, "--total_iters", "4"]) == 0
    data = tmp_path / "instruct"
    assert prepare_main(["--builtin", "--instruct", "--builtin_stories", "60", "--tokenizer", "bpe:512",
                         "--tokenizer_file", str(builtin_data / "tokenizer.tiktoken"), "--out", str(data),
                         "--num_proc", "1", "--no_progress", "--val_fraction", "0.2"]) == 0
    batches = RandomBatches(TokenData(data, "train"), 4, 128, seed=1)
    _, y = batches.next_batch()
    # request targets are masked (and story tokens whose request the window cut off), story targets remain
    assert 0 < (y == -100).sum() < y.numel() and (y[:, -1] != -100).any()
    out = tmp_path / "tuned"
    # a learning rate too small to move the weights: the tuned weights are the pretrained ones
    assert train_main(["--data", str(data), "--out", str(out), "--init_from", str(pre), "--total_iters", "2",
                       "--max_lr", "1e-12", "--eval_interval", "2", "--save_interval", "2", "--device", "cpu",
                       "--batch_size", "4", "--eval_iters", "2", "--sample_tokens", "0"]) == 0
    from safetensors.torch import load_file

    w_pre = load_file(str(checkpoint.resolve(pre) / "model.safetensors"))
    w_new = load_file(str(checkpoint.resolve(out) / "model.safetensors"))
    for k, v in w_pre.items():
        torch.testing.assert_close(w_new[k], v, atol=1e-6, rtol=0)
    state = checkpoint.load_state(checkpoint.resolve(out))
    assert state["step"] == 2  # started at step 0
    # request/story data is read document-aligned unless told otherwise; the pretraining on plain text was not
    assert state["train_config"]["doc_aligned"] is True and state["data"]["doc_aligned"] is True
    assert checkpoint.load_state(checkpoint.resolve(pre))["train_config"]["doc_aligned"] is False
    opt = torch.load(checkpoint.resolve(out) / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {2}  # a fresh optimizer: two updates, not 4 + 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val_loss" in m][-1]
    meta = json.loads((data / "meta.json").read_text())
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / np.log(2) / bytes_per_token(meta, "val"))


def test_story_tokens_whose_request_the_window_cut_off_are_no_targets():
    from storyllama.data import masks_with_request_in_view

    # 1 = story token, 0 = request token: a window starting inside a story, one starting with a request, one
    # without any request (all of it the middle of a long story)
    m = np.array([[1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=bool)
    want = np.array([[0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    assert (masks_with_request_in_view(m) == want).all()
