"""Chain the segments on the device and stop as soon as an exit is confident.

One decoding step for the positions [p0, p] (the prompt at prefill, one token after):

    for each segment j:
        x = its pending states (positions earlier tokens skipped) + the new positions
        run the segment: new KV for its layers, the head's (token, confidence) for the
        last position, and the hidden states for the next segment
        if confidence >= threshold[j]: hand the hidden states to the KV policy and stop
    otherwise the last segment's token is the model's own

Greedy by default; sampling needs an export with `--with-logits`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .backends import Backend, open_backend
from .kv_cache import KVCache
from .manifest import Manifest, ManifestError, SegmentSpec
from .results import GenerationResult, TokenRecord
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

    @classmethod
    def load(cls, folder: str | Path, *, providers: list[str] | str | None = None, kv_policy: str = "defer",
             threads: int | None = None, verify: bool = True) -> "Runtime":
        """Validate the export folder (manifest version, files, checksums) and open one session per segment."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"export folder not found: {folder}")
        manifest = Manifest.load(folder)
        verify_files(folder, manifest, checksums=verify)
        if kv_policy not in ("defer", "copy"):
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose defer or copy")
        backends = [open_backend(folder, s, providers, threads) for s in manifest.segments]
        heads = [open_backend(folder, h, providers, threads) for h in manifest.heads]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(folder, manifest, backends, tokenizer, kv_policy, heads)

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
    def new_cache(self) -> KVCache:
        m = self.manifest.model
        layers = [s.layers[1] - s.layers[0] for s in self.manifest.segments]
        return KVCache.empty(layers, m.num_kv_heads, m.head_dim, self.dtype, self.kv_policy)

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
            out = backend.run(self._feeds(seg, x, cache, j, end))
            cache.store(j, [out[s.name] for s in seg.per_layer(seg.outputs, "present_key")],
                        [out[s.name] for s in seg.per_layer(seg.outputs, "present_value")])
            conf = float(out["confidence"][0])
            if seg.exit is None:
                cache.position = end
                return int(out["token"][0]), j, conf, out.get("logits")
            hidden = out["hidden_out"]
            if conf >= thresholds[j]:
                cache.defer(j, hidden, start)
                cache.position = end
                if seg.exit.head is not None:  # gate said exit: now, and only now, run the head
                    out = self.head_backends[seg.exit.head].run({"exit_hidden": out["exit_hidden"]})
                return int(out["token"][0]), j, conf, out.get("logits")
        raise RuntimeError("the last segment has an exit; the manifest is inconsistent")

    # -- generation ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | np.ndarray) -> np.ndarray:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        return np.asarray(ids, dtype=np.int64)

    def generate(self, prompt: str | list[int] | np.ndarray, max_new_tokens: int = 32, *,
                 thresholds: Thresholds = None, temperature: float = 0.0, seed: int = 0,
                 stop_at_eos: bool = True, stream: bool = False):
        """Greedy (or sampled) continuation of `prompt`. Returns a GenerationResult, or with
        stream=True an iterator of TokenRecords (each with its text piece)."""
        it = self._generate(prompt, max_new_tokens, thresholds, temperature, seed, stop_at_eos)
        if stream:
            return it
        records = list(it)
        return GenerationResult.from_records(self.encode(prompt).tolist(), records,
                                             self.tokenizer.decode([r.token for r in records]),
                                             self.manifest.model.num_layers)

    def _generate(self, prompt, max_new_tokens, thresholds, temperature, seed, stop_at_eos) -> Iterator[TokenRecord]:
        ids = self.encode(prompt)
        limit = self.manifest.model.max_context
        if len(ids) >= limit:
            raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {limit}")
        th = self.resolve_thresholds(thresholds)
        sample = temperature > 0
        if sample and self.manifest.segments[-1].output("logits") is None:
            raise ValueError("sampling needs logits: export with --with-logits, or use temperature 0 (greedy)")
        rng = np.random.default_rng(seed)
        cache = self.new_cache()
        eos = set(self.manifest.tokenizer.eos_ids)
        out_ids: list[int] = []
        text = ""
        x = ids
        for _ in range(min(max_new_tokens, limit - len(ids))):
            t0 = time.perf_counter()
            token, j, conf, logits = self.step(x, cache, th, want_logits=sample)
            if sample:
                z = logits[0].astype(np.float64) / temperature
                p = np.exp(z - z.max())
                token = int(rng.choice(len(p), p=p / p.sum()))
            dt = time.perf_counter() - t0
            out_ids.append(token)
            new_text = self.tokenizer.decode(out_ids)
            layer = self.manifest.segments[j].layers[1]
            yield TokenRecord(token, j, layer, conf, dt, new_text[len(text):])
            text = new_text
            if stop_at_eos and token in eos:
                return
            x = np.array([token], dtype=np.int64)
