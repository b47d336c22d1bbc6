"""Chain the segments on the device and stop as soon as an exit is confident.

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
With `exact=True` (defer, greedy), the last segment's token for every position it runs
checks the tokens that left early; on a mismatch the caches roll back to that position and
generation continues from the full model's token, so the output is the full model's greedy
output. `fill` gives skipped layers only their keys/values (runtime/kv_cache.py).

Greedy by default: the graph's own top token. Sampling reads each head's top-k logits (every
export has them; `--with-logits` exports the full vocabulary), see runtime/sampling.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Backend, open_backend
from .detokenize import IncrementalDecoder
from .kv_cache import POLICIES, KVCache
from .kv_buffer import KVBufferCache
from .manifest import GraphSpec, Manifest, ManifestError, SegmentSpec, from_json_thresholds
from .chat import ChatTemplate, ChatTemplateError, special_tokens
from .prefix_cache import KeptSequence
from .results import GenerationResult, Stream, TokenRecord
from .sampling import SamplingParams, Sampler, dense_logits
from .stopping import Stopping
from .verify import verify_files

Thresholds = list[float | None] | float | str | None
# Positions that may wait for the deepest segment before they are flushed deep. Chosen by
# measurement of one pass of the whole chain vs the positions it carries: stories260K on the
# shared, loaded 2-core machine (benchmarks/results/stories260k/deferral_cost.md) 1.03x one
# position's cost at 8 positions, 1.15x at 32, 1.8x at 64; SmolLM2 on 2 cores (issue 13)
# 1.15x at 4, 1.35x at 8, 2x at 16; an H200 (../shared/KNOWN.md) 1.1x at 8, 1.14x at 32.
# 8 keeps the slowest token within ~1.4x of a plain step on the CPU model and pays a forced
# flush at most once per 8 early tokens; on a GPU a larger bound (16-32) costs little.
DEFAULT_MAX_PENDING = 8
DECODE_DIM = "decode_sequence"  # manifest dim: positions one segment call takes in decode (bound + 1)


@dataclass
class StepStats:
    """Work done by one step (or flush): what TokenRecord reports."""

    layer_positions: int = 0  # decoder layers x positions run by segment graphs
    fill_positions: int = 0  # skipped layers x positions whose K/V were filled
    calls: int = 0  # graph calls
    seconds: float = 0.0
    full_tokens: dict[int, int] = field(default_factory=dict)  # position -> the full model's next token

    def add(self, other: "StepStats") -> None:
        self.layer_positions += other.layer_positions
        self.fill_positions += other.fill_positions
        self.calls += other.calls
        self.seconds += other.seconds


class Runtime:
    def __init__(self, folder: Path, manifest: Manifest, backends: list[Backend], tokenizer, kv_policy: str,
                 head_backends: list[Backend] = (), fill_backends: list[Backend | None] = (),
                 max_pending: int | None = None):
        if kv_policy not in POLICIES:
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose one of {POLICIES}")
        self.folder = folder
        self.manifest = manifest
        self.backends = backends
        self.head_backends = list(head_backends)  # gate mode: exit heads, run only for leaving tokens
        self.tokenizer = tokenizer
        self.kv_policy = kv_policy
        self.dtype = np.dtype("float16" if manifest.precision == "fp16" else "float32")
        self.thresholds = manifest.calibration.thresholds
        self._kept: KeptSequence | None = None  # the last sequence's KV cache, for reuse_cache / chat
        self._chat_template: ChatTemplate | None = None  # read from the export on first use
        self.fill_backends = list(fill_backends) or [None] * len(backends)  # fill policy: K/V of skipped layers
        self.max_pending = self.default_max_pending(manifest) if max_pending is None else int(max_pending)
        if self.max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self.num_layers = [sg.layers[1] - sg.layers[0] for sg in manifest.segments]

    @staticmethod
    def default_max_pending(manifest: Manifest) -> int:
        """The bound the export sized its decode profiles for, else DEFAULT_MAX_PENDING."""
        d = manifest.dims.get(DECODE_DIM)
        return int(d["max"]) - 1 if d and d.get("max") else DEFAULT_MAX_PENDING

    @classmethod
    def load(cls, folder: str | Path, *, providers: list[str] | str | None = None, kv_policy: str = "defer",
             threads: int | None = None, verify: bool = True,
             chat_template: str | Path | None = None, max_pending: int | None = None) -> "Runtime":
        """Validate the export folder (manifest version, files, checksums) and open one session per segment.

        kv_policy: "defer" (exact caches, work postponed) or "fill" (skipped layers get only
        their keys/values, computed from the exited state). max_pending: bound on deferred
        positions, all segments together (default: the export's, else DEFAULT_MAX_PENDING)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"export folder not found: {folder}")
        manifest = Manifest.load(folder)
        verify_files(folder, manifest, checksums=verify)
        if kv_policy not in POLICIES:
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose one of {POLICIES}")
        wanted = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
        if manifest.kv_cache.layout == "buffer" and wanted != ["CPUExecutionProvider"]:
            raise ManifestError(f"this export uses the KV buffer layout (onnxruntime's GroupQueryAttention on "
                                f"buffers bound in host memory), which runs on the CPU provider only here, not "
                                f"on {wanted}; export with --kv concat for GPUs and TensorRT")
        backends = [open_backend(folder, s, providers, threads) for s in manifest.segments]
        heads = [open_backend(folder, h, providers, threads) for h in manifest.heads]
        fills = [None] * len(manifest.segments)
        if kv_policy == "fill":
            missing = [sg.index for sg in manifest.segments[1:] if sg.kv_fill is None]
            if missing:
                raise ManifestError(f"{folder}: the fill policy needs K/V fill graphs, which segments {missing} lack "
                                    f"(exported before they existed): re-export, or use kv_policy='defer'")
            fills = [None] + [open_backend(folder, sg.kv_fill, providers, threads) for sg in manifest.segments[1:]]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        rt = cls(folder, manifest, backends, tokenizer, kv_policy, heads, fills, max_pending)
        if chat_template is not None:  # a file that replaces (or supplies) the export's template
            rt.chat_template = ChatTemplate.from_file(chat_template, special_tokens(folder))
        return rt

    # -- thresholds ----------------------------------------------------------------------
    def resolve_thresholds(self, thresholds: Thresholds) -> list[float]:
        """None: the calibrated default; "never": the full model; a float: that target's
        thresholds from the manifest; a list: one per exit (None = never)."""
        n = len(self.manifest.exits)
        if thresholds is None:
            values = list(self.thresholds)
        elif isinstance(thresholds, str):
            if thresholds != "never":
                raise ValueError(f"thresholds must be None, 'never', a target or a list, got {thresholds!r}")
            values = [None] * n
        elif isinstance(thresholds, (int, float)):
            values = self.manifest.thresholds_for(float(thresholds))
        else:
            values = list(thresholds)
        if len(values) != n:
            raise ValueError(f"{len(values)} thresholds given for {n} exits")
        return from_json_thresholds(values)

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
            return KVBufferCache.allocate(layers, m.num_kv_heads, m.head_dim, self.max_context, self.dtype,
                                          self.kv_policy)
        return KVCache.empty(layers, m.num_kv_heads, m.head_dim, self.dtype)

    def _run_segment(self, j: int, x: np.ndarray, cache: KVCache, end: int, stats: StepStats) -> dict:
        """Run segment j on x (positions [length_j, end)) and keep its new KV: returned arrays
        (concat), or written in place (buffer). Its pending states are in its cache then."""
        seg, backend = self.manifest.segments[j], self.backends[j]
        if isinstance(cache, KVBufferCache):
            out = cache.run(j, seg, backend, x, end)
        else:
            out = backend.run(self._feeds(seg, x, cache, j, end))
            cache.store(j, [out[s.name] for s in seg.per_layer(seg.outputs, "present_key")],
                        [out[s.name] for s in seg.per_layer(seg.outputs, "present_value")])
        cache.take_pending(j)
        n = x.shape[1]
        stats.layer_positions += n * self.num_layers[j]
        stats.calls += 1
        tokens_all = seg.names.get("tokens_all")
        if tokens_all in out:  # last segment: the full model's next token at every position it ran
            stats.full_tokens.update((end - n + i, int(t)) for i, t in enumerate(np.asarray(out[tokens_all])[0]))
        return out

    def _fill(self, j: int, hidden: np.ndarray, start: int, cache: KVCache, stats: StepStats) -> None:
        """Fill policy: a token left after segment j with `hidden` at positions [start, start+S).
        Every deeper layer gets the keys/values of that state (projections only), in one call."""
        spec = self.manifest.segments[j + 1].kv_fill
        pos = np.arange(start, start + hidden.shape[1], dtype=np.int64)[None, :]
        out = self.fill_backends[j + 1].run(spec.feeds({"hidden": hidden, "position_ids": pos}))
        by_layer = {(t.role, t.layer): out[t.name] for t in spec.outputs}
        for k in range(j + 1, len(self.manifest.segments)):
            layers = range(*self.manifest.segments[k].layers)
            cache.append(k, [by_layer["fill_key", l] for l in layers], [by_layer["fill_value", l] for l in layers])
            stats.fill_positions += hidden.shape[1] * self.num_layers[k]
        stats.calls += 1

    def _feeds(self, seg: SegmentSpec, x: np.ndarray, cache: KVCache, j: int, end: int) -> dict:
        st = cache.segments[j]
        feeds = seg.feeds({seg.entry_role: x, "attention_mask": np.ones((1, end), dtype=np.int64),
                           "position_ids": np.arange(st.length, end, dtype=np.int64)[None, :]})
        for spec, arr in zip(seg.per_layer(seg.inputs, "past_key"), st.keys):
            feeds[spec.name] = arr
        for spec, arr in zip(seg.per_layer(seg.inputs, "past_value"), st.values):
            feeds[spec.name] = arr
        return feeds

    def step(self, ids: np.ndarray, cache: KVCache, thresholds: list[float], want_logits: bool = False,
             stats: StepStats | None = None):
        """Feed token ids (positions cache.position ..) and return (token, exit index, confidence, logits).

        All or nothing: on any error the cache is as before. With `defer`, once more than
        `max_pending` positions wait (all segments together), they are flushed deep before
        returning. `stats` collects the work."""
        stats = StepStats() if stats is None else stats
        mark = cache.mark()
        try:
            result = self._step(np.asarray(ids).reshape(1, -1).astype(np.int64), cache, thresholds, want_logits,
                                stats)
            if self.kv_policy == "defer" and sum(cache.pending_counts()) > self.max_pending:
                self._flush(cache, stats)
            return result
        except BaseException:
            cache.rollback(mark)
            raise

    def _step(self, ids: np.ndarray, cache: KVCache, thresholds: list[float], want_logits: bool, stats: StepStats):
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
            out = self._run_segment(j, x, cache, end, stats)
            conf = float(out[seg.name("confidence")][0])
            if seg.exit is None:
                cache.position = end
                return int(out[seg.name("token")][0]), j, conf, self._logits(seg, out, want_logits)
            hidden = out[seg.name("hidden_out")]
            if conf >= thresholds[j]:
                if self.kv_policy == "defer":
                    cache.defer(j + 1, hidden, start)
                else:
                    self._fill(j, hidden, start, cache, stats)
                cache.position = end
                graph = seg
                if seg.exit.head is not None:  # gate said exit: now, and only now, run the head
                    graph = self.manifest.heads[seg.exit.head]
                    out = self.head_backends[seg.exit.head].run(graph.feeds({"exit_hidden": out[seg.name("exit_hidden")]}))
                    stats.calls += 1
                return int(out[graph.name("token")][0]), j, conf, self._logits(graph, out, want_logits)
        raise RuntimeError("the last segment has an exit; the manifest is inconsistent")

    def flush(self, cache: KVCache, stats: StepStats | None = None) -> StepStats:
        """Run every pending position through the deeper segments now (all or nothing)."""
        stats = StepStats() if stats is None else stats
        mark = cache.mark()
        try:
            self._flush(cache, stats)
        except BaseException:
            cache.rollback(mark)
            raise
        return stats

    def _flush(self, cache: KVCache, stats: StepStats) -> None:
        first = cache.first_pending()
        if first is None:
            return
        end = cache.position  # shallower segments hold every position: pending ends here
        hidden, start = None, None
        for j in range(first, len(self.manifest.segments)):
            begin = cache.segments[j].length
            x = cache.segment_input(j, hidden, start).astype(self.dtype, copy=False)
            out = self._run_segment(j, x, cache, end, stats)
            hidden, start = out.get(self.manifest.segments[j].names.get("hidden_out")), begin

    def owed(self, cache: KVCache) -> int:
        """Layer-positions the deferred states still need (each waits in one segment)."""
        total = self.manifest.model.num_layers
        return sum(n * (total - sg.layers[0]) for n, sg in zip(cache.pending_counts(), self.manifest.segments))

    def _logits(self, graph: SegmentSpec | GraphSpec, out: dict, want: bool) -> np.ndarray | None:
        """The head's logits (B, vocab): the full row if the graph has it, else (when asked)
        its top-k spread over the vocabulary with -inf elsewhere."""
        names = graph.names
        if "logits" in names or not want:
            return out.get(names["logits"]) if "logits" in names else None
        if "topk_values" not in names:
            raise ManifestError("sampling needs logits, and this export has neither top-k nor full logits "
                                "(it predates them): re-export, or use greedy decoding (temperature 0)")
        values = np.asarray(out[names["topk_values"]])  # from the GPU if there
        indices = np.asarray(out[names["topk_indices"]])
        return dense_logits(values, indices, self.manifest.model.vocab_size)

    # -- generation ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | np.ndarray, add_special_tokens: bool = True) -> np.ndarray:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        return np.asarray(ids, dtype=np.int64)

    def stream(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, **options) -> Stream:
        """Generate token by token: yields one TokenRecord per new token (its text piece, exit,
        confidence, time); the last one says why generation stopped (`record.stop`).

        Keyword options: `thresholds` (see resolve_thresholds); sampling, as in SamplingParams:
        temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed;
        stopping: every EOS id of the model (unless stop_at_eos=False), `stop` strings (the text
        is cut before them), `max_time` seconds, a `cancel` threading.Event (closing the iterator
        stops too); `reuse_cache=True` pre-fills only what the previous call's cache lacks.
        After (or instead of) iterating, `stream.result()` gives the GenerationResult."""
        return self._start(prompt, max_new_tokens, options)

    def generate(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, **options) -> GenerationResult:
        """The continuation of `prompt` as one GenerationResult (same options as `stream`)."""
        return self._start(prompt, max_new_tokens, options).result()

    # -- chat ------------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        """The model's own chat template, from the export (or set one: rt.chat_template = ...)."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_folder(self.folder, self.manifest.tokenizer.chat_template)
            if self._chat_template is None:
                raise ChatTemplateError(
                    f"{self.folder} has no chat template (the model was exported without one): use generate() "
                    f"with a plain prompt, or give a template (Runtime.load(..., chat_template=FILE), "
                    f"`lama chat --chat-template FILE`)")
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: ChatTemplate | None) -> None:
        self._chat_template = template

    def chat_ids(self, messages, add_generation_prompt: bool = True, **variables) -> np.ndarray:
        """The conversation rendered with the chat template and tokenized (no special tokens
        added: the template wrote them), as transformers' apply_chat_template(tokenize=True)."""
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False)

    def chat_stream(self, messages, max_new_tokens: int = 256, **options) -> Stream:
        """Stream the assistant's reply to `messages`. The KV cache of the conversation is kept
        between calls: a new turn pre-fills only the tokens the cache does not hold yet."""
        options.setdefault("reuse_cache", True)
        return self.stream(self.chat_ids(messages), max_new_tokens, **options)

    def chat(self, messages, max_new_tokens: int = 256, **options) -> GenerationResult:
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]) as a
        GenerationResult; `result.cached_tokens` says how much of the prompt the kept cache held."""
        options.setdefault("reuse_cache", True)
        return self.generate(self.chat_ids(messages), max_new_tokens, **options)

    def reset(self) -> None:
        """Forget the kept KV cache (the next call pre-fills its whole prompt)."""
        self._kept = None

    # -- the loop --------------------------------------------------------------------------
    def _start(self, prompt, max_new_tokens: int, options: dict) -> Stream:
        """Check everything before the first token, so errors surface at the call, not at the
        first next() of a stream."""
        options = dict(options)
        thresholds = options.pop("thresholds", None)
        stop_at_eos = options.pop("stop_at_eos", True)
        stopping = Stopping.build(self.manifest.tokenizer.eos_ids if stop_at_eos else (), options.pop("stop", None),
                                  options.pop("max_time", None), options.pop("cancel", None))
        reuse = bool(options.pop("reuse_cache", False))
        exact = bool(options.pop("exact", False))
        if "stream" in options:
            raise TypeError("generate() always returns a GenerationResult: use Runtime.stream(...) for records")
        try:
            params = SamplingParams(**options)
        except TypeError:
            raise TypeError(f"unknown generation options {sorted(options)}; see Runtime.stream") from None
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = self.encode(prompt)
        limit = self.max_context
        if len(ids) >= limit:
            what = "KV buffer capacity" if self.manifest.kv_cache.layout == "buffer" else "model's context"
            raise ValueError(f"prompt is {len(ids)} tokens; the {what} is {limit}")
        if exact:
            if not Sampler(params).greedy:
                raise ValueError("exact mode reproduces the full model's greedy output: use temperature 0")
            if self.kv_policy != "defer":
                raise ValueError("exact mode needs the 'defer' KV policy (the fill policy's caches are approximate)")
            if self.manifest.segments[-1].output("tokens_all") is None:
                raise ManifestError("exact mode needs the last segment's per-position tokens (output 'tokens_all'), "
                                    "which this export lacks: re-export it")
        run = _Run(ids.tolist(), stopping, Sampler(params), self.resolve_thresholds(thresholds), exact=exact,
                   eos=frozenset(self.manifest.tokenizer.eos_ids if stop_at_eos else ()))

        def finish(records: list[TokenRecord]) -> GenerationResult:
            text = self.tokenizer.decode([r.token for r in records])
            if run.stop == "stop":  # cut before the stop string, as the stream did
                text = text[:stopping.stop.find(text)]
            return GenerationResult.from_records(run.prompt, records, text, self.manifest.model.num_layers,
                                                 stop_reason=run.stop, cached_tokens=run.cached)

        return Stream(self._generate(ids, max_new_tokens, reuse, run), finish)

    def _tokens(self, x: np.ndarray, cache: KVCache, n: int, history: list[int], run: "_Run") -> Iterator[dict]:
        """Tokens in order, each once final: every token unless run.exact, where an early token
        is final once the last segment has checked it (flushing what waits when generation
        would end). Each carries the work of its step (and of discarded tokens and flushes)."""
        sampler, p, exact = run.sampler, cache.position + len(x), run.exact
        last, n_layers = len(self.manifest.segments) - 1, self.manifest.model.num_layers
        made: list[dict] = []  # one per token so far; token i sits at position p + i
        verified, shown = 0, 0
        carry = StepStats()  # work of discarded tokens and flushes, for the next record
        while True:
            done = len(made) >= n or (made and made[-1]["token"] in run.eos)
            if done and verified == len(made):
                return
            stats, t0 = StepStats(), time.perf_counter()
            if done:  # exact: what is left unverified runs deep now
                self.flush(cache, stats)
            else:
                token, j, conf, logits = self.step(x, cache, run.thresholds, want_logits=not sampler.greedy,
                                                   stats=stats)
                if not sampler.greedy:
                    token = sampler.pick(logits[0], history)
                made.append({"token": token, "exit_index": j, "exit_layer": self.manifest.segments[j].layers[1],
                             "confidence": conf, "work": StepStats(), "rollbacks": 0})
                history.append(token)
                x = np.array([token], dtype=np.int64)
            stats.seconds = time.perf_counter() - t0
            carry.add(stats)
            if exact:
                for pos in sorted(stats.full_tokens):
                    i = pos + 1 - p  # the full model's token for made[i]
                    if not 0 <= i < len(made):
                        continue
                    full = stats.full_tokens[pos]
                    if made[i]["token"] != full:  # roll back to that position, continue from the model's token
                        for r in made[i:]:
                            carry.add(r["work"])
                        rollbacks = 1 + sum(r["rollbacks"] for r in made[i:])
                        del made[i:]
                        del history[p + i:]
                        cache.truncate(p + i)
                        made.append({"token": full, "exit_index": last, "exit_layer": n_layers,
                                     "confidence": float("nan"), "work": StepStats(), "rollbacks": rollbacks})
                        history.append(full)
                        x = np.array([full], dtype=np.int64)
                        verified = i + 1
                        break
                    verified = max(verified, i + 1)
            else:
                verified = len(made)
            if len(made) > shown:  # the newest token not yet shown takes this step's (and carried) work
                made[-1]["work"].add(carry)
                carry = StepStats()
            owed = self.owed(cache)
            while shown < verified:
                made[shown]["owed"] = owed
                shown += 1
                yield made[shown - 1]

    def _generate(self, ids: np.ndarray, max_new_tokens: int, reuse: bool, run: "_Run") -> Iterator[TokenRecord]:
        limit = self.max_context
        run.stopping.start = time.perf_counter()  # max_time counts from the first step, not from the call
        # this generation owns the kept cache until it ends: a second stream started meanwhile
        # finds none and pre-fills from scratch instead of sharing (and corrupting) this one
        kept, self._kept = self._kept, None
        reused = kept.reuse_for(ids) if (reuse and kept is not None) else None
        cache, run.cached = reused if reused else (self.new_cache(), 0)
        stopping = run.stopping
        history = ids.tolist()  # the sequence so far: the repetition penalty looks at all of it
        consistent = True
        out_ids: list[int] = []
        try:
            n = min(max_new_tokens, limit - len(ids))
            if n == 0:
                run.stop = "max_new_tokens" if max_new_tokens == 0 else "context"
                return
            detok = IncrementalDecoder(self.tokenizer)  # complete characters only, linear time
            text, shown = "", 0
            for i, r in enumerate(self._tokens(ids[run.cached:], cache, n, history, run)):
                token = r["token"]
                out_ids.append(token)
                text += detok.add(token)
                limit_reason = None if i < n - 1 else ("max_new_tokens" if n == max_new_tokens else "context")
                run.stop, end = stopping.check(token, text, limit_reason)
                if run.stop and run.stop != "stop":  # the last token: show what is still pending too
                    text += detok.flush()
                    end = len(text)
                w = r["work"]
                yield TokenRecord(token, r["exit_index"], r["exit_layer"], r["confidence"], w.seconds,
                                  text[shown:max(shown, end)], run.stop, w.layer_positions, w.fill_positions,
                                  w.calls, r["owed"], r["rollbacks"])
                shown = max(shown, end)
                if run.stop:
                    return
        except Exception:  # a failed step left the cache as before it, but this call is over: keep none
            consistent = False
            raise
        finally:  # finished, closed or failed: hand the cache back for the next call to reuse
            final = ids.tolist() + out_ids  # exact mode: the cache may hold unverified positions beyond these
            if consistent and cache.position > len(final):
                cache.truncate(len(final))
            if consistent and cache.position > 0:
                self._kept = KeptSequence(final, cache)  # holds final[:cache.position]


@dataclass
class _Run:
    """What one generation needs besides its records, and what `generate` reads back after it."""

    prompt: list[int]
    stopping: Stopping
    sampler: Sampler
    thresholds: list[float]
    cached: int = 0  # prompt tokens the kept cache already held
    exact: bool = False  # verify early tokens with the last segment (defer, greedy)
    eos: frozenset = frozenset()  # exact mode verifies these before stopping
    stop: str | None = None
