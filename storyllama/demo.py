"""`make demo`: prepare the built-in corpus, train the tiny preset on CPU for a few minutes, tell a story.

Runs offline from a fresh clone. Re-running continues the same run (--resume auto), so a finished
demo goes straight to the story.

It trains with the seed project's optimizer settings (config.SEED_RECIPE: AdamW, decay 0.1, no EMA), not
bin/train's defaults: those were measured on TinyStories, a corpus read 12 times over, and on this
procedural one at 600 steps they came out worse (README, "Two commands").
"""

from __future__ import annotations

import argparse
import sys
import time

DATA, RUN = "data/demo", "runs/demo"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default=RUN)
    p.add_argument("--stories", type=int, default=None, help="built-in corpus size (default: prepare_data's)")
    p.add_argument("--tokenizer", default="bpe:2048")
    p.add_argument("--total_iters", type=int, default=600)
    p.add_argument("--max_time", type=float, default=240.0, help="stop training after this many seconds")
    p.add_argument("--story_tokens", type=int, default=200)
    a = p.parse_args(argv)

    from storyllama.config import SEED_RECIPE
    from storyllama.data_prep.prepare import main as prepare_main
    from storyllama.sample import main as sample_main
    from storyllama.train import main as train_main

    t0 = time.time()
    print(f"[1/3] preparing the built-in story corpus into {a.data} ({a.tokenizer})", flush=True)
    prep = ["--builtin", "--tokenizer", a.tokenizer, "--out", a.data]
    if a.stories is not None:
        prep += ["--builtin_stories", str(a.stories)]
    if prepare_main(prep) != 0:
        return 1
    print(f"[2/3] training the tiny preset on CPU into {a.out}", flush=True)
    rc = train_main(["--data", a.data, "--out", a.out, "--preset", "tiny", "--resume", "auto",
                     "--total_iters", str(a.total_iters), "--max_time", str(a.max_time), "--batch_size", "16",
                     "--max_lr", "2e-3", "--warmup_iters", "30", "--eval_interval", "100", "--eval_iters", "10",
                     "--save_interval", "200", "--block_size", "256", "--dropout", "0.0", "--device", "cpu",
                     *(x for k, v in SEED_RECIPE.items() for x in (f"--{k}", str(v)))])
    if rc != 0:
        return rc
    print("[3/3] a story from the trained model:\n", flush=True)
    rc = sample_main(["--run", a.out, "--prompt", "Once upon a time", "--max_new_tokens", str(a.story_tokens),
                      "--temperature", "0.8", "--top_k", "50", "--seed", "7"])
    print(f"\n\ndone in {time.time() - t0:.0f} s. Checkpoints: {a.out}/checkpoints (latest), metrics: "
          f"{a.out}/metrics.jsonl, loss curve: {a.out}/loss.png.\nSample again with: bin/sample --run {a.out} "
          '--prompt "Once upon a time" --temperature 0.8')
    return rc


if __name__ == "__main__":
    sys.exit(main())
