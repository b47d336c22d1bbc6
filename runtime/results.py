"""What generation returns: immutable records, not dicts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenRecord:
    token: int
    exit_index: int  # segment whose head produced the token; the last segment = full model
    exit_layer: int  # decoder layers computed for this token
    confidence: float
    seconds: float
    text: str = ""  # the piece of text this token added (for streaming)
    stop: str | None = None  # on the last record: why generation stopped (runtime/stopping.py)


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str
    records: tuple[TokenRecord, ...]
    num_layers: int
    stop_reason: str | None = None  # eos, stop, max_new_tokens, context, max_time, cancelled
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused (chat turns), not pre-filled

    @classmethod
    def from_records(cls, prompt, records, text, num_layers, *, stop_reason: str | None = None,
                     cached_tokens: int = 0) -> "GenerationResult":
        return cls(tuple(prompt), tuple(r.token for r in records), text, tuple(records), num_layers,
                   stop_reason, cached_tokens)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens this call ran through the model."""
        return len(self.prompt_tokens) - self.cached_tokens

    @property
    def tokens_per_second(self) -> float:
        """Decode speed, excluding the first token (it includes the prompt's prefill)."""
        decode = [r.seconds for r in self.records[1:]]
        return len(decode) / sum(decode) if decode and sum(decode) > 0 else float("nan")

    @property
    def first_token_seconds(self) -> float:
        return self.records[0].seconds if self.records else float("nan")

    @property
    def mean_layers(self) -> float:
        return float(np.mean([r.exit_layer for r in self.records])) if self.records else float("nan")

    def exit_histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for r in self.records:
            hist[r.exit_layer] = hist.get(r.exit_layer, 0) + 1
        return dict(sorted(hist.items()))

    def summary(self) -> str:
        hist = ", ".join(f"L{k}: {v}" for k, v in self.exit_histogram().items())
        return (f"{len(self.tokens)} tokens, {self.tokens_per_second:.1f} tokens/s, "
                f"first token {self.first_token_seconds * 1e3:.1f} ms, "
                f"mean layers {self.mean_layers:.1f}/{self.num_layers}; exits: {hist}")

    def to_dict(self) -> dict:
        """Plain data for `--json` and scripts (per-token records included)."""
        return {"text": self.text, "tokens": list(self.tokens), "stop_reason": self.stop_reason,
                "prompt_tokens": len(self.prompt_tokens), "cached_tokens": self.cached_tokens,
                "tokens_per_second": _finite(self.tokens_per_second),
                "first_token_seconds": _finite(self.first_token_seconds),
                "mean_layers": _finite(self.mean_layers), "num_layers": self.num_layers,
                "exits": {str(k): v for k, v in self.exit_histogram().items()},
                "records": [{"token": r.token, "text": r.text, "exit_layer": r.exit_layer,
                             "confidence": r.confidence, "seconds": r.seconds} for r in self.records]}


def _finite(x: float) -> float | None:
    return None if x != x else float(x)  # NaN (no tokens) -> null in JSON


class Stream:
    """What `Runtime.stream` returns: iterate for TokenRecords as they are produced (the last
    one carries the stop reason); `result()` then gives the GenerationResult (it finishes the
    generation first if needed). `close()` stops early: the result then holds what was made."""

    def __init__(self, records: Iterator[TokenRecord], finish: Callable[[list[TokenRecord]], GenerationResult]):
        self._it = records
        self._finish = finish
        self.records: list[TokenRecord] = []

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> TokenRecord:
        rec = next(self._it)
        self.records.append(rec)
        return rec

    def close(self) -> None:
        self._it.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self._finish(self.records)
