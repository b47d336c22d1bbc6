"""What generation returns: immutable records, not dicts.

Work is counted in *layer-positions*: one decoder layer run (attention + MLP) on one
position. The plain model spends num_layers of them on every position it feeds, so a
generation of N tokens after a P-token prompt costs it (P + N - 1) * num_layers (the last
token is never fed back). The runtime counts what it actually ran, per token: the
segment calls of its step (including catch-up of deferred positions and flushes), the
K/V fills of skipped layers (projections only, a few % of a layer; counted apart), and
the work it still owes at that point (positions deferred but not yet run deep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TokenRecord:
    token: int
    segment: int  # index of the segment whose head produced the token; the last segment = full model
    exit_layer: int  # decoder layers computed for this token's decision
    confidence: float
    seconds: float
    text: str = ""  # the piece of text this token added (for streaming)
    stop: str | None = None  # on the last record: why generation stopped (runtime/stopping.py)
    layer_positions: int = 0  # decoder layer x position runs of this token's step(s)
    fill_positions: int = 0  # skipped layer x position K/V fills (the fill policy)
    calls: int = 0  # graph calls of this token's step(s): segments, heads, K/V fills
    owed_layer_positions: int = 0  # deferred work still waiting after this token (defer)
    rollbacks: int = 0  # exact mode: wrong early tokens discarded before this one was verified
    source: str = "model"  # "model": a segment's head chose it; else the draft source whose guess was accepted
    steps: int = 0  # decoding steps of this token's record (0 for an accepted draft: its step is the next token's)
    drafted: dict[str, int] = field(default_factory=dict)  # tokens drafted per source in those steps


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str
    records: tuple[TokenRecord, ...]
    num_layers: int
    stop_reason: str | None = None  # eos, stop, max_new_tokens, context, max_time, cancelled
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused (chat turns), not pre-filled
    online: dict | None = None  # relaxed mode with online_check: exited tokens checked, thresholds tightened

    @classmethod
    def from_records(cls, prompt, records, text, num_layers, *, stop_reason: str | None = None,
                     cached_tokens: int = 0, online: dict | None = None) -> "GenerationResult":
        return cls(tuple(prompt), tuple(r.token for r in records), text, tuple(records), num_layers,
                   stop_reason, cached_tokens, online)

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

    def latency(self) -> dict[str, float]:
        """Per-token decode latency (seconds; the first token, which carries the prefill, is left out)."""
        d = [r.seconds for r in self.records[1:]]
        return {"p50": percentile(d, 50), "p95": percentile(d, 95), "max": max(d) if d else float("nan")}

    @property
    def mean_layers(self) -> float:
        """Mean depth at which tokens were decided (not the work: see `work`)."""
        return float(np.mean([r.exit_layer for r in self.records])) if self.records else float("nan")

    def work(self) -> dict[str, float]:
        """Layer-positions run, against the plain model's for the same prompt and tokens."""
        n = len(self.records)
        plain = (self.prefill_tokens + n - 1) * self.num_layers if n else 0  # a kept cache spares both
        run = sum(r.layer_positions for r in self.records)
        owed = self.records[-1].owed_layer_positions if n else 0
        return {"layer_positions": run, "plain_layer_positions": plain,
                "per_token": run / n if n else float("nan"), "plain_per_token": plain / n if n else float("nan"),
                "share": run / plain if plain else float("nan"), "owed": owed,
                "fill_positions": sum(r.fill_positions for r in self.records),
                "calls_per_token": sum(r.calls for r in self.records) / n if n else float("nan"),
                "rollbacks": sum(r.rollbacks for r in self.records)}

    def drafts(self) -> dict:
        """Exact mode's multi-token decoding: per draft source, tokens proposed and accepted,
        and the mean tokens each decoding step made (1.0 without drafts)."""
        drafted: dict[str, int] = {}
        for r in self.records:
            for k, v in r.drafted.items():
                drafted[k] = drafted.get(k, 0) + v
        sources = {k: {"drafted": v, "accepted": sum(r.source == k for r in self.records)} for k, v in drafted.items()}
        for v in sources.values():
            v["acceptance"] = v["accepted"] / v["drafted"] if v["drafted"] else float("nan")
        steps = sum(r.steps for r in self.records)
        return {"sources": sources, "steps": steps,
                "tokens_per_step": len(self.records) / steps if steps else float("nan")}

    def exit_histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for r in self.records:
            hist[r.exit_layer] = hist.get(r.exit_layer, 0) + 1
        return dict(sorted(hist.items()))

    def summary(self) -> str:
        hist = ", ".join(f"L{k}: {v}" for k, v in self.exit_histogram().items())
        w, lat = self.work(), self.latency()
        owed = f" (+{w['owed']} owed by deferred positions)" if w["owed"] else ""
        fill = f", K/V fills {w['fill_positions']}" if w["fill_positions"] else ""
        rb = f", {w['rollbacks']} rollbacks" if w["rollbacks"] else ""
        d = self.drafts()
        if d["sources"]:
            per = ", ".join(f"{k} {v['accepted']}/{v['drafted']}" for k, v in d["sources"].items())
            rb += f"; {d['tokens_per_step']:.2f} tokens per step (drafts accepted: {per})"
        if self.online:
            seen = [e for e in self.online["exits"] if e["checked"]]
            ok = sum(e["agreed"] for e in seen)
            n = sum(e["checked"] for e in seen)
            rb += (f"; online check: {ok}/{n} exited tokens agreed with the full model, "
                   f"{len(self.online['changes'])} threshold(s) tightened") if n else "; online check: nothing checked yet"
        return (f"{len(self.tokens)} tokens, {self.tokens_per_second:.1f} tokens/s, "
                f"first token {self.first_token_seconds * 1e3:.1f} ms, "
                f"latency p50/p95/max {lat['p50'] * 1e3:.1f}/{lat['p95'] * 1e3:.1f}/{lat['max'] * 1e3:.1f} ms; "
                f"work {w['per_token']:.1f} layer-positions per token vs {w['plain_per_token']:.1f} for the plain "
                f"model ({abs(1 - w['share']):.1%} {'saved' if w['share'] <= 1 else 'more'}){owed}{fill}, {w['calls_per_token']:.1f} calls per token{rb}; "
                f"decided at mean layer {self.mean_layers:.1f}/{self.num_layers}; exits: {hist}")

    def to_dict(self) -> dict:
        """Plain data for `--json` and scripts (per-token records included)."""
        drafts = self.drafts()
        return {"text": self.text, "tokens": list(self.tokens), "stop_reason": self.stop_reason,
                "prompt_tokens": len(self.prompt_tokens), "cached_tokens": self.cached_tokens,
                "tokens_per_second": _finite(self.tokens_per_second),
                "first_token_seconds": _finite(self.first_token_seconds),
                "mean_layers": _finite(self.mean_layers), "num_layers": self.num_layers,
                "work": {k: _finite(v) for k, v in self.work().items()},
                "latency_seconds": {k: _finite(v) for k, v in self.latency().items()},
                "exits": {str(k): v for k, v in self.exit_histogram().items()},
                "online_check": self.online,
                "drafts": {"sources": {k: {kk: _finite(vv) for kk, vv in v.items()}
                                       for k, v in drafts["sources"].items()},
                           "steps": drafts["steps"], "tokens_per_step": _finite(drafts["tokens_per_step"])},
                "records": [{"token": r.token, "text": r.text, "segment": r.segment, "exit_layer": r.exit_layer,
                             "confidence": r.confidence, "seconds": r.seconds,
                             "layer_positions": r.layer_positions, "fill_positions": r.fill_positions,
                             "calls": r.calls, "rollbacks": r.rollbacks, "source": r.source, "steps": r.steps,
                             "drafted": r.drafted} for r in self.records]}


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
