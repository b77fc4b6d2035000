"""Docs that cannot drift from the tools.

Every command in README.md and docs/**/*.md (fenced code blocks, with `\\` continuations joined, and inline code;
`torchrun ... bin/train ...` too) is checked against the tool itself: each `--flag` of a `bin/<tool>`,
`python -m storyllama.<demo>` or `benchmarks/<script>` command must be an option of the argparse parser that tool
builds (taken from its build_parser(), or caught where its main() calls parse_args), each `make <target>` a target
of the Makefile, each repository path and `file.py::test` a file and a test that exist, each relative link a file.
Placeholders (`...`, `N`, `[--flag X]`) are allowed; a flag inside brackets must still exist. Then the README's
quick commands run as written on a small built-in corpus. And `--help` is the reference: every flag of every tool
says what it does and its default.
"""

from __future__ import annotations

import argparse
import importlib
import re
import runpy
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


class _Caught(Exception):
    pass


def _caught(run) -> argparse.ArgumentParser:
    """The parser a tool's main() builds, caught when it calls parse_args (nothing after that runs)."""
    def grab(self, *args, **kwargs):
        raise _Caught(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            run()
        except _Caught as c:
            return c.args[0]
    raise AssertionError(f"{run} never called parse_args")


def _builder(module: str):
    return lambda: importlib.import_module(module).build_parser()


def _main(module: str):
    return lambda: _caught(lambda: importlib.import_module(module).main([]))


def _script(path: str):
    return lambda: _caught(lambda: runpy.run_path(str(ROOT / path), run_name="__main__"))


# The command word as the docs write it -> how to get that tool's parser.
PARSERS = {
    "bin/prepare_data": _builder("storyllama.data_prep.prepare"),
    "bin/train": _builder("storyllama.train"),
    "bin/sample": _builder("storyllama.sample"),
    "bin/export": _main("storyllama.export"),  # export.py builds its parser inside main()
    "bin/import": _main("storyllama.importer"),  # so does importer.py
    "bin/serve": _builder("storyllama.serve"),
    "bin/instruct_score": _builder("storyllama.instruct_score"),
    "bin/bench": _builder("storyllama.bench"),
    "python -m storyllama.demo": _main("storyllama.demo"),
    "python -m storyllama.instruct_demo": _main("storyllama.instruct_demo"),
    "benchmarks/train_step.py": _script("benchmarks/train_step.py"),
    "benchmarks/import_roundtrip.py": _script("benchmarks/import_roundtrip.py"),
    "benchmarks/llama_cpp_check.py": _script("benchmarks/llama_cpp_check.py"),
    "benchmarks/decode_profile.py": _script("benchmarks/decode_profile.py"),
}
TOOL = re.compile(r"(?<![\w/.-])(bin/[a-z_]+|make|python -m storyllama\.[a-z_]+|benchmarks/(?!test_)[a-z_]+\.(?:py|sh))"
                  r"(?=\s|$)")
SEPARATOR = re.compile(r"\s(?:&&|\|\||;|\\?\|(?!\s*-))\s")  # shell separators; `| --flag` is an alternative
PATH = re.compile(r"(?<![\w/.-])((?:bin|benchmarks|data_prep|docs|examples|kernels|storyllama|tests)/[\w./-]*\w)"
                  r"(?:::(\w+))?")


def fenced_lines(text: str) -> list[str]:
    """The lines of fenced code blocks, continuations joined, VAR="..." assignments expanded in later lines."""
    lines = []
    for block in re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M):
        env: dict[str, str] = {}
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = re.sub(r"\$(\w+)", lambda m, env=env: env.get(m.group(1), m.group(0)), line)
            if m := re.match(r"\s*([A-Z_]+)=\"([^\"]*)\"\s*$", line):
                env[m.group(1)] = m.group(2)
            lines.append(line)
    return lines


def code_lines(text: str) -> list[str]:
    """fenced_lines(text) and every inline `code` span (which may wrap onto the next line)."""
    lines = fenced_lines(text)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    lines += [s.replace("\n", " ") for s in re.findall(r"`((?:[^`\n]|\n(?!\s*\n))+)`", prose)]
    return lines


def _words(rest: str) -> list[str]:
    rest = re.sub(r"[\[\]]", " ", rest)  # [--flag X]: optional, but the flag must exist
    try:
        return shlex.split(rest)
    except ValueError:  # an unbalanced quote in a placeholder
        return rest.split()


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(command word, its words) for each tool command in the text's code: ("bin/train", ["--data", ...]),
    ("make", ["demo"]), ("benchmarks/gpu_check.sh", ["--dry-run"]), ..."""
    out = []
    for line in code_lines(text):
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]  # a shell comment
        for segment in SEPARATOR.split(line):
            if m := TOOL.search(segment):
                out.append((m.group(1), _words(segment[m.end():])))
    return out


@cache
def known_options(tool: str) -> frozenset[str]:
    if tool.endswith(".sh"):  # a shell script: its options are the --words it handles
        return frozenset(re.findall(r"--[a-z][\w-]*", (ROOT / tool).read_text()))
    parser = PARSERS[tool]()
    return frozenset(s for a in parser._actions for s in a.option_strings)


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def drift(text: str, page: Path = ROOT / "README.md") -> list[str]:
    """Every flag, target, path, test or link the text names that the repository does not have."""
    problems = []
    for tool, words in commands(text):
        if tool == "make":
            target = next((w for w in words if not w.startswith("-") and "=" not in w), None)
            if target is not None and target not in make_targets():
                problems.append(f"make {target}")
            continue
        flags = [w.split("=")[0] for w in words if re.match(r"--?[A-Za-z]", w)]
        if tool.startswith("bin/") and not (ROOT / tool).exists():
            problems.append(f"{tool}: no such tool")
            continue
        if tool not in PARSERS and not tool.endswith(".sh"):
            problems += [f"{tool}: no parser known for {' '.join(flags)}"] if flags else []
            continue
        problems += [f"{tool} {f}" for f in flags if f not in known_options(tool)]
    for line in fenced_lines(text):  # flags on a line of their own: a continuation without its `\`
        if re.match(r"\s*\[?--?[A-Za-z]", line):
            problems.append(f"flags without a command: {line.strip()[:50]}")
    for line in code_lines(text):
        for path, test in PATH.findall(line):
            if not (ROOT / path).exists():
                problems.append(f"{path}: no such file")
            elif test and not re.search(rf"^\s*def {test}\(", (ROOT / path).read_text(), flags=re.M):
                problems.append(f"{path}::{test}: no such test")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:|#", target) and not (page.parent / target.split("#")[0]).exists():
            problems.append(f"link {target}: no such file")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_documented_flag_target_path_and_link_exists(page):
    assert drift(page.read_text(), page) == []


@pytest.mark.parametrize("script", sorted((ROOT / "examples").rglob("*.sbatch")), ids=lambda p: p.name)
def test_the_launchers_commands_exist_too(script):
    text = script.read_text()
    assert "bin/train" in text and drift(f"```bash\n{text}\n```\n", script) == []


def test_the_checker_sees_every_kind_of_command_and_catches_drift():
    text = (ROOT / "README.md").read_text()
    found = {tool for tool, _ in commands(text)}
    assert {f"bin/{t}" for t in ("prepare_data", "train", "sample", "export", "import", "serve", "bench")} | {
        "make"} <= found, found
    # torchrun ... bin/train, a continuation line, an optional [--flag X], VAR="..." then $VAR, make ... && make ...
    md = ("```bash\ntorchrun --standalone --nproc_per_node=2 bin/train --data D \\\n    --out R [--no_such_flag N]\n"
          'T="--batch_size 16 \\\n   --no_such_var_flag 1"\nbin/train --data D $T ...\n'
          "make test-latest && make no-such-target\nbin/serve --run R\n  [--port 8000]\n```\n"
          "Prose with `bin/sample --run R\n--tempreature 0.8` wrapped, and `bin/train --out R --resume auto`.\n"
          "A [link](no/such/page.md), `tests/test_docs.py::test_no_such_test`, `examples/no_such.sbatch`.\n")
    assert drift(md) == ["bin/train --no_such_flag", "bin/train --no_such_var_flag", "make no-such-target",
                         "bin/sample --tempreature", "flags without a command: [--port 8000]",
                         "tests/test_docs.py::test_no_such_test: no such test", "examples/no_such.sbatch: no such file",
                         "link no/such/page.md: no such file"]
    # a flag renamed in a real page is reported where the page uses it
    page = ROOT / "docs" / "training.md"
    renamed = page.read_text().replace("--total_batch_size", "--total_batch_tokens")
    assert "bin/train --total_batch_tokens" in drift(renamed, page)
    assert "bin/export --fromat" in drift("`bin/export --run R --out E --fromat gguf`")


def test_a_flag_renamed_in_the_tool_is_reported_where_the_docs_use_it():
    real = PARSERS["bin/sample"]

    def renamed_sample_parser():
        p = real()
        action = p._option_string_actions["--temperature"]
        action.option_strings = ["--temp" if s == "--temperature" else s for s in action.option_strings]
        return p

    known_options.cache_clear()
    try:
        with mock.patch.dict(PARSERS, {"bin/sample": renamed_sample_parser}):
            problems = drift((ROOT / "README.md").read_text())
    finally:
        known_options.cache_clear()
    assert problems == ["bin/sample --temperature"]


def test_the_quick_commands_of_the_readme_run_for_real(tmp_path):
    """The README's built-in data command, its CPU training command and its first sample command, as written,
    on a small built-in corpus, 2 steps and a few tokens (a docs command that breaks fails here)."""
    lines = [ln for ln in code_lines((ROOT / "README.md").read_text())
             if ln.startswith(("bin/prepare_data --builtin", "bin/train --data data/builtin", "bin/sample --run"))]
    assert [ln.split()[0] for ln in lines[:3]] == ["bin/prepare_data", "bin/train", "bin/sample"], lines
    paths = {"data/builtin": str(tmp_path / "builtin"), "runs/small": str(tmp_path / "small"),
             "runs/demo": str(tmp_path / "small")}
    prep, train, sample = ([paths.get(w, w) for w in shlex.split(ln.split("#")[0])[1:]] for ln in lines[:3])
    train[train.index("--total_iters") + 1] = "2"
    sample[sample.index("--max_length") + 1] = "8"
    for tool, argv in (("prepare_data", prep + ["--builtin_stories", "2000", "--num_proc", "1", "--no_progress"]),
                       ("train", train + ["--batch_size", "2", "--eval_iters", "1", "--sample_tokens", "0"]),
                       ("sample", sample)):
        res = subprocess.run([sys.executable, f"bin/{tool}", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, f"bin/{tool} {' '.join(argv)}\n{res.stderr[-2000:]}"
    assert (tmp_path / "small" / "checkpoints" / "latest").is_file()
    assert res.stdout.strip(), "bin/sample printed no story"


def _says_default(action: argparse.Action) -> bool:
    nothing = action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS)
    return nothing or "default" in (action.help or "")  # (0 == False, so `is`: a default of 0 must be said)


def _says_the_right_default(action: argparse.Action) -> bool:
    """A number or string default written out in the help (not through %(default)s) is the parser's own."""
    d = action.default
    if isinstance(d, bool) or not isinstance(d, (int, float, str)) or "%(default" in (action.help or ""):
        return True
    forms = {str(d)} | ({f"{d:,}", f"{d:g}"} if not isinstance(d, str) else set())
    return any(f in action.help for f in forms)


@pytest.mark.parametrize("tool", [t for t in PARSERS if t.startswith("bin/")])
def test_every_flag_says_what_it_does_and_its_default(tool):
    """--help is the reference: each option (not -h) has a help that says what it does, and its default unless
    the default is None / False / empty / suppressed; a default written out is the parser's own."""
    missing = []
    for action in PARSERS[tool]()._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = (action.option_strings or [action.dest])[0]
        what = (action.help or "").split("(default")[0].strip()
        if not what or not _says_default(action) or not _says_the_right_default(action):
            missing.append(f"{name} (default {action.default!r}): {action.help!r}")
    assert missing == [], "\n".join(missing)
