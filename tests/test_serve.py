"""The Story studio (bin/serve): started on 127.0.0.1 on a tiny run trained here, driven through gradio_client
(each mode writes, bad input gets a message and the server lives on, the Watch API reads the run) and through
a real headless Chromium (Debian's package, via Playwright): type, press, read a story, see the curve."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="the serve extra is not installed: pip install -e '.[serve]'")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")

from storyllama.serve import ModelStore, ServedRuns, build_app  # noqa: E402
from storyllama.train import main as train_main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
KNOBS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_length=60, seed=1, stories=1, beams=3,
             length_penalty=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(client, model: str, prompt: str = "Once upon a time", mode: str = "sample", **kw):
    k = {**KNOBS, **kw}
    return client.predict(model, prompt, mode, k["temperature"], k["top_k"], k["top_p"], k["repetition_penalty"],
                          k["max_length"], k["seed"], k["stories"], k["beams"], k["length_penalty"], api_name="/write")


@pytest.fixture(scope="module")
def run_dir(builtin_data, tmp_path_factory) -> Path:
    """A tiny model trained 12 steps (2 checkpoints, 2 evaluations): seconds on one core. It is served from its EMA
    weights (the default), a short average of AdamW's steps from a random init: what makes words soonest
    (zero-initialised blocks are still near the identity after 12 steps, and greedy decoding repeats a token)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    assert train_main(["--data", str(builtin_data), "--out", str(out), "--preset", "tiny", "--dim", "64",
                       "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--hidden_dim", "128",
                       "--block_size", "128", "--batch_size", "4", "--total_iters", "12", "--eval_interval", "6",
                       "--eval_iters", "2", "--save_interval", "6", "--sample_tokens", "8", "--device", "cpu",
                       "--log_interval", "1", "--max_lr", "3e-3", "--warmup_iters", "2", "--optimizer", "adamw",
                       "--zero_init", "false", "--ema_decay", "0.5"]) == 0
    return out


@pytest.fixture(scope="module")
def offered(tmp_path_factory) -> Path:
    """The server's --runs_dir: a directory put here is offered as OFFERED/NAME."""
    return tmp_path_factory.mktemp("offered")


@pytest.fixture(scope="module")
def server(run_dir, offered):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    store = ModelStore(device="cpu")
    app = build_app(store, ServedRuns([str(run_dir)], str(offered)), watch_every=2.0)
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
        store.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


@pytest.mark.parametrize("mode", ["sample", "greedy", "beam"])
def test_each_mode_writes_a_story(client, run_dir, mode):
    story, status = write(client, str(run_dir), mode=mode)
    assert story.startswith("Once upon a time") and len(story.split()) > 4 + 3, (story, status)
    assert not status.startswith("error"), status
    assert mode in status and "tokens/s" in status and "stop:" in status and "first token after" in status


def test_greedy_story_is_the_samplers(client, run_dir):
    """The page adds nothing of its own: greedy through the app is bin/sample's greedy story."""
    import torch

    from storyllama.config import SampleConfig
    from storyllama.sample import generate, load_for_sampling

    story, _ = write(client, str(run_dir), prompt="Lily had a", mode="greedy", max_length=40)
    model, enc, _ = load_for_sampling(str(run_dir), torch.device("cpu"), torch.float32)
    ids = generate(model, [enc.encode("Lily had a")], SampleConfig(max_new_tokens=40, temperature=0.0),
                   enc.eot_token, enc.n_vocab)[0]
    assert story == "Lily had a" + enc.decode(ids)


def test_story_request_fields_prompt_with_the_training_template(client, run_dir):
    """Words, features and a summary in the Write tab: the prompt is the request as bin/sample builds it
    (request_prompt, the instruct stage's template), the prompt box the story's first words; the story shown is
    those words and what follows. The same call without the three fields is unchanged (defaults)."""
    import torch

    from storyllama.config import SampleConfig
    from storyllama.sample import generate, load_for_sampling, request_prompt

    k = {**KNOBS, "max_length": 30}
    story, status = client.predict(str(run_dir), "Lily", "greedy", k["temperature"], k["top_k"], k["top_p"],
                                   k["repetition_penalty"], k["max_length"], k["seed"], k["stories"], k["beams"],
                                   k["length_penalty"], "kite, rain", ["dialogue", "happy_ending"], "A kite.",
                                   api_name="/write")
    assert not status.startswith("error"), status
    model, enc, _ = load_for_sampling(str(run_dir), torch.device("cpu"), torch.float32)
    prompt = request_prompt(enc, "kite,rain", "dialogue,happy_ending", "A kite.", "Lily")
    assert enc.decode(prompt).startswith("Words: kite, rain\nFeatures: Dialogue, HappyEnding\nSummary: A kite.\n")
    ids = generate(model, [prompt], SampleConfig(max_new_tokens=30, temperature=0.0), enc.eot_token, enc.n_vocab)[0]
    assert story == "Lily" + enc.decode(ids)
    _, status = client.predict(str(run_dir), "", "greedy", k["temperature"], k["top_k"], k["top_p"],
                               k["repetition_penalty"], k["max_length"], k["seed"], k["stories"], k["beams"],
                               k["length_penalty"], "", ["dialogue"], "  ", api_name="/write")
    assert not status.startswith("error"), status  # features alone make a request; an empty story start is fine


def test_several_stories_and_beams(client, run_dir):
    story, status = write(client, str(run_dir), stories=2, seed=3)
    assert "--- story 1 ---" in story and "--- story 2 ---" in story, story
    story, status = write(client, str(run_dir), mode="beam", stories=2, beams=3)
    assert story.count("--- story") == 2 and "scores:" in status and "3 beams" in status, status


def test_bad_input_gets_a_message_and_the_server_lives_on(client, run_dir, offered):
    _, status = write(client, str(offered / "nowhere"))
    assert status.startswith("error:") and "is not a model this server offers" in status
    (offered / "empty").mkdir()
    _, status = write(client, str(offered / "empty"))  # offered, holds no checkpoint
    assert status.startswith("error:") and "no complete checkpoint" in status
    _, status = write(client, str(run_dir), prompt="Once upon a time, " * 60)
    assert status.startswith("error:") and "exceeds the model's context" in status
    _, status = write(client, str(run_dir), max_length=500)
    assert status.startswith("error:") and "exceeds the model's context" in status
    _, status = write(client, str(run_dir), top_k=-3)
    assert status == "error: top-k must be a whole number in [0, 1,000,000], got -3"
    _, status = write(client, str(run_dir), mode="beam", beams=2, stories=3)
    assert "stories (3) cannot exceed beams (2)" in status
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum"):
        write(client, str(run_dir), temperature=7.0)  # the slider's own bound, said by Gradio
    # a model that fails to load: weights cut short (its checksums then say so)
    broken = offered / "broken"
    from storyllama.checkpoint import resolve

    shutil.copytree(resolve(run_dir), broken)
    (broken / "model_ema.safetensors").write_bytes(b"\x00" * 100)  # the weights it serves: the EMA's
    _, status = write(client, str(broken))
    assert status.startswith("error:") and "model_ema.safetensors" in status, status
    story, status = write(client, str(run_dir))  # still serving
    assert story.startswith("Once upon a time") and not status.startswith("error")


def test_watch_api_reads_the_run(client, run_dir):
    plot, summary, ckpts, samples = client.predict(str(run_dir), api_name="/watch")
    assert "step **12**" in summary and "bits per byte" in summary and "tokens/s" in summary
    names = [row[0] for row in ckpts["data"]]
    assert names == ["step_000006", "step_000012"], ckpts
    assert all(row[3] is not None and row[3] > 0 for row in ckpts["data"])  # val bits/byte of each
    assert "latest" in ckpts["data"][-1][4]
    assert "**step 12:** Once upon a time" in samples  # the story the trainer sampled at its last evaluation
    series = {row[plot["headers"].index("series")] for row in plot["value"]["data"]} if "value" in plot else None
    assert series in ({"train", "validation"}, None)
    _, summary, _, _ = client.predict("/no/such/run", api_name="/watch")
    assert "is not a model this server offers" in summary


def test_bin_serve_binds_localhost_only(run_dir):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "bin/serve"), "--run", str(run_dir), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "bin/serve did not answer within 90 s"
                time.sleep(0.5)
        other = _non_loopback_address()
        if other:
            with pytest.raises(OSError), socket.create_connection((other, port), timeout=2):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    except OSError:
        return None


def test_in_a_real_browser(server, run_dir, tmp_path):
    """Headless Debian Chromium: type a prompt, press the button, a story of 20 words or more appears; the
    Watch tab shows the loss curve. Screenshots go to tmp_path."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    with sync_api.sync_playwright() as pw:
        # a fresh profile per test (Playwright takes the --user-data-dir as this argument)
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1200, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#prompt textarea").fill("Tom and his dog")
            page.locator("#max-length input").fill("100")  # the page's default 200 exceeds this model's context
            page.locator("#write-btn").click()
            story = page.locator("#story textarea")
            page.wait_for_function(
                "() => { const t = document.querySelector('#story textarea');"
                " return t && t.value.trim().split(/\\s+/).length >= 20; }", timeout=60_000)
            assert story.input_value().startswith("Tom and his dog")
            page.wait_for_function("() => document.querySelector('#status textarea').value.includes('tokens/s')",
                                   timeout=60_000)
            page.screenshot(path=str(tmp_path / "write.png"))
            page.get_by_role("tab", name="Watch").click()
            plot = page.locator("#loss-plot")
            plot.locator("canvas, svg").first.wait_for(state="visible", timeout=30_000)
            page.get_by_text("step_000012").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "watch.png"))
        finally:
            browser.close()
    assert (tmp_path / "write.png").stat().st_size > 0 and (tmp_path / "watch.png").stat().st_size > 0


def test_concurrent_writes_are_queued_not_mixed(client, run_dir):
    """Two users at once on one model: each gets exactly the story it would get alone."""
    prompts = ["Lily had a", "The dog ran"]
    alone = [write(client, str(run_dir), prompt=p, mode="greedy", max_length=50)[0] for p in prompts]
    k = {**KNOBS, "max_length": 50}
    jobs = [client.submit(str(run_dir), p, "greedy", k["temperature"], k["top_k"], k["top_p"], k["repetition_penalty"],
                          k["max_length"], k["seed"], 1, 3, 1.0, api_name="/write") for p in prompts]
    assert [j.result()[0] for j in jobs] == alone


def test_a_transformers_directory_writes_the_runs_story(client, run_dir, offered):
    """bin/export's transformers directory is imported once by the page and writes the run's greedy story."""
    pytest.importorskip("transformers", reason="transformers is needed to write the tokenizer.json of the export")
    from storyllama.export import main as export_main

    hf = offered / "hf"
    assert export_main(["--run", str(run_dir), "--out", str(hf)]) == 0
    ours, _ = write(client, str(run_dir), prompt="Lily had a", mode="greedy", max_length=30)
    theirs, status = write(client, str(hf), prompt="Lily had a", mode="greedy", max_length=30)
    assert theirs == ours, status


def test_requests_reach_only_the_runs_the_server_was_given(client, run_dir, offered, tmp_path):
    """Issue 30, class 3, through the HTTP API: another run, a transformers folder, `../` out of --runs_dir, a
    `latest` naming another run, a secret file named `latest`: none is loaded, listed or echoed."""
    from storyllama.checkpoint import resolve

    other = tmp_path / "other"  # a complete run the server was not given
    shutil.copytree(run_dir, other)
    secret = "SECRET-TOKEN-1234"
    (tmp_path / "latest").write_text(secret + "\n")
    for name in (str(other), str(offered / ".." / other.name), f"{offered}/../{other.name}", str(resolve(other)),
                 str(tmp_path), "../" * 8 + str(other).lstrip("/"), "runs/demo"):
        story, status = write(client, name)
        assert story == "" and "is not a model this server offers" in status, (name, status)
        _, summary, ckpts, _ = client.predict(name, api_name="/watch")
        assert "is not a model this server offers" in summary and not ckpts["data"], (name, summary)
    # an offered run whose `latest` points at another run's checkpoint, or holds a secret: its own checkpoint is
    # used, and nothing of the pointer's text comes back
    lied = offered / "lied"
    shutil.copytree(run_dir, lied)
    for text in (str(resolve(other)), "../../" + other.name + "/checkpoints/step_000012", secret):
        (lied / "checkpoints" / "latest").write_text(text + "\n")
        story, status = write(client, str(lied), mode="greedy", max_length=20)
        assert story.startswith("Once upon a time") and secret not in status and "other" not in status, status
        _, summary, ckpts, _ = client.predict(str(lied), api_name="/watch")
        assert secret not in summary and all(secret not in str(c) for row in ckpts["data"] for c in row)
