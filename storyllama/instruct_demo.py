"""`make instruct`: tune the demo model to write the story a reader asks for, offline, in about 9 CPU minutes.

1. the pretrained demo run (runs/demo; `make demo` trains it first when it has no checkpoint);
2. request/story pairs from the built-in writer (`bin/prepare_data --builtin --instruct`), tokenized with the
   demo run's own tokenizer, so `--init_from` applies;
3. `bin/train --init_from runs/demo` on them: its weights, a fresh optimizer, step 0, the loss on the story
   tokens only; on request/story data `--doc_aligned` is on by default: each window opens with a request and
   attends inside its pair (README, "Story requests");
4. a story for a request (`bin/sample --words ... --features ...`), and which asked-for words and features it
   has, by the score's rules (storyllama.instruct_score).

Re-running continues the same run (--resume auto), so a finished one goes straight to the story.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DATA, RUN, PRETRAINED = "data/demo-instruct", "runs/demo-instruct", "runs/demo"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default=PRETRAINED, help="the run to start from (default: the demo's)")
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default=RUN)
    # 60,000 pairs (10 MB of tokens, made in about 20 s): the 1,000 steps read 4M tokens, so no pair is read
    # twice (aligned windows are the same every epoch)
    p.add_argument("--stories", type=int, default=60_000, help="built-in request/story pairs")
    # 1,000 document-aligned steps at 2e-3 (README, "Story requests": the measured runs); a re-run continues a
    # run the time limit stopped
    p.add_argument("--total_iters", type=int, default=1000)
    p.add_argument("--max_lr", type=float, default=2e-3)
    p.add_argument("--max_time", type=float, default=900.0, help="stop training after this many seconds")
    p.add_argument("--words", default="kite,rain")
    p.add_argument("--features", default="dialogue,happy_ending")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)

    from storyllama.data_prep.prepare import main as prepare_main
    from storyllama.train import main as train_main

    t0 = time.time()
    pre = Path(a.pretrained)
    if not (pre / "checkpoints" / "latest").exists():
        if a.pretrained != PRETRAINED:
            print(f"error: {pre} has no checkpoint", file=sys.stderr)
            return 2
        print(f"[0/3] {pre} has no checkpoint: training the demo model first (make demo)", flush=True)
        from storyllama.demo import main as demo_main

        if demo_main([]) != 0:
            return 1
    tok = json.loads((pre / "meta.json").read_text())["tokenizer"]
    print(f"[1/3] preparing built-in request/story pairs into {a.data} ({tok['name']}, {pre}'s tokenizer)", flush=True)
    prep = ["--builtin", "--instruct", "--tokenizer", tok["name"], "--tokenizer_file", str(pre / tok["file"]),
            "--out", a.data, "--builtin_stories", str(a.stories)]
    if prepare_main(prep) != 0:
        return 1
    print(f"[2/3] tuning {pre} on the requests into {a.out} (the loss counts the story tokens only)", flush=True)
    rc = train_main(["--data", a.data, "--out", a.out, "--init_from", str(pre), "--resume", "auto",
                     "--total_iters", str(a.total_iters), "--max_time", str(a.max_time), "--batch_size", "16",
                     "--max_lr", str(a.max_lr), "--warmup_iters", "20", "--eval_interval", "250", "--eval_iters", "10",
                     "--save_interval", "200", "--dropout", "0.0", "--device", "cpu", "--sample_tokens", "0"])
    if rc != 0:
        return rc
    print(f"[3/3] a story for the request: words {a.words}; features {a.features}\n", flush=True)
    rc = tell(a.out, a.words, a.features, a.seed)
    print(f"\ndone in {time.time() - t0:.0f} s. Ask for another: bin/sample --run {a.out} --words kite,rain "
          f"--features dialogue,happy_ending --temperature 0.7\nScore it against {pre}: bin/instruct_score --run "
          f"{pre} --run {a.out}")
    return rc


def tell(run: str, words: str, features: str, seed: int) -> int:
    """Write one story for the request, print it and which asked-for words and features it has."""
    import torch

    from storyllama.config import SampleConfig
    from storyllama.data_prep.instruct import Request
    from storyllama.instruct_score import check_feature, uses_word
    from storyllama.sample import generate, load_for_sampling, request_prompt

    model, enc, _ = load_for_sampling(run, torch.device("cpu"), torch.float32)
    prompt = request_prompt(enc, words, features)
    cfg = SampleConfig(max_new_tokens=min(220, model.cfg.block_size - len(prompt)), temperature=0.7, top_k=50,
                       seed=seed)
    ids = generate(model, [prompt], cfg, enc.eot_token, enc.n_vocab)[0]
    story = enc.decode([t for t in ids if t != enc.eot_token and t < enc.n_vocab])
    print(enc.decode(prompt) + story)
    req = Request.make(words, features)
    marks = [f"{w} {'yes' if uses_word(story, w) else 'NO'}" for w in req.words]
    marks += [f"{f} {'yes' if ok else 'NO'}" for f in req.features if (ok := check_feature(story, f)) is not None]
    print("\nasked for: " + ", ".join(marks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
