"""Docs that cannot drift from the tools: every `bin/<tool> ...` and `make <target>` command in README.md and
docs/**/*.md uses only flags the tool's parser knows and targets the Makefile has; the quick data and CPU
training commands run for real on the built-in corpus."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOOLS = ("prepare_data", "train", "sample", "export", "import", "serve", "bench", "instruct_score")
COMMAND = re.compile(r"(?:^|[\s`(;|&])(bin/(?:" + "|".join(TOOLS) + r")|make)\s+([^`\n]*)")


def code_lines(text: str) -> list[str]:
    """The lines of fenced code blocks (continuations joined) and every inline `code` span."""
    lines, fenced = [], re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in fenced:
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return lines


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(tool, flags) for each bin/<tool> command, ("make", [targets]) for each make command."""
    out = []
    for line in code_lines(text):
        line = line.split("#", 1)[0] if not line.lstrip().startswith("python") else line
        for m in COMMAND.finditer(line):
            tool, rest = m.group(1), m.group(2)
            rest = re.split(r"[|;&]|\s#", rest)[0]
            if tool == "make":
                targets = [w for w in rest.split() if re.fullmatch(r"[a-z][a-z-]*", w)][:1]
                if targets:
                    out.append(("make", targets))
                continue
            flags = [f.split("=")[0] for f in re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*(?:=\S*)?", rest)]
            out.append((tool.split("/")[1], flags))
    return out


@cache
def known_flags(tool: str) -> frozenset[str]:
    res = subprocess.run([sys.executable, f"bin/{tool}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-1500:]
    return frozenset(re.findall(r"--[a-zA-Z][\w-]*", res.stdout))


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.M))


def drift(text: str) -> list[str]:
    """Every flag or target the text uses that the tools do not have."""
    problems, targets = [], make_targets()
    for tool, words in commands(text):
        if tool == "make":
            problems += [f"make {w}" for w in words if w not in targets]
        else:
            problems += [f"bin/{tool} {f}" for f in words if f not in known_flags(tool)]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_documented_flag_and_target_exists(page):
    assert drift(page.read_text()) == []


def test_the_checker_sees_commands_and_catches_a_renamed_flag():
    text = (ROOT / "README.md").read_text()
    found = {tool for tool, _ in commands(text)}
    assert {"prepare_data", "train", "sample", "export", "import", "serve", "bench", "make"} <= found, found
    renamed = text.replace("--total_batch_size", "--total_batch_tokens")
    assert "bin/train --total_batch_tokens" in drift(renamed)
    assert "make no-such-target" in drift("```bash\nmake no-such-target\n```\n")
    assert "bin/sample --tempreature" in drift("Run `bin/sample --run R --tempreature 0.8`.")


def test_the_quick_commands_of_the_readme_run_for_real(tmp_path):
    """The README's built-in data command and its CPU training command, as written, on a small built-in corpus."""
    cmds = [shlex.split(ln.split("#")[0]) for ln in code_lines((ROOT / "README.md").read_text())
            if ln.startswith(("bin/prepare_data --builtin", "bin/train --data data/builtin"))]
    assert [c[0] for c in cmds] == ["bin/prepare_data", "bin/train"], cmds
    data, run = str(tmp_path / "builtin"), str(tmp_path / "small")
    prep = [{"data/builtin": data}.get(w, w) for w in cmds[0][1:]]
    train = [{"data/builtin": data, "runs/small": run}.get(w, w) for w in cmds[1][1:]]
    train[train.index("--total_iters") + 1] = "2"
    res = subprocess.run([sys.executable, "bin/prepare_data", *prep, "--builtin_stories", "3000", "--num_proc", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "bin/train", *train, "--batch_size", "2", "--eval_iters", "1",
                          "--sample_tokens", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (Path(run) / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("tool", ["train", "sample"])
def test_every_flag_says_what_it_does_and_its_default(tool):
    """--help is the reference: each flag of the dataclass-built tools has a sentence and its default."""
    if tool == "train":
        from storyllama.train import build_parser
    else:
        from storyllama.sample import build_parser
    missing = []
    for action in build_parser()._actions:
        if action.help in (None, "==SUPPRESS==") or action.dest == "help":
            continue
        what = action.help.split("(default")[0].strip()
        if not what or ("default" not in action.help and action.default not in (None, False)):
            missing.append(action.option_strings[0])
    assert missing == [], missing
