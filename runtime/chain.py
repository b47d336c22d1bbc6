"""The segment chain: one step runs the segments until an exit is confident.

One decoding step for the positions [p0, p] (the prompt at prefill, one token after):

    for each segment j:
        x = its pending states (positions earlier tokens skipped) + the new positions
        run the segment: new KV for its layers, the head's (token, confidence) for the
        last position, and the hidden states for the next segment
        if confidence >= threshold[j]: hand the hidden states to the KV policy and stop
    otherwise the last segment's token is the model's own

A step is all-or-nothing: if a graph fails, the cache is as it was before the step.
With `defer`, the positions waiting for the deepest segment (the pending states of all
segments together, so each segment's too) are bounded (`max_pending`): past the bound the
step flushes them deep, and no decode call carries more than max_pending + 1 positions.
The last segment also reports the full model's token at every position it ran
(`StepStats.full_tokens`), which exact mode checks early tokens against
(runtime/generation.py). Exact mode with sampling needs the full model's distribution at each
of those positions: the last segment gives every position's top-k (`topk_values_all`, and
`logits_all` in exports with full logits), checked in order after one call; an export made
before those outputs runs the positions to check one per call instead (`Chain.step`'s
`check`), and stops as soon as the check rejects one. `fill` gives skipped layers only
their keys/values (runtime/kv_cache.py). Every tensor is found by its role in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import roles as R
from .backends import Backend
from .kv_buffer import KVBufferCache
from .kv_cache import POLICIES, KVCache
from .manifest import GraphSpec, Manifest, ManifestError, SegmentSpec
from .sampling import dense_logits

# Positions that may wait for the deepest segment before they are flushed deep. Chosen by
# measurement of one pass of the whole chain vs the positions it carries: stories260K on the
# shared, loaded 2-core machine (benchmarks/results/stories260k/deferral_cost.md) 1.03x one
# position's cost at 8 positions, 1.15x at 32, 1.8x at 64; SmolLM2 on 2 cores (issue 13)
# 1.15x at 4, 1.35x at 8, 2x at 16; an H200 (../shared/KNOWN.md) 1.1x at 8, 1.14x at 32.
# 8 keeps the slowest token within ~1.4x of a plain step on the CPU model and pays a forced
# flush at most once per 8 early tokens; on a GPU a larger bound (16-32) costs little.
DEFAULT_MAX_PENDING = 8
DECODE_DIM = "decode_sequence"  # manifest dim: positions one segment call takes in decode (bound + 1)
# Exact sampling: check(position, logits row of the full model there) -> keep going? (Chain.step)
Check = Callable[[int, np.ndarray], bool]
INF = float("inf")  # a threshold that never exits ("never", None in the manifest)
# a gated segment's `gate_on` input (exports with the gate switch, exporter/gate_switch.py):
# its gate runs only where a threshold can be met; off, its confidence is -inf
GATE_ON = {True: np.array(True), False: np.array(False)}


@dataclass
class StepStats:
    """Work done by one step (or flush): what TokenRecord reports."""

    layer_positions: int = 0  # decoder layers x positions run by segment graphs
    fill_positions: int = 0  # skipped layers x positions whose K/V were filled
    calls: int = 0  # graph calls
    seconds: float = 0.0
    full_tokens: dict[int, int] = field(default_factory=dict)  # position -> the full model's next token
    steps: int = 0  # decoding steps (one per step() call made by generation)
    drafted: dict[str, int] = field(default_factory=dict)  # draft source -> tokens it proposed (exact mode)

    def add(self, other: "StepStats") -> None:
        self.layer_positions += other.layer_positions
        self.fill_positions += other.fill_positions
        self.calls += other.calls
        self.seconds += other.seconds
        self.steps += other.steps
        for k, v in other.drafted.items():
            self.drafted[k] = self.drafted.get(k, 0) + v


class Chain:
    """The exported segments and their backends: steps, flushes, and the work they do.
    `Runtime` adds the tokenizer, thresholds and generation on top."""

    def __init__(self, manifest: Manifest, backends: list[Backend], kv_policy: str,
                 head_backends: list[Backend] = (), fill_backends: list[Backend | None] = (),
                 max_pending: int | None = None):
        if kv_policy not in POLICIES:
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose one of {POLICIES}")
        self.manifest = manifest
        self.backends = backends
        self.head_backends = list(head_backends)  # gate mode: exit heads, run only for leaving tokens
        self.kv_policy = kv_policy
        self.dtype = np.dtype("float16" if manifest.precision == "fp16" else "float32")
        self.fill_backends = list(fill_backends) or [None] * len(backends)  # fill policy: K/V of skipped layers
        self.max_pending = self.default_max_pending(manifest) if max_pending is None else int(max_pending)
        if self.max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self.num_layers = [sg.layers[1] - sg.layers[0] for sg in manifest.segments]
        self.switched = [R.GATE_ON in sg.names for sg in manifest.segments]  # segments with a gate switch

    @staticmethod
    def default_max_pending(manifest: Manifest) -> int:
        """The bound the export sized its decode profiles for, else DEFAULT_MAX_PENDING."""
        d = manifest.dims.get(DECODE_DIM)
        return int(d["max"]) - 1 if d and d.get("max") else DEFAULT_MAX_PENDING

    # -- one step ------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """Positions a generation may reach: the model's context, or the KV buffers' capacity."""
        kv = self.manifest.kv_cache
        return min(self.manifest.model.max_context, kv.capacity) if kv.layout == "buffer" else self.manifest.model.max_context

    def new_cache(self) -> KVCache:
        m = self.manifest.model
        layers = [s.layers[1] - s.layers[0] for s in self.manifest.segments]
        if self.manifest.kv_cache.layout == "buffer":
            return KVBufferCache.allocate(layers, m.num_kv_heads, m.head_dim, self.max_context, self.dtype)
        return KVCache.empty(layers, m.num_kv_heads, m.head_dim, self.dtype)

    def recycle_cache(self, old: KVCache | None) -> KVCache:
        """A cache for a new sequence. A KV buffer cache is emptied and used again: a fresh one is
        capacity-sized (SmolLM2 at 8,192 positions: 377 MB) and writing into newly mapped memory
        made a 13-token prefill take 20-385 ms instead of a steady 18 ms (int4, 2 threads); its
        bindings are kept too. The graphs read a buffer only below the valid length, so the old
        bytes above it are never seen. Any other cache: a new one."""
        if isinstance(old, KVBufferCache):
            old.truncate(0)
            return old
        return self.new_cache()

    def _run_segment(self, j: int, x: np.ndarray, cache: KVCache, end: int, stats: StepStats,
                     gate: bool = False) -> Mapping:
        """Run segment j on x (positions [length_j, end)) and keep its new KV: returned arrays
        (concat), or written in place (buffer). Its pending states are in its cache then.
        `gate`: its exit may fire (threshold < +inf); a segment with a gate switch runs its gate
        only then (else its confidence is -inf). Returns its outputs by name; read them before
        segment j runs again (buffer layout: backends.BoundOutputs, which copies each output
        when it is first read)."""
        seg, backend = self.manifest.segments[j], self.backends[j]
        extra = {R.GATE_ON: GATE_ON[gate]} if self.switched[j] else None
        if isinstance(cache, KVBufferCache):
            out = cache.run(j, seg, backend, x, end, extra)
        else:
            out = backend.run(self._feeds(seg, x, cache, j, end, extra))
            cache.store(j, [out[s.name] for s in seg.per_layer(seg.outputs, R.PRESENT_KEY)],
                        [out[s.name] for s in seg.per_layer(seg.outputs, R.PRESENT_VALUE)])
        cache.take_pending(j)
        n = x.shape[1]
        stats.layer_positions += n * self.num_layers[j]
        stats.calls += 1
        tokens_all = seg.names.get(R.TOKENS_ALL)
        if tokens_all in out:  # last segment: the full model's next token at every position it ran
            stats.full_tokens.update((end - n + i, int(t)) for i, t in enumerate(np.asarray(out[tokens_all])[0]))
        return out

    def _fill(self, j: int, hidden: np.ndarray, start: int, cache: KVCache, stats: StepStats) -> None:
        """Fill policy: a token left after segment j with `hidden` at positions [start, start+S).
        Every deeper layer gets the keys/values of that state (projections only), in one call."""
        spec = self.manifest.segments[j + 1].kv_fill
        pos = np.arange(start, start + hidden.shape[1], dtype=np.int64)[None, :]
        out = self.fill_backends[j + 1].run(spec.feeds({R.HIDDEN: hidden, R.POSITION_IDS: pos}))
        by_layer = {(t.role, t.layer): out[t.name] for t in spec.outputs}
        for k in range(j + 1, len(self.manifest.segments)):
            layers = range(*self.manifest.segments[k].layers)
            cache.append(k, [by_layer[R.FILL_KEY, l] for l in layers], [by_layer[R.FILL_VALUE, l] for l in layers])
            stats.fill_positions += hidden.shape[1] * self.num_layers[k]
        stats.calls += 1

    def _feeds(self, seg: SegmentSpec, x: np.ndarray, cache: KVCache, j: int, end: int,
               extra: dict | None = None) -> dict:
        st = cache.segments[j]
        feeds = seg.feeds({seg.entry_role: x, R.ATTENTION_MASK: np.ones((1, end), dtype=np.int64),
                           R.POSITION_IDS: np.arange(st.length, end, dtype=np.int64)[None, :], **(extra or {})})
        for spec, arr in zip(seg.per_layer(seg.inputs, R.PAST_KEY), st.keys):
            feeds[spec.name] = arr
        for spec, arr in zip(seg.per_layer(seg.inputs, R.PAST_VALUE), st.values):
            feeds[spec.name] = arr
        return feeds

    def step(self, ids: np.ndarray, cache: KVCache, thresholds: list[float], want_logits: bool = False,
             stats: StepStats | None = None, check: Check | None = None, check_from: int = 0):
        """Feed token ids (positions cache.position ..) and return (token, exit index, confidence, logits).

        All or nothing: on any error the cache is as before. With `defer`, once more than
        `max_pending` positions wait (all segments together), they are flushed deep before
        returning. `stats` collects the work.

        `check` (exact mode with sampling): whenever the last segment runs positions >=
        `check_from` (in this step or in its flush), check(position, logits) is called for them
        in order with the full model's logits row there (vocabulary-sized: the head's top-k,
        -inf elsewhere, or its full logits): from the graph's per-position outputs after one
        call, or, for exports without them, one call per position (those before check_from in
        one call). When check returns False the positions after that one are dropped from every
        segment (the cache is truncated to position + 1): the caller rejected the token that
        followed it."""
        stats = StepStats() if stats is None else stats
        mark = cache.mark()
        try:
            result = self._step(np.asarray(ids).reshape(1, -1).astype(np.int64), cache, thresholds, want_logits,
                                stats, check, check_from)
            if self.kv_policy == "defer" and sum(cache.pending_counts()) > self.max_pending:
                self._flush(cache, stats, check, check_from)
            return result
        except BaseException:
            cache.rollback(mark)
            raise

    def _run_checked(self, j: int, x: np.ndarray, cache: KVCache, end: int, stats: StepStats, check: Check | None,
                     check_from: int) -> tuple[dict, int | None]:
        """Run the last segment j on x (positions [end - len, end)) and check positions from
        check_from on (see `step`). Returns the last call's outputs and the position the check
        rejected (None: none); the caller truncates the cache after it."""
        if check is None:
            return self._run_segment(j, x, cache, end, stats), None
        seg, n, start = self.manifest.segments[j], x.shape[1], end - x.shape[1]
        rows = self._rows_all(seg)
        if rows is not None:  # the graph gives every position's distribution: one call
            out = self._run_segment(j, x, cache, end, stats)
            for k in range(max(0, check_from - start), n):
                if not check(start + k, rows(out, k)):
                    return out, start + k
            return out, None
        done = 0
        while done < n:
            size = max(1, check_from - start - done + 1) if done == 0 else 1  # up to check_from at once
            size = min(size, n - done)
            out = self._run_segment(j, x[:, done:done + size], cache, start + done + size, stats)
            done += size
            pos = start + done - 1
            if pos >= check_from and not check(pos, self._logits(seg, out, True)[0]):
                return out, pos
        return out, None

    def _step(self, ids: np.ndarray, cache: KVCache, thresholds: list[float], want_logits: bool, stats: StepStats,
              check: Check | None = None, check_from: int = 0):
        start0 = cache.position
        end = start0 + ids.shape[1]
        if self.kv_policy == "fill" and ids.shape[1] > 1:
            # a filled prompt would approximate every prompt position's deeper keys/values:
            # the prompt runs the whole model (its first token is the model's own)
            thresholds = [float("inf")] * len(thresholds)
        hidden, start = None, start0
        for j, seg in enumerate(self.manifest.segments):
            if j == 0:
                x = ids
            else:
                begin = cache.segments[j].length
                x = cache.segment_input(j, hidden, start).astype(self.dtype, copy=False)
                start = begin
            if seg.exit is None:
                out, rejected = self._run_checked(j, x, cache, end, stats, check, check_from)
                cache.position = end
                if rejected is not None:
                    cache.truncate(rejected + 1)
                conf = float(out[seg.name(R.CONFIDENCE)][0])
                return int(out[seg.name(R.TOKEN)][0]), j, conf, self._logits(seg, out, want_logits)
            out = self._run_segment(j, x, cache, end, stats, gate=thresholds[j] < INF)
            hidden = out[seg.name(R.HIDDEN_OUT)]
            if thresholds[j] == INF:  # never exits here: its confidence is not read (nor computed, if switched)
                continue
            conf = float(out[seg.name(R.CONFIDENCE)][0])
            if conf >= thresholds[j]:
                if self.kv_policy == "defer":
                    cache.defer(j + 1, hidden, start)
                else:
                    self._fill(j, hidden, start, cache, stats)
                cache.position = end
                graph = seg
                if seg.exit.head is not None:  # gate said exit: now, and only now, run the head
                    graph = self.manifest.heads[seg.exit.head]
                    exit_hidden = out[seg.name(R.EXIT_HIDDEN)]
                    out = self.head_backends[seg.exit.head].run(graph.feeds({R.EXIT_HIDDEN: exit_hidden}))
                    stats.calls += 1
                return int(out[graph.name(R.TOKEN)][0]), j, conf, self._logits(graph, out, want_logits)
        raise RuntimeError("the last segment has an exit; the manifest is inconsistent")

    def flush(self, cache: KVCache, stats: StepStats | None = None, check: Check | None = None,
              check_from: int = 0) -> StepStats:
        """Run every pending position through the deeper segments now (all or nothing; `check`
        as in `step`)."""
        stats = StepStats() if stats is None else stats
        mark = cache.mark()
        try:
            self._flush(cache, stats, check, check_from)
        except BaseException:
            cache.rollback(mark)
            raise
        return stats

    def _flush(self, cache: KVCache, stats: StepStats, check: Check | None = None, check_from: int = 0) -> None:
        first = cache.first_pending()
        if first is None:
            return
        end = cache.position  # shallower segments hold every position: pending ends here
        hidden, start = None, None
        last = len(self.manifest.segments) - 1
        for j in range(first, last + 1):
            begin = cache.segments[j].length
            x = cache.segment_input(j, hidden, start).astype(self.dtype, copy=False)
            if j == last:
                _, rejected = self._run_checked(j, x, cache, end, stats, check, check_from)
                if rejected is not None:
                    cache.truncate(rejected + 1)
                return
            out = self._run_segment(j, x, cache, end, stats)
            hidden, start = out.get(self.manifest.segments[j].names.get(R.HIDDEN_OUT)), begin

    def owed(self, cache: KVCache) -> int:
        """Layer-positions the deferred states still need (each waits in one segment)."""
        total = self.manifest.model.num_layers
        return sum(n * (total - sg.layers[0]) for n, sg in zip(cache.pending_counts(), self.manifest.segments))

    def _rows_all(self, seg: SegmentSpec):
        """(out, k) -> the full model's logits row at the call's k-th position, from the last
        segment's per-position outputs of the same kind as `_logits` reads (full logits if the
        export has them, else the top-k): None for exports without them (made before)."""
        names, vocab = seg.names, self.manifest.model.vocab_size
        if R.LOGITS in names:
            if R.LOGITS_ALL not in names:
                return None
            return lambda out, k: np.asarray(out[names[R.LOGITS_ALL]])[0, k]
        if R.TOPK_VALUES_ALL not in names:
            return None
        return lambda out, k: dense_logits(np.asarray(out[names[R.TOPK_VALUES_ALL]])[0, k][None],
                                           np.asarray(out[names[R.TOPK_INDICES_ALL]])[0, k][None], vocab)[0]

    def _logits(self, graph: SegmentSpec | GraphSpec, out: dict, want: bool) -> np.ndarray | None:
        """The head's logits (B, vocab): the full row if the graph has it, else (when asked)
        its top-k spread over the vocabulary with -inf elsewhere."""
        names = graph.names
        if R.LOGITS in names or not want:
            return out.get(names[R.LOGITS]) if R.LOGITS in names else None
        if R.TOPK_VALUES not in names:
            raise ManifestError("sampling needs logits, and this export has neither top-k nor full logits "
                                "(it predates them): re-export, or use greedy decoding (temperature 0)")
        values = np.asarray(out[names[R.TOPK_VALUES]])  # from the GPU if there
        indices = np.asarray(out[names[R.TOPK_INDICES]])
        return dense_logits(values, indices, self.manifest.model.vocab_size)
