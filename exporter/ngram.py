"""The n-gram draft table: what the frozen model itself predicts after each short context.

Exact decoding verifies drafted tokens several per call (runtime/generation.py); prompt lookup
only drafts where the text repeats itself. This table drafts elsewhere, and it is trained the
LAMA way, on the model's own outputs with no labels: over the training windows `lama train`
already ran the frozen model on, each context of the last 3, 2 or 1 tokens is mapped to the token
the model most often put first after it (the cache's teacher top-1), kept when that happened at
least `min_count` times. Made in a second, stored with the checkpoint (`ngram.npz`) and copied
into every export, where runtime/drafting.NgramTable reads it with numpy alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.drafting import NGRAM_BASE, ngram_keys

ORDERS = (3, 2, 1)


def build_table(sequence: np.ndarray, tokens: np.ndarray, top1: np.ndarray, orders=ORDERS,
                min_count: int = 2) -> dict[str, np.ndarray]:
    """{"keys_N": sorted int64 context keys, "tokens_N": int32 predictions} for each order N, from
    flat per-position arrays: the window each position belongs to, its input token, and the
    model's top-1 after it. A context's prediction is its most frequent one (ties: the lower id)."""
    sequence, tokens, top1 = (np.asarray(a).reshape(-1) for a in (sequence, tokens, top1))
    if not sequence.size == tokens.size == top1.size:
        raise ValueError(f"sequence, tokens and top1 must have one entry per position, got "
                         f"{sequence.size}, {tokens.size}, {top1.size}")
    if tokens.size and (tokens.min() < 0 or max(tokens.max(), top1.max()) >= NGRAM_BASE):
        raise ValueError(f"token ids must lie in [0, {NGRAM_BASE})")
    cuts = np.flatnonzero(np.diff(sequence) != 0) + 1
    windows = [(t, p) for t, p in zip(np.split(tokens, cuts), np.split(top1, cuts)) if len(t)]
    out = {}
    for n in orders:
        pairs = [(ngram_keys(t, n), p[n - 1:]) for t, p in windows if len(t) >= n]
        keys = np.concatenate([k for k, _ in pairs]) if pairs else np.zeros(0, np.int64)
        preds = np.concatenate([p for _, p in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
        order = np.lexsort((preds, keys))
        keys, preds = keys[order], preds[order]
        new_pair = np.flatnonzero((np.diff(keys) != 0) | (np.diff(preds) != 0)) + 1
        starts = np.concatenate([[0], new_pair]) if keys.size else np.zeros(0, np.int64)
        counts = np.diff(np.concatenate([starts, [keys.size]]))
        k, p = keys[starts], preds[starts]
        # per key, the pair with the largest count (stable: the lowest token on ties)
        best = np.lexsort((-counts, k))
        k, p, c = k[best], p[best], counts[best]
        first = np.concatenate([[True], k[1:] != k[:-1]]) if k.size else np.zeros(0, bool)
        keep = first & (c >= min_count)
        out[f"keys_{n}"], out[f"tokens_{n}"] = k[keep], p[keep].astype(np.int32)
    return out


def table_from_features(features, min_count: int = 2) -> dict[str, np.ndarray]:
    """The table of a `lama train` feature cache (exporter/cache.Features): every cached position."""
    return build_table(features.sequence, features.token, features.teacher_top1(slice(None)), min_count=min_count)


def save_table(table: dict[str, np.ndarray], path: str | Path) -> None:
    np.savez(path, **table)
