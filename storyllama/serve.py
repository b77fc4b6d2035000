"""bin/serve: the Story studio, a Gradio page to write stories with a model and to watch a run train.

    bin/serve [--run RUN_DIR ...] [--host 127.0.0.1] [--port 7860] [--share] [--device auto] [--dtype float32]

Write tab: a model path (a run directory, a checkpoint directory, or a transformers Llama directory, which is
imported once into a temporary run directory), a prompt, the sampling knobs, the number of stories and a mode
(sample, greedy, beam), and a story request for a model tuned on requests: words, features, a summary. With
any of those the model is prompted with the request in the training template (storyllama.sample.request_prompt,
as bin/sample --words/--features/--summary), and the prompt box holds the story's first words (may be empty).
Tokens stream into the page as they are decoded; the status line gives the tokens/s,
the time to the first token and why each story stopped. Watch tab: a run's loss curves from metrics.jsonl
(re-read every few seconds while the tab is open, or on the button), its latest numbers (tokens/s, MFU where
logged), its checkpoints with their validation bits per byte.

Models: each resolved checkpoint is loaded once and kept (the `max_models` most recently used); generation
takes the model's lock, so concurrent users are served one after another, never interleaved on one KV cache.
Gradio's queue also runs one write at a time per page event. Bad input (an unknown path, a prompt longer than
the context, a knob out of range, a model that fails to load) is answered in the status line; the server
keeps running. It binds 127.0.0.1 unless --host says otherwise and opens a public link only with --share.

The same actions through Gradio's API (gradio_client), see README "Story studio":
    /write(model, prompt, mode, temperature, top_k, top_p, repetition_penalty, max_length, seed, stories,
           beams, length_penalty, words="", features=[], summary="") -> (story, status)
    /watch(run) -> (curves, summary, checkpoints, samples)
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from storyllama.inputs import SEED, NumberError, Real, Whole

DEFAULT_RUN = "runs/demo"
MODES = ("sample", "greedy", "beam")
REQUEST_FEATURES = ("dialogue", "happy_ending", "bad_ending", "moral", "twist", "foreshadowing", "conflict")
MAX_STORIES, MAX_BEAMS = 8, 16
# Seconds between updates of the page while a story is written: each update costs the decoding thread CPU
# time (the GIL, Gradio's diff and send), which matters for small models that decode hundreds of tokens/s.
STREAM_EVERY = 0.2


class ServeError(ValueError):
    """A message for the page: bad input or a model that cannot be used."""


# -- what a request may reach ------------------------------------------------------------------------------
class ServedRuns:
    """The models and runs this server offers: the --run paths, and the directories directly under --runs_dir
    (looked at again when a name is not found, so new runs appear), each by its name: the path as written on the
    command line (`runs/demo`, or `RUNS_DIR/NAME`). A request names one of them; no path it supplies is opened."""

    def __init__(self, runs: list[str], runs_dir: str | None = None):
        self.fixed = {r.strip(): Path(r.strip()).expanduser() for r in runs if r.strip()}
        self.runs_dir = runs_dir

    def _under_runs_dir(self) -> dict[str, Path]:
        if not self.runs_dir:
            return {}
        root = Path(self.runs_dir).expanduser()
        try:
            found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return {}
        return {str(Path(self.runs_dir) / p.name): p for p in found}

    def names(self) -> list[str]:
        return [*self.fixed, *(n for n in self._under_runs_dir() if n not in self.fixed)]

    def path(self, name: str) -> Path:
        """The directory `name` stands for, or ServeError (which names the choices, never a file's contents)."""
        name = str(name or "").strip()
        if not name:
            raise ServeError("choose a model: one of the runs this server offers")
        p = self.fixed.get(name) or self._under_runs_dir().get(name)
        if p is None:
            shown = name if len(name) <= 80 else name[:77] + "..."
            offered = self.names()
            listed = ", ".join(offered[:6]) + (", ..." if len(offered) > 6 else "")
            raise ServeError(f"{shown!r} is not a model this server offers ({listed or 'none'}); start bin/serve "
                             "with --run PATH or --runs_dir DIR to offer more")
        if not p.exists():
            raise ServeError(f"{name}: no such directory (yet): train it first, or restart bin/serve without it")
        return p


# -- models ---------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: object
    enc: object
    ckpt: Path
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per model


def _is_transformers_dir(p: Path) -> bool:
    """config.json beside weights, and neither a run (checkpoints/) nor one of our checkpoints."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return ((p / "config.json").is_file() and any((p / w).is_file() for w in weights)
            and not (p / "checkpoints").is_dir() and not (p / "model_config.json").is_file())


class ModelStore:
    """Resolved checkpoint -> LoadedModel, loaded once (under a lock), the `max_models` most recent kept."""

    def __init__(self, device: str = "auto", dtype: str = "float32", max_models: int = 2,
                 served: ServedRuns | None = None):
        self.device_name, self.dtype_name, self.max_models = device, dtype, max_models
        self.served = served or ServedRuns([])
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._imports: dict[str, Path] = {}  # transformers dir -> the run directory it was imported into
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="storyllama-serve-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def get(self, name: str) -> LoadedModel:
        """The model of the served run `name` (see ServedRuns), loaded once."""
        from storyllama.checkpoint import CheckpointError, resolve

        p = self.served.path(name)
        with self._lock:  # loads are serialised: two requests for one path load it once
            try:
                if _is_transformers_dir(p):
                    p = self._import(p)
                ckpt = resolve(p)
            except CheckpointError as e:
                raise ServeError(str(e)) from None
            key = str(ckpt.resolve())
            if key not in self._models:
                self._models[key] = self._load(ckpt)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def _import(self, src: Path) -> Path:
        from storyllama.importer import import_model

        key = str(src.resolve())
        if key not in self._imports:
            out = self._tmp / f"import_{len(self._imports)}"
            try:
                import_model(src, out)
            except Exception as e:  # ImportRefused and whatever a damaged directory raises
                raise ServeError(f"cannot import the transformers directory {src}: {_one_line(e)}") from None
            self._imports[key] = out
        return self._imports[key]

    def _load(self, ckpt: Path) -> LoadedModel:
        from storyllama.devices import resolve_device, resolve_dtype
        from storyllama.sample import load_for_sampling

        try:
            model, enc, ckpt = load_for_sampling(str(ckpt), resolve_device(self.device_name),
                                                 resolve_dtype(self.dtype_name))
        except Exception as e:  # any failure to load is a message, not a dead server
            raise ServeError(f"the model in {ckpt} failed to load: {_one_line(e)}") from None
        return LoadedModel(model, enc, ckpt)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# -- writing ----------------------------------------------------------------------------------------------
def sample_config(mode: str, temperature, top_k, top_p, repetition_penalty, max_length, seed, stories, beams,
                  length_penalty):
    """The page's knobs -> SampleConfig, or ServeError naming the knob. top_k 0 and top_p 1 mean off; a seed
    below 0 (or empty) draws a fresh one."""
    from storyllama.config import SampleConfig

    if mode not in MODES:
        raise ServeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    def num(name, v, lo, hi, integer=False):
        rng = Whole(lo, hi) if integer else Real(lo, hi)
        try:
            return rng.check(v, name)
        except NumberError as e:
            raise ServeError(str(e)) from None

    temperature = num("temperature", temperature, 0.0, 5.0)
    top_k = num("top-k", top_k if top_k is not None else 0, 0, 1_000_000, integer=True)
    top_p = num("top-p", top_p if top_p is not None else 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise ServeError("top-p must be above 0 (1 turns it off)")
    repetition_penalty = num("repetition penalty", repetition_penalty, 0.01, 10.0)
    max_length = num("max length", max_length, 1, 100_000, integer=True)
    stories = num("stories", stories, 1, MAX_STORIES, integer=True)
    beams = num("beams", beams, 1, MAX_BEAMS, integer=True) if mode == "beam" else 1
    length_penalty = num("length penalty", length_penalty, -5.0, 5.0) if mode == "beam" else 1.0
    # a seed below 0 (or none) draws a fresh one
    seed = None if seed is None or seed == "" or (isinstance(seed, (int, float)) and not isinstance(seed, bool)
                                                  and seed < 0) else num("seed", seed, 0, SEED.high, integer=True)
    if mode == "beam" and stories > beams:
        raise ServeError(f"stories ({stories}) cannot exceed beams ({beams}) in beam mode")
    try:
        return SampleConfig(max_new_tokens=max_length, temperature=0.0 if mode == "greedy" else temperature,
                            top_k=top_k or None, top_p=None if top_p >= 1.0 else top_p,
                            repetition_penalty=repetition_penalty, num_samples=stories,
                            num_beams=beams, length_penalty=length_penalty, seed=seed)
    except ValueError as e:
        raise ServeError(str(e).replace("--", "")) from None


def _join(prompt: str, texts: list[str]) -> str:
    if len(texts) == 1:
        return prompt + texts[0]
    return "\n\n".join(f"--- story {i + 1} ---\n{prompt}{t}" for i, t in enumerate(texts))


def _load_and_encode(store: ModelStore, model: str, prompt: str, max_new_tokens: int,
                     request: tuple = ("", (), "")) -> tuple:
    """(the loaded model, the prompt's ids), or ServeError saying what is wrong with them. `request` (words,
    features, summary), when any is given, prompts with the request; `prompt` is then the story's start."""
    from storyllama.sample import check_fits, request_prompt

    lm = store.get(model)
    words, features, summary = request
    if (words or "").strip() or features or (summary or "").strip():
        try:
            ids = request_prompt(lm.enc, words or "", list(features or ()), summary or "", prompt)
        except ValueError as e:
            raise ServeError(str(e)) from None
    else:
        ids = lm.enc.encode(prompt, allowed_special="all") or [lm.enc.eot_token]  # empty: a story from scratch
    try:
        check_fits(lm.model, len(ids), max_new_tokens)
    except ValueError as e:
        raise ServeError(str(e).replace("--max_new_tokens", "max length")) from None
    return lm, ids


def write(store: ModelStore, model: str, prompt: str, mode: str, temperature=0.8, top_k=0, top_p=1.0,
          repetition_penalty=1.0, max_length=200, seed=-1, stories=1, beams=4, length_penalty=1.0, words="",
          features=(), summary=""):
    """Generator of (story text, status line): the stories as they are written, then the final numbers."""
    from storyllama.sample import TextStream, beam_search, generate
    t_start = time.perf_counter()
    prompt = prompt or ""
    try:
        cfg = sample_config(mode, temperature, top_k, top_p, repetition_penalty, max_length, seed, stories, beams,
                            length_penalty)
        lm, ids = _load_and_encode(store, model, prompt, cfg.max_new_tokens, (words, features, summary))
    except ServeError as e:
        yield "", f"error: {e}"
        return
    enc, eot = lm.enc, lm.enc.eot_token

    texts = [""] * cfg.num_samples
    stopped = [None] * cfg.num_samples
    state = {"first": None, "error": None, "stats": {}, "version": 0}
    guard = threading.Lock()

    def on_token(row_ids: list[int]) -> None:
        with guard:
            for i, t in enumerate(row_ids):
                if stopped[i] is None:
                    if t == eot:
                        stopped[i] = "end of story"
                    else:
                        streams[i].feed(t)
            state["first"] = state["first"] or time.perf_counter()
            state["version"] += 1

    def on_step(tokens: list[int]) -> None:
        with guard:
            texts[0] = enc.decode(tokens)
            state["first"] = state["first"] or time.perf_counter()
            state["version"] += 1

    streams = [TextStream(enc.decode_single_token_bytes, lambda s, i=i: texts.__setitem__(i, texts[i] + s))
               for i in range(cfg.num_samples)]

    def work() -> None:
        try:
            with lm.lock:
                state["started"] = time.perf_counter()
                if cfg.num_beams > 1 or mode == "beam":
                    hyps = beam_search(lm.model, ids, cfg, eot, enc.n_vocab, on_step=on_step, stats=state["stats"])
                    with guard:
                        kept = hyps[:cfg.num_samples]
                        for i, h in enumerate(kept):
                            texts[i] = enc.decode(h.tokens)
                            stopped[i] = "end of story" if h.stop == "eot" else "max length"
                        del texts[len(kept):]
                        state["beam_scores"] = [h.score for h in kept]
                else:
                    generate(lm.model, [ids] * cfg.num_samples, cfg, eot, enc.n_vocab, on_token=on_token,
                             stats=state["stats"])
                    with guard:
                        for s in streams:
                            s.close()
        except Exception as e:  # reported in the page; the server goes on
            state["error"] = _one_line(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    yield from _follow(worker, guard, state, prompt, texts)
    if state["error"]:
        yield _join(prompt, texts), f"error: {state['error']}"
        return
    yield _join(prompt, texts), _status(cfg, mode, state, t_start, [s or "max length" for s in stopped], lm)


def _follow(worker: threading.Thread, guard: threading.Lock, state: dict, prompt: str, texts: list[str]):
    """While the worker writes: (text so far, status) each time it has written more, every STREAM_EVERY s."""
    seen = -1
    while worker.is_alive():
        worker.join(STREAM_EVERY if seen >= 0 else 0.01)  # the first text as soon as it exists
        with guard:
            if state["version"] == seen:
                continue
            seen = state["version"]
            snapshot = _join(prompt, texts)
            status = "writing..." if "started" in state else "queued: another story is being written with this model"
        yield snapshot, status


def _status(cfg, mode: str, state: dict, t_start: float, stopped: list[str], lm: LoadedModel) -> str:
    st = state["stats"]
    tokens = st["new_tokens"] * st["batch"]
    tps = tokens / max(st["decode_s"], 1e-9)
    first = (state["first"] or time.perf_counter()) - t_start
    kinds = sorted(set(stopped[:len(state.get("beam_scores", stopped))]))
    parts = [f"{mode}", f"{tokens} tokens in {st['prefill_s'] + st['decode_s']:.2f} s ({tps:.1f} tokens/s decoding"
             + (f", {st['batch']} beams" if mode == "beam" else f", batch {st['batch']}") + ")",
             f"first token after {first:.3f} s", "stop: " + ", ".join(kinds), f"model: {lm.ckpt}"]
    if "beam_scores" in state:
        parts.insert(4, "scores: " + ", ".join(f"{s:.3f}" for s in state["beam_scores"]))
    return " · ".join(parts)


# -- watching ---------------------------------------------------------------------------------------------
def _run_dir(served: ServedRuns, name: str) -> Path:
    p = served.path(name)
    if (p / "model.safetensors").is_file() and p.parent.name == "checkpoints":
        return p.parent.parent  # a checkpoint: watch its run
    return p


# The dashboard reads metrics.jsonl incrementally: each refresh reads only the bytes appended since the last one,
# keeps at most MAX_RECORDS records per run, and a first look at a large file reads only its last MAX_FIRST_READ bytes.
MAX_RECORDS = 50_000
MAX_FIRST_READ = 32 << 20
_metrics_cache: dict[Path, tuple[int, int, list[dict]]] = {}  # path -> (inode, offset, records)
_metrics_lock = threading.Lock()


def read_metrics(run: Path) -> list[dict]:
    """The records of run/metrics.jsonl (the latest MAX_RECORDS); torn or unfinished lines are skipped."""
    from storyllama.metrics import read_records

    path = run / "metrics.jsonl"
    try:
        st = path.stat()
    except OSError:
        return []
    with _metrics_lock:
        inode, offset, records = _metrics_cache.get(path, (st.st_ino, 0, []))
        if inode != st.st_ino or st.st_size < offset:  # replaced or rewritten: start again
            offset, records = 0, []
        if offset == 0 and st.st_size > MAX_FIRST_READ:
            offset = _line_start_after(path, st.st_size - MAX_FIRST_READ)
        new, offset = read_records(path, offset, warn=False)
        records = (records + new)[-MAX_RECORDS:]
        _metrics_cache[path] = (st.st_ino, offset, records)
        return records


def _line_start_after(path: Path, pos: int) -> int:
    """The offset of the first line that starts at or after byte `pos`."""
    with open(path, "rb") as f:
        f.seek(max(pos - 1, 0))
        f.readline()
        return f.tell()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def watch(served: ServedRuns, name: str):
    """(curves DataFrame, summary markdown, checkpoints DataFrame, samples markdown) of the served run `name`."""
    import pandas as pd

    curves = pd.DataFrame({"step": [], "loss": [], "series": []})
    ckpts = pd.DataFrame({"checkpoint": [], "step": [], "val loss": [], "val bits/byte": [], "pointer": []})
    try:
        run = _run_dir(served, name)
    except ServeError as e:
        return curves, f"**error:** {e}", ckpts, ""
    recs = read_metrics(run)
    # records whose numbers are not numbers (a damaged or foreign file) are left out, not formatted
    train = [r for r in recs if _number(r.get("loss")) and isinstance(r.get("step"), int)]
    val = [r for r in recs if _number(r.get("val_loss")) and isinstance(r.get("step"), int)]
    rows = [(r["step"], r["loss"], "train") for r in train] + [(r["step"], r["val_loss"], "validation") for r in val]
    if rows:
        curves = pd.DataFrame(rows, columns=["step", "loss", "series"])
    lines = [f"**run** `{name}`"]
    if not recs:
        lines.append("no metrics yet: its metrics.jsonl is missing or empty (bin/train writes it)")
    if train:
        t = train[-1]
        lines.append(f"step **{t['step']}** · train loss **{t['loss']:.4f}** · "
                     f"{t.get('tok_per_s', float('nan')):,.0f} tokens/s"
                     + (f" · MFU **{100 * t['mfu']:.1f}%**" if "mfu" in t else " · MFU not logged (CPU or unknown GPU)")
                     + (f" · {t['tokens']:,} tokens seen" if "tokens" in t else "")
                     + (f" · {t['elapsed_s'] / 60:.1f} min" if "elapsed_s" in t else ""))
    if val:
        v = val[-1]
        lines.append(f"validation at step {v['step']}: loss **{v['val_loss']:.4f}**, "
                     f"**{v.get('val_bpb', float('nan')):.4f}** bits per byte")
    ckpts = _checkpoints(run, {r["step"]: r for r in val}, ckpts)
    samples = [r for r in recs if r.get("sample")]
    if samples:
        sample_md = "\n\n".join(f"**step {r['step']}:** {r['sample']}" for r in samples[-3:][::-1])
    else:
        sample_md = ("No evaluation samples in metrics.jsonl yet (bin/train logs one at each evaluation unless "
                     "--sample_tokens 0). Write one with the latest checkpoint in the Write tab.")
    return curves, "\n\n".join(lines), ckpts, sample_md


def _checkpoints(run: Path, val_by_step: dict[int, dict], empty):
    import pandas as pd

    from storyllama.checkpoint import read_pointer, step_of

    root = run / "checkpoints"
    if not root.is_dir():
        return empty
    pointers = {}
    for name in ("latest", "best"):
        target = read_pointer(root / name)  # a step name or None: never the file's text
        if target is not None:
            pointers.setdefault(target, []).append(name)
    rows = []
    for d in sorted(root.iterdir(), key=lambda d: step_of(d.name) or (-1, 0)):
        s = step_of(d.name)
        if s is None or not d.is_dir():
            continue
        v = val_by_step.get(s[0], {})
        loss, bpb = v.get("val_loss"), v.get("val_bpb")
        rows.append((d.name, s[0], None if loss is None else round(loss, 4), None if bpb is None else round(bpb, 4),
                     " ".join(pointers.get(d.name, []))))
    return pd.DataFrame(rows, columns=list(empty.columns)) if rows else empty


# -- the page -----------------------------------------------------------------------------------------------
def build_app(store: ModelStore, runs: list[str] | ServedRuns, watch_every: float = 5.0):
    """The page. `runs` (names, or a ServedRuns) are what requests may reach; the store serves only those."""
    import gradio as gr

    served = runs if isinstance(runs, ServedRuns) else ServedRuns(runs)
    store.served = served
    runs = served.names()
    default = runs[0] if runs else DEFAULT_RUN

    def watch_run(name: str):
        return watch(served, name)

    with gr.Blocks(title="StoryLlama story studio", analytics_enabled=False) as app:
        gr.Markdown("## StoryLlama story studio")
        with gr.Tab("Write", id="write"):
            with gr.Row():
                model = gr.Dropdown(choices=runs or [default], value=default, allow_custom_value=True, scale=3,
                                    label="Model: one of the runs this server offers (bin/serve --run / --runs_dir)",
                                    elem_id="model")
                mode = gr.Radio(list(MODES), value="sample", label="Mode", elem_id="mode", scale=2)
            prompt = gr.Textbox(value="Once upon a time", label="Prompt", lines=2, elem_id="prompt")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature")
                top_k = gr.Number(value=50, precision=0, label="Top-k (0: off)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p (1: off)")
                repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
            with gr.Row():
                max_length = gr.Number(value=200, precision=0, label="Max length (new tokens)", elem_id="max-length")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                stories = gr.Number(value=1, precision=0, label=f"Stories (1-{MAX_STORIES})")
                beams = gr.Number(value=4, precision=0, label=f"Beams (beam mode, 1-{MAX_BEAMS})")
                length_penalty = gr.Number(value=1.0, label="Length penalty (beam mode)")
            with gr.Accordion("Story request (a model tuned on requests: make instruct)", open=False):
                with gr.Row():
                    words = gr.Textbox(value="", label="Words the story must use (comma-separated)",
                                       placeholder="kite, rain", elem_id="words")
                    features = gr.CheckboxGroup(list(REQUEST_FEATURES), value=[], label="Features",
                                                elem_id="features")
                summary = gr.Textbox(value="", label="Summary (optional)", elem_id="summary")
            button = gr.Button("Write a story", variant="primary", elem_id="write-btn")
            story = gr.Textbox(label="Story", lines=14, elem_id="story", interactive=False)
            status = gr.Textbox(label="Status", lines=1, elem_id="status", interactive=False)
            def write_story(*knobs):
                yield from write(store, *knobs)

            button.click(write_story,
                         [model, prompt, mode, temperature, top_k, top_p, repetition_penalty, max_length, seed,
                          stories, beams, length_penalty, words, features, summary], [story, status], api_name="write",
                         concurrency_limit=1)
        with gr.Tab("Watch", id="watch"):
            with gr.Row():
                run = gr.Dropdown(choices=runs or [default], value=default, allow_custom_value=True, scale=4,
                                  label="Run", elem_id="watch-run")
                refresh = gr.Button("Refresh", scale=1, elem_id="refresh-btn")
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss (nats/token)", height=320,
                               elem_id="loss-plot")
            summary = gr.Markdown(elem_id="watch-summary")
            ckpt_table = gr.Dataframe(label="Checkpoints", interactive=False, elem_id="checkpoints")
            gr.Markdown("**Latest evaluation samples**")
            samples = gr.Markdown(elem_id="samples")
            outputs = [plot, summary, ckpt_table, samples]
            refresh.click(watch_run, [run], outputs, api_name="watch")
            timer = gr.Timer(watch_every)
            timer.tick(watch_run, [run], outputs, api_visibility="private", show_progress="hidden")
            app.load(watch_run, [run], outputs, api_visibility="private")
    return app


def build_parser(prog: str = "serve"):
    from storyllama.checkpoint import add_trust_flag
    from storyllama.config import OneLineErrorParser

    p = OneLineErrorParser(prog=prog, description="The Story studio: write stories and watch runs in a web page.")
    p.add_argument("--run", action="append", default=[],
                   help="a model to offer: run, checkpoint or transformers directory (repeatable); requests name it "
                        f"as written here (default: {DEFAULT_RUN}, when --runs_dir is not given either)")
    p.add_argument("--runs_dir", default=None, help="also offer every directory directly under this one, by the name "
                   "RUNS_DIR/NAME (default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=Whole(1, 65_535).parse, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (anyone with it can read files the server can read)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda (default auto)")
    p.add_argument("--dtype", default="float32", help="weight dtype: float32 or bfloat16 (default float32)")
    p.add_argument("--max_models", type=Whole(1, 64).parse, default=2,
                   help="models kept in memory, the most recently used (default 2)")
    add_trust_flag(p)
    return p


def main(argv: list[str] | None = None, prog: str = "serve") -> int:
    from storyllama.checkpoint import trust_unverified

    a = build_parser(prog).parse_args(argv)
    trust_unverified(a.trust_unverified)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    store = ModelStore(a.device, a.dtype, a.max_models)
    runs = ServedRuns(a.run or ([] if a.runs_dir else [DEFAULT_RUN]), a.runs_dir)
    try:
        app = build_app(store, runs)
        app.queue(default_concurrency_limit=1)
        app.launch(server_name=a.host, server_port=a.port, share=a.share, show_error=True, quiet=False)
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
