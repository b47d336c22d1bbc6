"""Chain the segments on the device and stop as soon as an exit is confident.

One decoding step for the positions [p0, p] (the prompt at prefill, one token after):

    for each segment j:
        x = its pending states (positions earlier tokens skipped) + the new positions
        run the segment: new KV for its layers, the head's (token, confidence) for the
        last position, and the hidden states for the next segment
        if confidence >= threshold[j]: hand the hidden states to the KV policy and stop
    otherwise the last segment's token is the model's own

Greedy by default: the graph's own top token. Sampling reads each head's top-k logits (every
export has them; `--with-logits` exports the full vocabulary), see runtime/sampling.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import Backend, open_backend
from .detokenize import IncrementalDecoder
from .kv_cache import KVCache
from .kv_buffer import KVBufferCache
from .manifest import Manifest, ManifestError, SegmentSpec
from .chat import ChatTemplate, ChatTemplateError, special_tokens
from .prefix_cache import KeptSequence
from .results import GenerationResult, Stream, TokenRecord
from .sampling import SamplingParams, Sampler, dense_logits
from .stopping import Stopping
from .verify import verify_files

Thresholds = list[float | None] | float | str | None


class Runtime:
    def __init__(self, folder: Path, manifest: Manifest, backends: list[Backend], tokenizer, kv_policy: str,
                 head_backends: list[Backend] = ()):
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

    @classmethod
    def load(cls, folder: str | Path, *, providers: list[str] | str | None = None, kv_policy: str = "defer",
             threads: int | None = None, verify: bool = True,
             chat_template: str | Path | None = None) -> "Runtime":
        """Validate the export folder (manifest version, files, checksums) and open one session per segment."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"export folder not found: {folder}")
        manifest = Manifest.load(folder)
        verify_files(folder, manifest, checksums=verify)
        if kv_policy not in ("defer", "copy"):
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose defer or copy")
        wanted = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
        if manifest.kv_cache.layout == "buffer" and wanted != ["CPUExecutionProvider"]:
            raise ManifestError(f"this export uses the KV buffer layout (onnxruntime's GroupQueryAttention on "
                                f"buffers bound in host memory), which runs on the CPU provider only here, not "
                                f"on {wanted}; export with --kv concat for GPUs and TensorRT")
        backends = [open_backend(folder, s, providers, threads) for s in manifest.segments]
        heads = [open_backend(folder, h, providers, threads) for h in manifest.heads]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        rt = cls(folder, manifest, backends, tokenizer, kv_policy, heads)
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
        return [float("inf") if t is None else float(t) for t in values]

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
        return KVCache.empty(layers, m.num_kv_heads, m.head_dim, self.dtype, self.kv_policy)

    def _run_segment(self, j: int, seg: SegmentSpec, backend: Backend, x: np.ndarray, cache: KVCache,
                     end: int) -> dict:
        """Run segment j and keep its new KV: returned arrays (concat), or written in place (buffer)."""
        if isinstance(cache, KVBufferCache):
            return cache.run(j, seg, backend, x, end)
        out = backend.run(self._feeds(seg, x, cache, j, end))
        cache.store(j, [out[s.name] for s in seg.per_layer(seg.outputs, "present_key")],
                    [out[s.name] for s in seg.per_layer(seg.outputs, "present_value")])
        return out

    def _feeds(self, seg: SegmentSpec, x: np.ndarray, cache: KVCache, j: int, end: int) -> dict:
        st = cache.segments[j]
        feeds = {seg.inputs[0].name: x,
                 "attention_mask": np.ones((1, end), dtype=np.int64),
                 "position_ids": np.arange(st.length, end, dtype=np.int64)[None, :]}
        for spec, arr in zip(seg.per_layer(seg.inputs, "past_key"), st.keys):
            feeds[spec.name] = arr
        for spec, arr in zip(seg.per_layer(seg.inputs, "past_value"), st.values):
            feeds[spec.name] = arr
        return feeds

    def step(self, ids: np.ndarray, cache: KVCache, thresholds: list[float], want_logits: bool = False):
        """Feed token ids (positions cache.position ..) and return (token, exit index, confidence, logits)."""
        start0 = cache.position
        end = start0 + ids.shape[-1]
        hidden, start = None, start0
        for j, (seg, backend) in enumerate(zip(self.manifest.segments, self.backends)):
            if j == 0:
                x = ids.reshape(1, -1).astype(np.int64)
            else:
                begin = cache.segments[j].length
                x = cache.segment_input(j, hidden, start).astype(self.dtype, copy=False)
                start = begin
            out = self._run_segment(j, seg, backend, x, cache, end)
            conf = float(out["confidence"][0])
            if seg.exit is None:
                cache.position = end
                return int(out["token"][0]), j, conf, self._logits(out, want_logits)
            hidden = out["hidden_out"]
            if conf >= thresholds[j]:
                cache.defer(j, hidden, start)
                cache.position = end
                if seg.exit.head is not None:  # gate said exit: now, and only now, run the head
                    out = self.head_backends[seg.exit.head].run({"exit_hidden": out["exit_hidden"]})
                return int(out["token"][0]), j, conf, self._logits(out, want_logits)
        raise RuntimeError("the last segment has an exit; the manifest is inconsistent")

    def _logits(self, out: dict, want: bool) -> np.ndarray | None:
        """The head's logits (B, vocab): the full row if the graph has it, else (when asked)
        its top-k spread over the vocabulary with -inf elsewhere."""
        if "logits" in out or not want:
            return out.get("logits")
        if "topk_values" not in out:
            raise ManifestError("sampling needs logits, and this export has neither top-k nor full logits "
                                "(it predates them): re-export, or use greedy decoding (temperature 0)")
        values, indices = np.asarray(out["topk_values"]), np.asarray(out["topk_indices"])  # from the GPU if there
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
        run = _Run(ids.tolist(), stopping, Sampler(params), self.resolve_thresholds(thresholds))

        def finish(records: list[TokenRecord]) -> GenerationResult:
            text = self.tokenizer.decode([r.token for r in records])
            if run.stop == "stop":  # cut before the stop string, as the stream did
                text = text[:stopping.stop.find(text)]
            return GenerationResult.from_records(run.prompt, records, text, self.manifest.model.num_layers,
                                                 stop_reason=run.stop, cached_tokens=run.cached)

        return Stream(self._generate(ids, max_new_tokens, reuse, run), finish)

    def _generate(self, ids: np.ndarray, max_new_tokens: int, reuse: bool, run: "_Run") -> Iterator[TokenRecord]:
        limit = self.max_context
        run.stopping.start = time.perf_counter()  # max_time counts from the first step, not from the call
        # this generation owns the kept cache until it ends: a second stream started meanwhile
        # finds none and pre-fills from scratch instead of sharing (and corrupting) this one
        kept, self._kept = self._kept, None
        reused = kept.reuse_for(ids) if (reuse and kept is not None) else None
        cache, run.cached = reused if reused else (self.new_cache(), 0)
        sampler, stopping = run.sampler, run.stopping
        history = ids.tolist()  # the sequence so far: the repetition penalty looks at all of it
        consistent = True  # False while a step runs: one that fails half-way leaves a broken cache
        try:
            n = min(max_new_tokens, limit - len(ids))
            if n == 0:
                run.stop = "max_new_tokens" if max_new_tokens == 0 else "context"
                return
            detok = IncrementalDecoder(self.tokenizer)  # complete characters only, linear time
            text, shown = "", 0
            x = ids[run.cached:]
            for i in range(n):
                t0 = time.perf_counter()
                consistent = False
                token, j, conf, logits = self.step(x, cache, run.thresholds, want_logits=not sampler.greedy)
                consistent = True
                if not sampler.greedy:
                    token = sampler.pick(logits[0], history)
                dt = time.perf_counter() - t0
                history.append(token)
                text += detok.add(token)
                limit_reason = None if i < n - 1 else ("max_new_tokens" if n == max_new_tokens else "context")
                run.stop, end = stopping.check(token, text, limit_reason)
                if run.stop and run.stop != "stop":  # the last token: show what is still pending too
                    text += detok.flush()
                    end = len(text)
                layer = self.manifest.segments[j].layers[1]
                yield TokenRecord(token, j, layer, conf, dt, text[shown:max(shown, end)], run.stop)
                shown = max(shown, end)
                if run.stop:
                    return
                x = np.array([token], dtype=np.int64)
        finally:  # finished, closed or failed: hand the cache back for the next call to reuse
            if consistent and cache.position > 0:
                self._kept = KeptSequence(history, cache)  # holds history[:cache.position]


@dataclass
class _Run:
    """What one generation needs besides its records, and what `generate` reads back after it."""

    prompt: list[int]
    stopping: Stopping
    sampler: Sampler
    thresholds: list[float]
    cached: int = 0  # prompt tokens the kept cache already held
    stop: str | None = None
