"""Greedy decoding of one story three ways on the same checkpoint: bin/sample (a fresh process each time), the
same sampler warm in this process, and bin/serve through gradio_client (time to the first text the client sees,
the server's own first-token time and decode tokens/s); plus the server's resident memory before and after
loading the model.

    PYTHONPATH=. python benchmarks/serve_latency.py [RUN_DIR]      (default runs/demo; CPU)
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import time

N, PROMPT, NEW = 3, "Once upon a time", 200


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bin_sample(run: str) -> list[tuple[float, int, float]]:
    out = []
    for _ in range(N):
        r = subprocess.run([sys.executable, "bin/sample", "--run", run, "--prompt", PROMPT, "--max_new_tokens",
                            str(NEW), "--temperature", "0", "--device", "cpu"], capture_output=True, text=True)
        m = re.search(r"prefill .* in ([\d.]+) s; decode (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s", r.stderr)
        out.append((float(m.group(1)), int(m.group(2)), float(m.group(3))))
    return out


def warm_sampler(run: str, in_thread: bool) -> list[tuple[float, int, float]]:
    """in_thread: run generate in a fresh Python thread, as the server does (on a CPU this matters: here a
    worker thread decoded the demo model ~5x faster than the main thread with torch's 2 intra-op threads)."""
    import threading

    import torch

    from storyllama.config import SampleConfig
    from storyllama.sample import generate, load_for_sampling

    model, enc, _ = load_for_sampling(run, torch.device("cpu"), torch.float32)
    out = []
    for i in range(N + 1):  # the first call warms up
        st: dict = {}

        def one(st: dict = st) -> None:
            generate(model, [enc.encode(PROMPT)], SampleConfig(max_new_tokens=NEW, temperature=0.0), enc.eot_token,
                     enc.n_vocab, on_token=lambda ids: None, stats=st)

        if in_thread:
            t = threading.Thread(target=one)
            t.start()
            t.join()
        else:
            one()
        if i:
            out.append((st["prefill_s"], st["new_tokens"], st["new_tokens"] / st["decode_s"]))
    return out


def through_the_app(run: str) -> tuple[list[tuple], float, float]:
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "bin/serve", "--run", run, "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(240):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not up yet
                time.sleep(0.5)
        before = rss_mb(proc.pid)
        out = []
        for i in range(N + 1):  # the first call loads the model: left out
            t0 = time.perf_counter()
            job = client.submit(run, PROMPT, "greedy", 0.0, 0, 1.0, 1.0, NEW, -1, 1, 4, 1.0, api_name="/write")
            first = None
            for story, _ in job:
                if first is None and len(story) > len(PROMPT):
                    first = time.perf_counter() - t0
            total = time.perf_counter() - t0
            _, status = job.result()
            m = re.search(r"(\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s.*first token after ([\d.]+) s", status)
            if i:
                out.append((first, int(m.group(1)), float(m.group(2)), float(m.group(3)), total))
        return out, before, rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
    med = statistics.median
    cli, warm, warm_t = bin_sample(run), warm_sampler(run, False), warm_sampler(run, True)
    app, rss0, rss1 = through_the_app(run)
    print(f"bin/sample (fresh process): first token {1000 * med(c[0] for c in cli):.1f} ms (prefill), "
          f"{med(c[2] for c in cli):.1f} tokens/s decoding, {med(c[1] for c in cli)} tokens")
    print(f"sampler warm, main thread:  first token {1000 * med(w[0] for w in warm):.1f} ms (prefill), "
          f"{med(w[2] for w in warm):.1f} tokens/s decoding")
    print(f"sampler warm, worker thread: first token {1000 * med(w[0] for w in warm_t):.1f} ms (prefill), "
          f"{med(w[2] for w in warm_t):.1f} tokens/s decoding")
    print(f"bin/serve via gradio_client: first text at the client {1000 * med(a[0] for a in app):.1f} ms, server first "
          f"token {1000 * med(a[3] for a in app):.1f} ms, {med(a[2] for a in app):.1f} tokens/s decoding (server), "
          f"{med(a[1] / a[4] for a in app):.1f} tokens/s end to end at the client, {med(a[1] for a in app)} tokens")
    print(f"bin/serve resident memory: {rss0:.0f} MB before any model, {rss1:.0f} MB with the model loaded")


if __name__ == "__main__":
    main()
