"""Import / export round trip at the stories110m shape, and sampler speed on the imported model.

    PYTHONPATH=. python benchmarks/import_roundtrip.py --work /tmp/roundtrip [--preset stories110m]

1. builds a LlamaForCausalLM of the preset's shape with random weights and saves it with transformers
   (plus a byte-level tokenizer.json trained on built-in stories);
2. `bin/import DIR --out RUN`, `bin/export --run RUN --out HF`, `bin/export --format gguf`: wall time and peak
   RSS of each, as separate processes;
3. greedy decoding of --new_tokens tokens after one prompt: our KV-cached sampler on the imported run against
   transformers' `generate` on the source directory, in this one process, one after the other;
4. checks that the exported directory's logits equal the source's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tool(cmd: list[str]) -> dict:
    """Run one bin/ tool as a child; its wall time and peak RSS (ru_maxrss of the waited-for child). The parent
    stays small (no torch imported) while tools run: a child's ru_maxrss includes its parent's size at fork."""
    t0 = time.perf_counter()
    pid = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--preset", default="stories110m")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--phase", default="all", choices=["all", "build", "sample"], help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.phase == "build":
        return build(args)
    if args.phase == "sample":
        return sample(args)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--work", str(work), "--preset", args.preset, "--new_tokens",
          str(args.new_tokens)]
    res: dict = {"preset": args.preset, "build_source": run_tool([*me, "--phase", "build"])}
    src = work / "src"
    res["import"] = run_tool(["bin/import", str(src), "--out", str(work / "run")])
    res["export_hf"] = run_tool(["bin/export", "--run", str(work / "run"), "--out", str(work / "hf")])
    res["export_gguf"] = run_tool(["bin/export", "--run", str(work / "run"), "--format", "gguf", "--out",
                                   str(work / "model.gguf")])
    out = subprocess.run([sys.executable, *me, "--phase", "sample"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    res.update(json.loads(out.stdout))
    print(json.dumps(res, indent=1))


def build(args) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from storyllama.config import PRESETS
    from storyllama.data_prep.builtin import write_stories

    work = Path(args.work)
    shape = PRESETS[args.preset]
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
                                    intermediate_size=shape["hidden_dim"], num_hidden_layers=shape["n_layers"],
                                    num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
                                    max_position_embeddings=shape["block_size"], rms_norm_eps=1e-5,
                                    tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    src = work / "src"
    hf = transformers.LlamaForCausalLM(conf).eval()
    hf.save_pretrained(src)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(write_stories(2000, 1), trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(src / "tokenizer.json"))


def sample(args) -> None:
    import torch
    import transformers

    from storyllama import checkpoint
    from storyllama.config import SampleConfig
    from storyllama.data_prep.tokenizer import load_encoding
    from storyllama.sample import generate

    work = Path(args.work)
    hf = transformers.LlamaForCausalLM.from_pretrained(work / "src", dtype=torch.float32).eval()
    model, _ = checkpoint.load_model(work / "run")
    enc = load_encoding(work / "run")
    prompt = enc.encode_ordinary("Once upon a time, there was a little girl named Lily.")
    scfg = SampleConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    generate(model, [prompt], SampleConfig(max_new_tokens=4, temperature=0.0), None, enc.n_vocab)  # warm-up
    t0 = time.perf_counter()
    ours = generate(model, [prompt], scfg, None, enc.n_vocab)[0]
    t_ours = time.perf_counter() - t0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf.generate(ids, do_sample=False, max_new_tokens=4, eos_token_id=None, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        theirs = hf.generate(ids, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        t_hf = time.perf_counter() - t0
        exported = transformers.LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
        x = torch.randint(0, 4096, (1, 64))
        diff = (exported(x).logits - hf(x).logits).abs().max().item()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    n_params = sum(p.numel() for p in hf.parameters())
    res = {"params_M": round(n_params / 1e6, 1), "torch_threads": torch.get_num_threads(),
           "sample": {"new_tokens": args.new_tokens, "ours_tok_s": round(len(ours) / t_ours, 2),
                      "hf_generate_tok_s": round(len(theirs) / t_hf, 2), "greedy_tokens_equal_before_divergence": same},
           "export_logits_max_abs_diff": diff,
           "sample_process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
