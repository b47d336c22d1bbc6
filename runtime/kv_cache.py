"""Per-segment KV caches, and what happens to positions a token skipped.

When a token leaves at exit i, segments i+1.. never saw it, so their caches lack that
position. Two policies fill the gap:

* ``defer`` (default, exact): keep the hidden state the exited token had when it left
  (it is exactly the input segment i+1 would have received) and run it through segment
  i+1 together with the next token that gets that far; that segment's output for it then
  waits for segment i+2, and so on. Each cache ends up equal to the full model's for
  the same tokens. Cost: the deferred positions ride along with a later token (a longer
  sequence in that call, not an extra call), so latency moves to the next deep token.
* ``copy`` (CALM-style state propagation): the exited hidden state is handed to *every*
  deeper segment as its input for that position. No chain of deferred work through
  the segments in between, but the deeper caches hold approximations: the attention
  of later tokens sees slightly different keys/values than the full model would.
  Useful to compare against CALM; in this runtime it costs the same calls as `defer`.

Positions are tracked explicitly: segment j's cache covers [0, length[j]); its pending
hidden states cover [length[j], pending_end(j)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

POLICIES = ("defer", "copy")


@dataclass
class SegmentState:
    keys: list[np.ndarray]  # per layer (B, kv_heads, length, head_dim)
    values: list[np.ndarray]
    length: int = 0
    pending: np.ndarray | None = None  # (B, m, D) hidden states entering this segment at positions [length, length+m)

    @property
    def pending_end(self) -> int:
        return self.length + (0 if self.pending is None else self.pending.shape[1])


@dataclass
class KVCache:
    segments: list[SegmentState]
    policy: str = "defer"
    position: int = 0  # next position to be written by segment 0

    @classmethod
    def empty(cls, layers_per_segment: list[int], num_kv_heads: int, head_dim: int, dtype: np.dtype,
              policy: str = "defer", batch: int = 1) -> "KVCache":
        if policy not in POLICIES:
            raise ValueError(f"unknown KV policy {policy!r}; choose one of {POLICIES}")
        z = lambda: np.zeros((batch, num_kv_heads, 0, head_dim), dtype=dtype)  # noqa: E731
        return cls([SegmentState([z() for _ in range(n)], [z() for _ in range(n)]) for n in layers_per_segment],
                   policy)

    def segment_input(self, j: int, hidden: np.ndarray, start: int) -> np.ndarray:
        """Input of segment j: its pending states, then the part of `hidden` (which covers
        positions [start, start + len)) that comes after them."""
        st = self.segments[j]
        if st.pending_end < start:
            raise RuntimeError(f"KV cache gap in segment {j}: cached/pending up to {st.pending_end}, input starts at {start}")
        tail = hidden[:, st.pending_end - start:, :]
        x = tail if st.pending is None else np.concatenate([st.pending, tail], axis=1)
        st.pending = None
        return x

    def store(self, j: int, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        st = self.segments[j]
        st.keys, st.values = keys, values
        st.length = keys[0].shape[2] if keys else st.length

    def defer(self, exit_segment: int, hidden: np.ndarray, start: int) -> None:
        """A token left after `exit_segment`, whose output covers positions [start, start+len)."""
        targets = [exit_segment + 1] if self.policy == "defer" else range(exit_segment + 1, len(self.segments))
        for j in targets:
            st = self.segments[j]
            tail = hidden[:, st.pending_end - start:, :]
            if tail.shape[1]:
                st.pending = tail if st.pending is None else np.concatenate([st.pending, tail], axis=1)
