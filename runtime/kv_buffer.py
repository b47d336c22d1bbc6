"""A KV cache of preallocated buffers that the segment graphs update in place.

With the manifest's KV layout "buffer" every decoder layer has one key and one value
buffer of shape (1, kv_heads, capacity, head_dim), allocated once per generation. Each
segment graph attends through GroupQueryAttention, which is bound (IOBinding) to read its
past from and write its present into that same memory, so a token costs no cache copy and
the per-token cost stays flat as the context grows. Segment j's buffers hold valid
positions [0, length[j]); the graph is told where that part ends by two small inputs,
``seqlens_k = end - 1`` and ``total_sequence_length = end``, and writes the positions
[length[j], end) it was given (several at once when it catches up deferred positions).

Pending (deferred) positions work exactly as in `KVCache`: this class only replaces how a
segment's cache is fed and stored. Forgetting positions (`KVCache.truncate`, the same for
every layout) is only a smaller length here.

Exact decoding sets `pad`: a call over one position then also carries the position before it
(its input row kept from when it ran; its keys/values are written again, the same bits). Why:
GroupQueryAttention computes a one-position call on onnxruntime's one-row MatMul path, whose
sums round differently from the many-row path of a call over several positions, and int4
graphs' int8 activations turn that into ~0.3 logit, enough to flip near-ties between a drafted
and an undrafted step. With every call over >= 2 positions, every kernel computes a position's
row the same way in any call (benchmarks/studies/shape_invariance.py): exact decoding's tokens
are then the same bits whatever the drafts and exits, at the cost of one more position in the
calls that had one (about a tenth of such a call on SmolLM2 int4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import roles as R
from .errors import LamaError
from .kv_cache import KVCache, SegmentState
from .manifest import SegmentSpec


class ContextTooLong(LamaError, ValueError):
    """The context would not fit the KV buffers."""


ROWS_KEPT = 64  # input rows kept per segment for `pad`: more than a rollback or a flush reaches back


class _DropFirst(Mapping):
    """A padded call's outputs: the per-position ones without the extra position in front."""

    __slots__ = ("_out", "_names")

    def __init__(self, out: Mapping, names: frozenset):
        self._out, self._names = out, names

    def __getitem__(self, name: str):
        v = self._out[name]
        return v[:, 1:] if name in self._names else v

    def __contains__(self, name) -> bool:
        return name in self._out

    def __iter__(self):
        return iter(self._out)

    def __len__(self) -> int:
        return len(self._out)


@dataclass
class KVBufferCache(KVCache):
    capacity: int = 0
    bindings: dict = field(default_factory=dict)  # segment index -> the backend's InPlaceBinding
    pad: bool = False  # one-position calls also carry the position before them (exact decoding; see above)
    rows: dict = field(default_factory=dict)  # segment index -> {position: its input row}, the last ROWS_KEPT
    # of the calls made while `pad` was set (a prefix computed unpadded is not row-invariant anyway)

    @classmethod
    def allocate(cls, layers_per_segment: list[int], num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: np.dtype) -> "KVBufferCache":
        """Zeroed buffers: the operating system maps their pages when they are first written,
        so a large capacity costs memory only as the context grows. The KV policy is the chain's
        (`Chain`): the cache holds arrays and positions the same way for both."""
        if capacity < 1:
            raise ValueError(f"KV buffer capacity must be positive, got {capacity}")
        buf = lambda: np.zeros((1, num_kv_heads, capacity, head_dim), dtype=dtype)  # noqa: E731
        segments = [SegmentState([buf() for _ in range(n)], [buf() for _ in range(n)]) for n in layers_per_segment]
        return cls(segments, capacity=capacity)

    def run(self, j: int, seg: SegmentSpec, backend, x: np.ndarray, end: int,
            extra: dict | None = None) -> Mapping[str, np.ndarray]:
        """Run segment j on `x` (its positions [length[j], end)), writing their K/V in place;
        `extra`: further inputs by role (the chain's `gate_on`). Its other outputs are to be read
        before segment j runs again (backends.BoundOutputs)."""
        st = self.segments[j]
        if end > self.capacity:
            raise ContextTooLong(f"the context reached {end} positions but the KV buffers hold {self.capacity}; "
                                 f"export with a larger --kv-capacity, or shorten "
                                 f"the prompt / max_new_tokens")
        if x.shape[1] != end - st.length:
            raise RuntimeError(f"segment {j} got {x.shape[1]} positions for [{st.length}, {end})")
        binding = self.bindings.get(j)
        if binding is None:
            pairs = []
            for past, present, arrays in zip(R.PAST, R.PRESENT, (st.keys, st.values)):  # keys, then values
                ins, outs = seg.per_layer(seg.inputs, past), seg.per_layer(seg.outputs, present)
                pairs += [(i.name, o.name, a) for i, o, a in zip(ins, outs, arrays)]
            binding = self.bindings[j] = backend.bind_inplace(pairs)
        rows, start = self.rows.setdefault(j, {}), st.length
        padded = self.pad and x.shape[1] == 1 and start - 1 in rows
        if padded:  # the position before, again: its row is computed (and its K/V written) as before
            x, start = np.concatenate([rows[start - 1], x], axis=1), start - 1
        feeds = seg.feeds({seg.entry_role: x, R.POSITION_IDS: np.arange(start, end, dtype=np.int64)[None, :],
                           R.SEQLENS_K: np.array([end - 1], dtype=np.int32),
                           R.TOTAL_SEQUENCE_LENGTH: np.array(end, dtype=np.int32), **(extra or {})})
        out = backend.run_bound(binding, feeds)
        st.length = end
        # rows are read only when padding, and only the last ROWS_KEPT: plain decoding keeps none
        for i in range(max(0, x.shape[1] - ROWS_KEPT), x.shape[1]) if self.pad else ():
            rows[start + i] = x[:, i:i + 1].copy()
        if len(rows) > 2 * ROWS_KEPT:
            self.rows[j] = {p: r for p, r in rows.items() if p >= end - ROWS_KEPT}
        if padded:
            per_position = frozenset(t.name for t in seg.outputs if len(t.shape) > 1 and t.shape[1] == "sequence")
            return _DropFirst(out, per_position)
        return out

    def truncate(self, position: int) -> None:
        super().truncate(position)
        for j, rows in self.rows.items():  # rows from `position` on belong to tokens now forgotten
            if any(p >= position for p in rows):
                self.rows[j] = {p: r for p, r in rows.items() if p < position}

    def store(self, j: int, keys, values) -> None:
        raise RuntimeError("KVBufferCache is written in place by the graphs; use run(), not store()")

    def append(self, j: int, keys, values) -> None:
        """K/V for positions [length, length + n) of segment j (fill policy), written in place."""
        st = self.segments[j]
        if st.pending is not None:
            raise RuntimeError(f"segment {j} has pending states; appending after them would misplace positions")
        n = keys[0].shape[2] if keys else 0
        if st.length + n > self.capacity:
            raise ContextTooLong(f"the context reached {st.length + n} positions but the KV buffers hold "
                                 f"{self.capacity}")
        for buf, new in zip(st.keys + st.values, list(keys) + list(values)):
            buf[:, :, st.length:st.length + n] = new
        st.length += n

    def _cut(self, st: SegmentState, n: int) -> None:
        """KVCache.truncate's cut for buffers: a shorter valid length (the buffers keep their
        bytes, which the next positions overwrite)."""
        st.length = n
