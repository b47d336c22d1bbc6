"""Per-segment KV caches, and what happens to positions a token skipped.

When a token leaves at exit i, segments i+1.. never saw it, so their caches lack that
position. Two policies fill the gap:

* ``defer`` (default, exact): keep the hidden state the exited token had when it left
  (it is exactly the input segment i+1 would have received) as *pending* in segment i+1,
  and run it through that segment together with the next token that gets that far (or
  when the runtime flushes: the pending count is bounded). Each cache ends up equal to
  the full model's for the same tokens. The work is postponed, not saved: every position
  eventually runs every layer, unless generation ends first.
* ``fill`` (CALM's state propagation, done cheaply): for every layer the token skipped,
  compute only its keys and values from the exited hidden state (the layer's input norm,
  K/V projections and rotary embedding; no attention, no MLP) and append them. Deeper
  caches then hold approximations; the skipped layers' work is saved for good.

This class only holds arrays and positions; the runtime decides which policy to apply.
Every access to the arrays goes through these methods (`past`, `store`, `append`,
`truncate`, the pending ones, `mark`/`rollback`), so a preallocated, device-resident
buffer can replace the numpy lists without touching the runtime. Arrays may be numpy arrays
or device arrays (TensorRT's DeviceArray, which `truncate` cuts on the device).

Positions are tracked explicitly: segment j's cache covers [0, length[j]); its pending
hidden states cover [length[j], pending_end(j)). With `defer`, pending_end(j+1) ==
length(j): a position waits in exactly one segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("defer", "fill")


@dataclass
class SegmentState:
    keys: list[np.ndarray]  # per layer (B, kv_heads, length, head_dim)
    values: list[np.ndarray]
    length: int = 0
    pending: np.ndarray | None = None  # (B, m, D) hidden states entering this segment at positions [length, length+m)

    @property
    def pending_count(self) -> int:
        return 0 if self.pending is None else int(self.pending.shape[1])

    @property
    def pending_end(self) -> int:
        return self.length + self.pending_count


@dataclass(frozen=True)
class Mark:
    """What `rollback` needs to undo everything done after `mark()`. `store` replaces arrays
    rather than writing into them, so references are enough (and work for device arrays too);
    a preallocated buffer would keep the lengths and overwrite nothing below them."""

    position: int
    lengths: tuple[int, ...]
    arrays: tuple[tuple[list, list], ...]
    pending: tuple[np.ndarray | None, ...]


@dataclass
class KVCache:
    segments: list[SegmentState]
    position: int = 0  # next position to be written by segment 0

    @classmethod
    def empty(cls, layers_per_segment: list[int], num_kv_heads: int, head_dim: int, dtype: np.dtype,
              batch: int = 1) -> "KVCache":
        z = lambda: np.zeros((batch, num_kv_heads, 0, head_dim), dtype=dtype)  # noqa: E731
        return cls([SegmentState([z() for _ in range(n)], [z() for _ in range(n)]) for n in layers_per_segment])

    # -- reading -----------------------------------------------------------------------
    def past(self, j: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Segment j's keys and values, per layer, covering positions [0, length)."""
        st = self.segments[j]
        return st.keys, st.values

    def segment_input(self, j: int, hidden: np.ndarray | None, start: int) -> np.ndarray:
        """Input of segment j: its pending states, then the part of `hidden` (which covers
        positions [start, start + len)) that comes after them. Changes nothing: the pending
        states are dropped by `take_pending` once the segment has run."""
        st = self.segments[j]
        if hidden is None:
            if st.pending is None:
                raise RuntimeError(f"segment {j} has nothing to run")
            return st.pending
        if st.pending_end < start:
            raise RuntimeError(f"KV cache gap in segment {j}: cached/pending up to {st.pending_end}, input starts at {start}")
        tail = hidden[:, st.pending_end - start:, :]
        return tail if st.pending is None else np.concatenate([st.pending, tail], axis=1)

    def pending_counts(self) -> list[int]:
        return [st.pending_count for st in self.segments]

    def first_pending(self) -> int | None:
        """The shallowest segment with pending states (None: nothing is waiting)."""
        return next((j for j, st in enumerate(self.segments) if st.pending is not None), None)

    # -- writing -----------------------------------------------------------------------
    def store(self, j: int, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Segment j's present keys/values, covering [0, new length) (the graph concatenated past + new)."""
        st = self.segments[j]
        st.keys, st.values = list(keys), list(values)
        st.length = keys[0].shape[2] if keys else st.length

    def append(self, j: int, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """New keys/values for positions [length, length + n) of segment j (the fill policy)."""
        st = self.segments[j]
        if st.pending is not None:
            raise RuntimeError(f"segment {j} has pending states; appending after them would misplace positions")
        st.keys = [np.concatenate([a, b], axis=2) for a, b in zip(st.keys, keys)]
        st.values = [np.concatenate([a, b], axis=2) for a, b in zip(st.values, values)]
        st.length += keys[0].shape[2] if keys else 0

    def take_pending(self, j: int) -> None:
        """Segment j has run on its pending states: they are in its cache now."""
        self.segments[j].pending = None

    def defer(self, j: int, hidden: np.ndarray, start: int) -> None:
        """Keep the states of segment j-1's output `hidden` (positions [start, start+len)) that
        segment j has neither cached nor pending, for segment j to run later."""
        st = self.segments[j]
        tail = hidden[:, st.pending_end - start:, :]
        if tail.shape[1]:
            st.pending = tail if st.pending is None else np.concatenate([st.pending, tail], axis=1)

    # -- undo --------------------------------------------------------------------------
    def mark(self) -> Mark:
        return Mark(self.position, tuple(st.length for st in self.segments),
                    tuple((st.keys, st.values) for st in self.segments), tuple(st.pending for st in self.segments))

    def rollback(self, mark: Mark) -> None:
        """Back to the state at `mark` (a step that failed half-way leaves no trace)."""
        for st, n, (keys, values), pending in zip(self.segments, mark.lengths, mark.arrays, mark.pending):
            st.keys, st.values, st.length, st.pending = keys, values, n, pending
        self.position = mark.position

    def truncate(self, position: int) -> None:
        """Forget every position >= `position`, cached or pending, in every segment: the state
        the runtime would have had after feeding the first `position` tokens (attention is
        causal, so nothing before a position depends on what follows). The one truncation for
        every backend and layout: exact mode's rollbacks, a stream closed early, a kept cache
        reused for a new prompt (runtime/prefix_cache.py)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot truncate to {position}: the cache holds positions [0, {self.position})")
        for st in self.segments:
            if st.length > position:
                self._cut(st, position)
            if st.pending is not None:  # pending covers [length, pending_end)
                keep = position - st.length
                st.pending = prefix(st.pending, 1, keep) if keep > 0 else None
        self.position = position

    def _cut(self, st: SegmentState, n: int) -> None:
        """Segment state `st` keeps the keys/values of its first n positions."""
        st.keys = [prefix(k, 2, n) for k in st.keys]
        st.values = [prefix(v, 2, n) for v in st.values]
        st.length = n


def prefix(a, axis: int, n: int):
    """The first n entries of `a` along `axis`, where `a` lives: a view of a numpy array; for a
    device array (TensorRT's DeviceArray) its own `narrow`, which copies on the device, so a
    cut never brings the cache to host memory."""
    if isinstance(a, np.ndarray):
        return a[(slice(None),) * axis + (slice(0, n),)]
    narrow = getattr(a, "narrow", None)
    if narrow is None:
        raise TypeError(f"cannot cut a KV array of type {type(a).__name__}: it is neither a numpy array nor has "
                        f"narrow(axis, length)")
    return narrow(axis, n)
