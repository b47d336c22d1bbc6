"""Draft sources for exact multi-token decoding.

A step of the full model over S positions costs little more than over one (the weights are
read once: SmolLM2 fp32 on 2 CPU threads, ~5% of a step per extra position up to 8; on a GPU
nearly nothing). So in exact mode the runtime guesses the next few tokens, feeds them with the
current one, and keeps the longest prefix the full model agrees with, plus the full model's
own token after it (runtime/generation.py). The output is the full model's greedy output
whatever the guesses are; good guesses make one call yield several tokens. With sampling, a
draft is kept while the full model's draw at its position equals it (the speculative-sampling
rule for a draft that is a single token, not a distribution), so the output has plain
sampling's distribution whatever the guesses are.

A drafter only proposes; it never sees the model. `PromptLookup` needs no training: it finds
the latest earlier occurrence of the sequence's last n tokens (in the prompt or in what was
generated) and proposes what followed it, as llama.cpp's lookup decoding and transformers'
`prompt_lookup_num_tokens` do. Text that quotes, edits or repeats its context (chat turns,
code, summaries, a small model's own loops) is where it pays. `NgramTable` drafts where the
text does not repeat: a table, made by `lama train` from the frozen model's own top-1 over the
training text (exporter/ngram.py), from the last 3, 2 or 1 tokens to the token the model most
often predicts after them; a draft costs a binary search. Tried after lookup, it lifts the
first draft's acceptance on held-out greedy text from 0.354 to 0.472
(benchmarks/results/smollm2-135m/ngram-drafter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SOURCES = ("lookup", "ngram")  # the order drafters are tried in


@dataclass(frozen=True)
class PromptLookup:
    """Propose the continuation of the latest earlier match of the last `max_ngram` .. `min_ngram` tokens."""

    max_ngram: int = 3
    min_ngram: int = 2
    name: str = "lookup"

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"lookup n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got "
                             f"{self.min_ngram}, {self.max_ngram}")

    def propose(self, history: list[int] | np.ndarray, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of history's last n
        tokens, for the longest n that matches; [] when none does."""
        if k <= 0:
            return []
        h = np.asarray(history, dtype=np.int64)
        size = len(h)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            tail = h[size - n:]
            # windows ending before the last position: start s in [0, size - n - 1)
            starts = np.arange(size - n)
            hit = np.ones(len(starts), dtype=bool)
            for o in range(n):
                hit &= h[starts + o] == tail[o]
            found = np.flatnonzero(hit)
            if len(found):
                s = int(found[-1]) + n  # the token after the latest match
                return h[s:s + k].tolist()
        return []


NGRAM_BASE = 1 << 20  # key = sum(token_i * NGRAM_BASE**i): any vocabulary below ~1M tokens, 3 tokens in an int64


def ngram_keys(tokens: np.ndarray, n: int) -> np.ndarray:
    """Key of every n-token run of `tokens` (1-D), oldest token most significant."""
    t = np.asarray(tokens, dtype=np.int64)
    keys = np.zeros(len(t) - n + 1, dtype=np.int64)
    for o in range(n):
        keys = keys * NGRAM_BASE + t[o:len(t) - n + 1 + o]
    return keys


@dataclass(frozen=True)
class NgramTable:
    """Draft the token the model most often predicted after the longest known context (3, 2,
    then 1 tokens), chained: each draft is context for the next. `tables[n]` = (sorted keys,
    tokens) for contexts of n tokens (exporter/ngram.py writes them, `ngram.npz` in an export)."""

    tables: dict  # n -> (keys (int64, sorted), tokens (int32))
    name: str = "ngram"

    @classmethod
    def load(cls, path, vocab_size: int | None = None) -> "NgramTable":
        """The table an export ships (`ngram.npz`); ValueError naming the file if it is malformed."""
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        try:
            return cls.from_arrays(arrays, vocab_size)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_arrays(cls, arrays: dict, vocab_size: int | None = None) -> "NgramTable":
        """From exporter/ngram.build_table's arrays (`keys_N`, `tokens_N` per order N), checked:
        keys strictly increasing, one token each, every token inside the vocabulary."""
        orders = sorted({int(k.split("_")[1]) for k in arrays if k.startswith("keys_")}, reverse=True)
        tables = {n: (np.asarray(arrays[f"keys_{n}"], dtype=np.int64), np.asarray(arrays[f"tokens_{n}"], dtype=np.int64))
                  for n in orders}
        for n, (keys, toks) in tables.items():
            if keys.ndim != 1 or keys.shape != toks.shape or (len(keys) > 1 and np.any(np.diff(keys) <= 0)):
                raise ValueError(f"n-gram table of order {n} is malformed (keys must be 1-D, strictly "
                                 "increasing, one token each)")
        if not tables:
            raise ValueError("no n-gram table inside (expected keys_N / tokens_N arrays)")
        bad = [n for n, (_, toks) in tables.items()
               if len(toks) and (toks.min() < 0 or (vocab_size is not None and toks.max() >= vocab_size))]
        if bad:  # a drafted id outside the vocabulary would fail deep inside onnxruntime's Gather
            raise ValueError(f"n-gram table of order {bad[0]} drafts token ids outside [0, {vocab_size})")
        return cls(tables)

    def propose(self, history: list[int] | np.ndarray, k: int) -> list[int]:
        h, out = [int(t) for t in history[-max(self.tables):]], []
        for _ in range(max(k, 0)):
            for n, (keys, toks) in self.tables.items():  # longest context first
                if len(h) < n:
                    continue
                key = 0
                for t in h[-n:]:
                    key = key * NGRAM_BASE + t
                i = int(np.searchsorted(keys, key))
                if i < len(keys) and keys[i] == key:
                    out.append(int(toks[i]))
                    h.append(out[-1])
                    break
            else:
                break
        return out


class Drafter(Protocol):
    """What the generation loop asks of a draft source."""

    name: str

    def propose(self, history: list[int], k: int) -> list[int]: ...


def make_drafters(drafts, available: dict | None = None) -> list[Drafter]:
    """Drafters, tried in order each step: None/"all" = every source the export holds (lookup
    needs nothing; `available` maps the others' names to their loaded drafters), "none"/False/[]
    = none, a name, or a list of names or Drafter objects (your own source)."""
    available = {"lookup": PromptLookup(), **(available or {})}
    if drafts is None or drafts == "all" or drafts is True:
        drafts = [name for name in SOURCES if name in available]
    elif drafts in ("none", False) or (isinstance(drafts, (list, tuple)) and list(drafts) == ["none"]):
        return []
    elif isinstance(drafts, str) or hasattr(drafts, "propose"):
        drafts = [drafts]
    if not isinstance(drafts, (list, tuple)):
        raise TypeError(f"drafts must be None, 'all', 'none', a source name ({', '.join(SOURCES)}), a drafter "
                        f"or a list of them, got {drafts!r}")
    out: list[Drafter] = []
    for d in drafts:
        if isinstance(d, str):
            if d not in SOURCES:
                raise ValueError(f"unknown draft source {d!r}; choose from {list(SOURCES)}")
            if d not in available:
                raise ValueError(f"draft source {d!r}: this export holds none (an n-gram table comes from "
                                 "`lama train`; exports of older checkpoints have lookup only)")
            out.append(available[d])
        elif callable(getattr(d, "propose", None)) and isinstance(getattr(d, "name", None), str):
            out.append(d)
        else:
            raise TypeError(f"a drafter needs a `name` and a `propose(history, k)` method, got {d!r}")
    return out


@dataclass
class DraftLengths:
    """How many tokens to draft, from what drafting has earned so far in this generation.

    A drafted position costs `cost` of a one-token call whether it is accepted or not (SmolLM2
    on 2 CPU threads: ~0.05, see benchmarks/multitoken.py's call-cost table; on a GPU ~0), and
    position i is accepted with probability P_i = q_1 ... q_i, q_j being the rate at which
    position j was accepted when position j-1 was (a Beta(1, 1) prior: 0.5 before any
    evidence). The length kept maximises the expected tokens per unit of time,
    (1 + sum_{i<=k} P_i) / (1 + cost * max(0, k - free)): long drafts where they keep being
    accepted (code, quoted text), short or none where they do not. `free`: positions the call
    carries anyway (1 in exact decoding on a KV-buffer export, which pads a one-position call
    with the position before it: runtime/kv_buffer.py), so a first draft there costs nothing."""

    cost: float = 0.05
    free: int = 0
    drafted: dict[str, list[int]] = field(default_factory=dict)  # source -> positions drafted, by index
    accepted: dict[str, list[int]] = field(default_factory=dict)

    def update(self, source: str, drafted: int, accepted: int) -> None:
        d = self.drafted.setdefault(source, [])
        a = self.accepted.setdefault(source, [])
        while len(d) < drafted:
            d.append(0)
            a.append(0)
        for i in range(min(drafted, accepted + 1)):  # position i was reached when 0..i-1 were accepted
            d[i] += 1
            a[i] += i < accepted

    def choose(self, source: str, room: int) -> int:
        d, a = self.drafted.get(source, []), self.accepted.get(source, [])
        best, best_rate, p, total = 0, 1.0, 1.0, 1.0
        for i in range(room):
            # position i is reached when i-1 was accepted: its conditional rate uses those cases only
            reached = d[i] if i < len(d) else 0
            got = a[i] if i < len(a) else 0
            p *= (got + 1) / (reached + 2)
            total += p
            rate = total / (1 + self.cost * max(0, i + 1 - self.free))
            if rate > best_rate:
                best, best_rate = i + 1, rate
        return best
