"""When a generation stops, and how much of its text a stream may show so far.

Reasons (`TokenRecord.stop` of the last record, `GenerationResult.stop_reason`):

* ``eos``: the model produced one of its end-of-sequence ids (every id the export recorded:
  the tokenizer's, and generation_config's list, e.g. a chat model's end-of-turn token);
* ``stop``: the text produced one of the caller's stop strings; the text is cut before it
  (the token that completed it stays in `tokens`, as in transformers);
* ``max_new_tokens`` / ``context``: the token budget or the model's context is used up;
* ``max_time``: the wall-clock limit passed (checked after every token);
* ``cancelled``: the caller set the `cancel` event (e.g. from another thread or a signal
  handler). Closing the stream's iterator also ends the generation, without a reason.

A stream must not show text that may turn out to be the start of a stop string: while the
text ends with a proper prefix of one, that tail is held back and shown with a later token
(or dropped if the stop string completes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import validate

REASONS = ("eos", "stop", "max_new_tokens", "context", "max_time", "cancelled")


@dataclass(frozen=True)
class StopStrings:
    strings: tuple[str, ...] = ()

    def __post_init__(self):
        for i, s in enumerate(self.strings):
            validate.text(s, f"stop[{i}]", empty=False)

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.strings), default=0)

    def find(self, text: str, checked: int = 0) -> int | None:
        """Index of the earliest stop string in `text` that ends after position `checked`
        (text before that was searched already), or None."""
        start = max(0, checked - self.longest + 1)
        hits = [i for s in self.strings if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.strings):
                return n
        return 0


@dataclass
class Stopping:
    """The stop rules of one generation; `check` is called once per generated token."""

    eos_ids: frozenset[int] = frozenset()
    stop: StopStrings = field(default_factory=StopStrings)
    max_time: float | None = None  # seconds since `start`
    cancel: threading.Event | None = None
    start: float = field(default_factory=time.perf_counter)
    _checked: int = 0  # text length already searched for stop strings

    @classmethod
    def build(cls, eos_ids: Iterable[int], stop: str | Iterable[str] | None = None, max_time: float | None = None,
              cancel: threading.Event | None = None) -> "Stopping":
        validate.number(max_time, "max_time", 0, low_open=True, finite=False, optional=True, meaning="seconds")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError(f"cancel must be a threading.Event (or anything with is_set()), got {type(cancel).__name__}")
        if stop is None or isinstance(stop, str):
            strings = () if stop is None else (stop,)
        elif isinstance(stop, (list, tuple, set, frozenset)):
            strings = tuple(stop)
        else:
            raise TypeError(f"stop must be a str, a list of str or None, got {stop!r} ({type(stop).__name__})")
        return cls(frozenset(int(i) for i in eos_ids), StopStrings(strings), max_time, cancel)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check(self, token: int, text: str, limit: str | None = None) -> tuple[str | None, int]:
        """(reason or None, end): `text[:end]` is what may be shown now. `limit` is the reason
        to give if this is the last token the budget allows."""
        if self.stop.strings:
            hit = self.stop.find(text, self._checked)
            self._checked = len(text)
            if hit is not None:
                return "stop", hit
        if token in self.eos_ids:
            return "eos", len(text)
        if self.cancelled:
            return "cancelled", len(text)
        if self.max_time is not None and time.perf_counter() - self.start >= self.max_time:
            return "max_time", len(text)
        if limit is not None:
            return limit, len(text)
        return None, len(text) - self.stop.holdback(text)
