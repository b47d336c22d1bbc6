"""Sampling on the head's logits with numpy: temperature, top-k, top-p, min-p, repetition penalty.

Greedy stays the fast default: the graph already computed the top token, so no logits leave
the graph. Sampling reads the head's logits. Every export carries the top-k logits of each head
(`topk_values` / `topk_indices`, k fixed at export and recorded in the manifest's shapes), so
sampling works without a re-export, over those k most likely tokens; an export made with
`--with-logits` carries the full vocabulary. The runtime hands both to the sampler the same
way: a vocabulary-sized row, -inf outside the tokens the graph returned.

The order of the steps follows transformers' `generate`: repetition penalty, temperature,
top-k, top-p, min-p; then one draw from the renormalized distribution.

Exact mode samples with the same Sampler: it draws from the full model's distribution at each
drafted position, in order, and keeps a draft while the draw equals it (runtime/generation.py),
so every emitted token is one `pick`, as in plain sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import validate


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all the graph returned
    top_p: float = 1.0  # nucleus: the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # CTRL-style: >1 makes tokens already in the sequence less likely
    seed: int | None = 0  # None: a fresh random seed

    def __post_init__(self):
        # numbers only (a string or NaN fails here, naming the option, not inside numpy)
        validate.number(self.temperature, "temperature", 0, meaning="0 = greedy")
        validate.integer(self.top_k, "top_k", 0, meaning="0 = off")
        validate.number(self.top_p, "top_p", 0, 1, low_open=True, meaning="1 = off")
        validate.number(self.min_p, "min_p", 0, 1, meaning="0 = off")
        validate.number(self.repetition_penalty, "repetition_penalty", 0, low_open=True, meaning="1 = off")
        validate.integer(self.seed, "seed", 0, optional=True, meaning="None = a fresh random seed")

    @property
    def greedy(self) -> bool:
        """True when the graph's own top token is the answer: no logits needed at all. (With
        temperature 0 the filters cannot remove the argmax, so only the penalty matters.)"""
        return self.temperature == 0 and self.repetition_penalty == 1.0


def dense_logits(values: np.ndarray, indices: np.ndarray, vocab: int) -> np.ndarray:
    """(B, k) top-k values + indices -> (B, vocab) logits, -inf where the graph gave nothing."""
    out = np.full((values.shape[0], vocab), -np.inf, dtype=np.float32)
    np.put_along_axis(out, indices.astype(np.int64), values.astype(np.float32), axis=1)
    return out


class Sampler:
    """Draws one token per call; holds the random state of one generation."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def probabilities(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) the next draw chooses from, after every filter; for
        temperature 0, the single argmax with probability 1."""
        p = self.params
        z = np.asarray(logits, dtype=np.float64).reshape(-1).copy()
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < z.size)]
            z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
        if p.temperature == 0:
            return np.array([int(np.argmax(z))]), np.ones(1)
        ids = np.flatnonzero(np.isfinite(z))
        if ids.size == 0:
            raise ValueError("the head returned no finite logits to sample from")
        z = z[ids] / p.temperature
        if 0 < p.top_k < ids.size:
            keep = np.argpartition(-z, p.top_k - 1)[:p.top_k]
            ids, z = ids[keep], z[keep]
        order = np.argsort(-z, kind="stable")  # most likely first
        ids, z = ids[order], z[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            before = np.cumsum(probs) - probs  # mass of the more likely tokens
            n = max(1, int(np.count_nonzero(before < p.top_p)))
            ids, probs = ids[:n], probs[:n]
        if p.min_p > 0:
            n = max(1, int(np.count_nonzero(probs >= p.min_p * probs[0])))
            ids, probs = ids[:n], probs[:n]
        return ids, probs / probs.sum()

    def pick(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        ids, probs = self.probabilities(logits, history)
        return int(ids[0]) if ids.size == 1 else int(self.rng.choice(ids, p=probs))
