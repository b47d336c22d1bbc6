"""Keep the KV cache of the last sequence so that the next one pre-fills only what is new.

A chat turn's prompt is the whole conversation so far: the previous turns' tokens are already
in the cache from the last call. The runtime keeps that cache together with the token ids it
holds; a new sequence reuses the longest common prefix and pre-fills only from the first
token that differs (re-tokenizing the assistant's reply usually gives back the same ids; when
it does not, the cache is cut at the first difference, not thrown away).

Cutting is exact for the per-segment caches of `runtime/kv_cache.py`: each segment j covers
positions [0, length_j) in its keys/values and [length_j, pending_end_j) in hidden states
waiting for it, and every position depends only on positions before it (causal attention), so
dropping everything at and after position p leaves the state the runtime would have had after
feeding the first p tokens. The cut is `KVCache.truncate`, the one every backend and layout
uses (device arrays, TensorRT's, are cut on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kv_cache import KVCache


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], dtype=np.int64), np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


@dataclass
class KeptSequence:
    """A cache and the ids of the positions it holds (`tokens[:cache.position]`)."""

    tokens: list[int]
    cache: KVCache

    def reuse_for(self, ids) -> tuple[KVCache, int] | None:
        """The cache cut to the longest prefix it shares with `ids`, leaving at least the last
        id to feed (its logits give the next token), and that prefix's length; None if nothing
        can be reused."""
        held = self.tokens[:self.cache.position]
        n = min(common_prefix(held, ids), len(ids) - 1)
        if n <= 0:
            return None
        self.cache.truncate(n)
        return self.cache, n
