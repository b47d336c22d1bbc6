"""Checks for values entering the runtime: a caller's arguments and a manifest's values.

Each check names the value and the range it allows, so bad input fails where it enters
(TypeError for the wrong kind of value, ValueError for one out of range) instead of deep
inside numpy, onnxruntime, a tokenizer or a template. Standard library only: the manifest
(runtime/manifest.py) uses these too, and wraps their errors in ManifestError.

Integers accept any `numbers.Integral` (numpy's too) but not bools; numbers accept any
`numbers.Real` but not bools, and never NaN.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from pathlib import PurePosixPath, PureWindowsPath


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}" if high is not None else ""


def integer(value, name: str, low: int | None = None, high: int | None = None, *, optional: bool = False,
            meaning: str = "") -> int | None:
    """`value` as an int in [low, high]; None passes when `optional`."""
    if value is None and optional:
        return None
    rule = " ".join(p for p in ("an integer", _range(low, high)) if p) + (f" ({meaning})" if meaning else "")
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {rule}{' or None' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {rule}, got {value}")
    return int(value)


def number(value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           finite: bool = True, optional: bool = False, meaning: str = "") -> float | None:
    """`value` as a float in [low, high] (or (low, high] with low_open); never NaN, and
    finite unless `finite=False`. None passes when `optional`."""
    if value is None and optional:
        return None
    kind = "a finite number" if finite else "a number (not NaN)"
    rule = " ".join(p for p in (kind, _range(low, high, low_open)) if p) + (f" ({meaning})" if meaning else "")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {rule}{' or None' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")
    v = float(value)
    bad = (math.isnan(v) or (finite and math.isinf(v)) or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and v > high))
    if bad:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return v


def boolean(value, name: str) -> bool:
    """True or False (numpy's bool too): not a truthy string such as "no"."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def one_of(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def text(value, name: str, *, empty: bool = True) -> str:
    """A str that is valid Unicode (no lone surrogates: they cannot be encoded, so no tokenizer
    can read them)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: {value[e.start:e.end]!r} at index {e.start} is a lone "
                         f"surrogate (text decoded with errors='surrogateescape' or a broken pair?)") from None
    if not empty and not value:
        raise ValueError(f"{name} is empty")
    return value


def file_name(value, name: str) -> str:
    """A file name inside an export folder: relative, no `..`, no drive: a manifest must not
    point the runtime (and its checksum reads) outside the folder."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty file name, got {value!r}")
    posix, win = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise ValueError(f"{name} must name a file inside the export folder, got {value!r}")
    return value
