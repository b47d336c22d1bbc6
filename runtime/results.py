"""What generation returns: immutable records, not dicts."""

from __future__ import annotations

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


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str
    records: tuple[TokenRecord, ...]
    num_layers: int

    @classmethod
    def from_records(cls, prompt, records, text, num_layers) -> "GenerationResult":
        return cls(tuple(prompt), tuple(r.token for r in records), text, tuple(records), num_layers)

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
