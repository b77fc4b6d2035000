"""Input from outside, checked in one place: numbers (`Range`) and JSON files (`read_json`).

Numbers: every count, size, rate and seed a user gives (a command-line
flag, a JSON field of a run file or an imported config, a field of a server request) goes through `Range`
before any work starts, so a wrong type, NaN/inf, or a value that would hang the tool or exhaust memory is one
line naming the field and the range, never an OverflowError, a traceback or an 8 GB allocation.

    Whole(1, 1_024).check(value, "--n_layers")     # int (or an integral float), low <= value <= high
    Real(0, 1, high_open=True).check(v, "dropout") # finite float in [0, 1)
    p.add_argument("--requests", type=Whole(1, 100_000).parse)   # a flag: "200", "2e2"; argparse says the range

The upper bounds are what one machine can hold and what a user of this tool can mean (a context of 131,072,
1,024 layers, 10 million built-in stories); they are generous, not tuning. SEED is the range every seeded
generator here accepts (torch, numpy, random).

JSON files: `read_json(path)` reads a file a tool did not write in this process (a run's meta.json or
trainer_state.json, an imported config.json, a line of JSONL through `parse_json`) and turns every way it can
be wrong (missing, unreadable, not UTF-8, not JSON, nested past any sane depth, not an object) into one
`InputError` naming the file; the caller then checks the fields it uses with `Range` or `field`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path


class InputError(ValueError):
    """Input from outside that cannot be used; the message names the file or field and what is wrong."""


class NumberError(InputError):
    """A number outside its range or of the wrong type; the message names the field and the range."""


def _fmt(x: float) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return f"{int(x):,}"
    return f"{x:g}"


def _shown(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = True
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        return f"{kind} in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}" \
               f"{')' if self.high_open else ']'}"

    def _problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"got {type(value).__name__} {_shown(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"got {value}"
        if self.integer and isinstance(value, float) and not value.is_integer():
            return f"got {value:g}"
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            return f"got {_fmt(value)}"
        return None

    def check(self, value, name: str):
        """`value` as an int (integer ranges) or float, or NumberError naming `name`."""
        problem = self._problem(value)
        if problem:
            raise NumberError(f"{name} must be {self.describe()}, {problem}")
        return int(value) if self.integer else float(value)

    def ok(self, value) -> bool:
        return self._problem(value) is None

    def parse(self, text: str):
        """argparse `type=`: a flag's text -> the checked number ("1e4" is a whole number; argparse names the
        flag in front of the message)."""
        value = _parse_text(text, self.integer)
        if value is None or self._problem(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return int(value) if self.integer else float(value)


def Whole(low: int, high: int) -> Range:  # noqa: N802 - reads as a type in flag definitions
    return Range(low, high, integer=True)


def Real(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Range:  # noqa: N802
    return Range(low, high, integer=False, low_open=low_open, high_open=high_open)


def _parse_text(text: str, integer: bool):
    s = text.strip().replace("_", "")
    try:
        return int(s)
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        return None
    if integer and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


SEED = Whole(0, 2**63 - 1)


MAX_JSON_BYTES = 64 << 20  # no run file or config is near this; a bigger one is not one of ours


def parse_json(text: str, where: str):
    """json.loads, with every failure (including a RecursionError on deeply nested input) one InputError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a file of this tool") from None
    except ValueError as e:
        raise InputError(f"{where} is not JSON ({e})") from None


def read_json(path: str | Path, what: type = dict, max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in `path`, which must be a `what` (dict by default), or InputError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{path} is {size:,} bytes, too large for this kind of file (at most {max_bytes:,})")
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start:,}); it is damaged or not this kind of file") \
            from None
    value = parse_json(text, str(path))
    if not isinstance(value, what):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not the {what.__name__} this file must be")
    return value


def field(obj: dict, key: str, where, kind: type | tuple = (str,), required: bool = True, default=None):
    """obj[key] if it has the type `kind`, else InputError naming `where` and the key (bool is never an int)."""
    if key not in obj or obj[key] is None:
        if required:
            raise InputError(f"{where} has no {key!r}")
        return default
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise InputError(f"{where}: {key!r} must be a {names}, got {type(value).__name__} {_shown(value)}")
    return value
