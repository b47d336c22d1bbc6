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
feeding the first p tokens. Caches held in device memory (TensorRT) cannot be sliced here:
they are reused only when nothing needs cutting, else pre-filled from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kv_buffer import KVBufferCache
from .kv_cache import KVCache


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], dtype=np.int64), np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


def truncate(cache: KVCache, p: int) -> bool:
    """Cut `cache` to its first `p` positions in place. False (cache untouched) when it holds
    arrays this module cannot slice."""
    if p > cache.position:
        raise ValueError(f"cannot keep {p} positions of a cache that holds {cache.position}")
    if isinstance(cache, KVBufferCache):  # preallocated buffers: a shorter valid length is the whole cut
        cache.truncate(p)
        return True
    arrays = [a for st in cache.segments for a in (*st.keys, *st.values)]
    if p < cache.position and not all(isinstance(a, np.ndarray) for a in arrays):
        return False
    for st in cache.segments:
        if st.length > p:
            st.keys = [k[:, :, :p, :] for k in st.keys]
            st.values = [v[:, :, :p, :] for v in st.values]
            st.length = p
        if st.pending is not None:
            keep = p - st.length  # pending covers [length, pending_end)
            st.pending = st.pending[:, :keep, :] if keep > 0 else None
    cache.position = p
    return True


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
        if n <= 0 or not truncate(self.cache, n):
            return None
        return self.cache, n
