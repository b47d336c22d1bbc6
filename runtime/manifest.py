"""The manifest: the one contract between the exporter (host) and the runtime (device).

Standard library only. The exporter fills these dataclasses and writes `manifest.json`;
the runtime reads it back and never imports the exporter. The format carries a name and
a schema version from day one; readers keep a list of versions they understand and
reject others with a message that names both.

Tensor names are not hard-coded in the runtime: each segment lists its inputs and outputs
by *role* (``input_ids``, ``hidden``, ``attention_mask``, ``position_ids``, ``past_key``,
``past_value``, ``hidden_out``, ``present_key``, ``present_value``, ``token``,
``confidence``, ``topk_values``, ``topk_indices``, ``logits``; the last segment also
``tokens_all``: the full model's token at every position it ran, for exact mode, and
``topk_values_all``/``topk_indices_all``/``logits_all``: its distribution there, for exact
sampling), and per-layer
roles carry the global layer index. The head's top-k size is the second dimension of
``topk_values``. Exports with the KV buffer layout (schema 2, `kv_cache.layout == "buffer"`) add
``seqlens_k`` and ``total_sequence_length``, and their past/present pairs name one preallocated
buffer. A segment after an exit may carry a K/V fill graph (``kv_fill``: roles ``hidden``,
``position_ids`` in; ``fill_key``/``fill_value`` per layer out) for the `fill` KV policy: it
covers every layer from that segment's first to the model's last, the layers a token leaving
just before that segment skips.

The role strings are defined once, in runtime/roles.py. The runtime finds every tensor it feeds or
reads through these lists (`names`: role -> name,
`feeds`: inputs by role -> by name, `per_layer`), so an exporter may name tensors as it likes;
the lists are the role map, written by the exporter since schema 1. Reading a manifest also
checks its structure: contiguous layer ranges covering the model, an exit at the end of every
segment but the last, head indices that exist (`Manifest.check_structure`), and every value
the runtime relies on (`Manifest.check_values`: sizes, token ids, thresholds, file names, dims),
so a bad manifest is refused at load with a ManifestError that names the key, not later inside
onnxruntime or numpy.

Every field, its type and the schema version that added it: docs/manifest.md (the spec);
tests/data/manifests/ holds a golden manifest of each supported version, loaded by
tests/test_golden_manifests.py. One source of truth per fact (schema 3): the thresholds the runtime uses are
`calibration.thresholds` (an exit records no copy), the KV layout is `kv_cache.layout` (no
`kv_layout` string). Older manifests that carry those copies still load; the copies are
ignored. Every file the runtime reads carries its size and sha256, tokenizer files included
(schema 3; older manifests list tokenizer files by name only, and those are checked for
presence only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from . import roles as R, validate
from .errors import ManifestError

FORMAT = "lama-manifest"
SCHEMA_VERSION = 3
# 2: kv_cache (layout concat | buffer); a v1 manifest reads as layout concat
# 3: tokenizer files with sha256 and size; no exit.threshold (calibration.thresholds is the one
#    copy), no kv_layout (kv_cache.layout is)
SUPPORTED_VERSIONS = (1, 2, 3)
KV_LAYOUTS = ("concat", "buffer")
CONFIDENCES = ("top1", "margin", "gate")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
_OLD_EXIT_KEYS = ("threshold",)  # copies schema < 3 wrote in each exit; ignored on read (as is kv_layout)
MANIFEST_FILE = "manifest.json"
_SEGMENT_KEYS_FIRST = ("index", "layers", "file", "sha256", "size", "inputs", "outputs", "exit")  # then engine,
# data_files, kv_fill, in field order


@dataclass(frozen=True)
class TensorSpec:
    role: str
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple  # ints and named dims ("batch", "sequence", "past", "total")
    layer: int | None = None  # global layer index for per-layer roles (KV cache)


@dataclass(frozen=True)
class ExitSpec:
    exit_layer: int  # decoder layers computed before this exit
    confidence: str  # "top1" | "margin" | "gate"; its threshold is in CalibrationInfo.thresholds
    head: int | None = None  # gate mode: index into Manifest.heads, run only when the gate says exit


@dataclass(frozen=True)
class DataFile:
    """A file a graph reads beside it: ONNX external weights (`segment_00.onnx.data`) of a
    graph too large for one protobuf. Checked like the graph itself, so corrupted weights
    cannot load silently. Also a tokenizer file (TokenizerInfo.files); there, manifests before
    schema 3 recorded the name only (sha256 and size None: checked for presence only)."""

    file: str
    sha256: str | None
    size: int | None


class _Tensors:
    """Role lookups shared by segments and other graphs: the runtime finds every tensor it
    feeds or reads by role here, never by a hard-coded name."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, role: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.role == role), None)

    def output(self, role: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.role == role), None)

    def per_layer(self, specs: tuple[TensorSpec, ...], role: str) -> list[TensorSpec]:
        return sorted((t for t in specs if t.role == role), key=lambda t: t.layer)

    @cached_property
    def names(self) -> dict[str, str]:
        """Role -> tensor name for the graph's one-per-graph roles (inputs and outputs: their
        roles never overlap). Per-layer roles (KV) are read with `per_layer`."""
        return {t.role: t.name for t in (*self.inputs, *self.outputs) if t.layer is None}

    def name(self, role: str) -> str:
        """The tensor name of `role`; ManifestError if the graph has no such tensor."""
        try:
            return self.names[role]
        except KeyError:
            raise ManifestError(f"graph {getattr(self, 'file', '?')} has no tensor with role {role!r} "
                                f"(it has {sorted(self.names)})") from None

    def feeds(self, by_role: dict) -> dict:
        """Inputs keyed by role -> keyed by the graph's names. Roles the graph does not list are
        left out: an export drops inputs its graph never reads (e.g. the attention mask of a
        GroupQueryAttention graph, position ids a model without rotary does not use)."""
        names = self.names
        return {names[role]: value for role, value in by_role.items() if role in names}


@dataclass(frozen=True, kw_only=True)
class GraphSpec(_Tensors):
    """A graph file and its tensors by role: what every graph in the manifest has (segments
    add their place in the chain, `SegmentSpec`). On its own: a graph that is not a segment,
    an exit head run on demand (gate mode) or a K/V fill graph."""

    file: str
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    engine: dict | None = None  # TensorRT engine: file, sha256, size, tensorrt_version, compute_capability
    data_files: tuple[DataFile, ...] = ()  # the graph's external weights (size/sha256 of each)


@dataclass(frozen=True, kw_only=True)
class SegmentSpec(GraphSpec):
    """A segment: decoder layers [first, end) of the chain and the exit at their end."""

    index: int
    layers: tuple[int, int]  # [first, end) decoder layers
    exit: ExitSpec | None  # None for the last segment (the model's own head)
    kv_fill: GraphSpec | None = None  # keys/values of layers [first, num_layers) from an exited hidden state

    @property
    def entry_role(self) -> str:
        """The role of the input the chain feeds: token ids (first segment) or the previous
        segment's states."""
        return R.INPUT_IDS if R.INPUT_IDS in self.names else R.HIDDEN


@dataclass(frozen=True)
class ModelShape:
    """The sizes that shape every graph and KV cache: what the exporter's family adapters read
    from a model and the runtime reads from the manifest (as part of ModelInfo)."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int


@dataclass(frozen=True)
class ModelInfo(ModelShape):
    """The exported model: its shape, where it came from and its family."""

    base_model: str
    family: str


@dataclass(frozen=True)
class TokenizerInfo:
    files: tuple[DataFile, ...]  # copied beside the manifest, checked like graphs; the runtime reads
    # tokenizer.json (and tokenizer_config.json / the chat template for chat)
    bos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends a sequence (tokenizer + generation_config)
    pad_id: int | None
    chat_template: str | None = None  # file beside the manifest holding the Jinja2 chat template


@dataclass(frozen=True)
class CalibrationInfo:
    confidence: str
    policy: dict  # {"kind": "target", "target": .95, "delta": None} or {"kind": "budget", ...}
    thresholds: tuple  # per exit, None = never: what the runtime uses by default
    by_target: dict  # "0.9" -> thresholds: alternatives a device can switch to without re-export
    report: dict  # held-out figures the exporter measured
    by_target_delta: float | None = None  # the guarantee's delta every by_target row was chosen with


@dataclass(frozen=True)
class KVCacheInfo:
    """How segments take and give back their KV cache.

    "concat": past K/V in, present = concat(past, new) out (the runtime keeps the returned
    arrays; every token copies the cache). "buffer": attention is onnxruntime's
    GroupQueryAttention on a preallocated (batch, kv_heads, capacity, head_dim) buffer per
    layer that the runtime binds as both past and present; inputs seqlens_k and
    total_sequence_length say where the valid part ends. Needs onnxruntime's CPU provider.
    """

    layout: str = "concat"
    capacity: int | None = None  # buffer: positions a buffer holds (the RoPE tables cover them)

    def __post_init__(self) -> None:
        if self.layout not in KV_LAYOUTS:
            raise ManifestError(f"unknown KV layout {self.layout!r}; this runtime knows {list(KV_LAYOUTS)}")
        if self.layout == "buffer" and (not isinstance(self.capacity, int) or self.capacity < 1):
            raise ManifestError(f"KV layout 'buffer' needs a positive integer capacity, got {self.capacity!r}")


@dataclass(frozen=True)
class QuantizationInfo:
    """How the weights of an int8/int4 export were quantized (absent for fp32/fp16).

    Optional, added while the schema was 2 without a version bump: readers that predate it
    ignore the key, and the graphs still run on onnxruntime (MatMulNBits is a contrib op of its
    CPU and CUDA providers). The full field list, with the version that added each, is
    docs/manifest.md."""

    method: str  # e.g. "onnxruntime MatMulNBits (weight-only, round-to-nearest)"
    bits: int  # 4 or 8
    block_size: int  # weights quantized in blocks of this many inputs, one scale (+ zero point) each
    symmetric: bool  # False: a zero point per block
    accuracy_level: int  # MatMulNBits accuracy_level: 0 = float compute, 4 = int8 activations in the kernel
    graphs: tuple[str, ...]  # files whose weight MatMuls were quantized
    quantized_matmuls: int = 0  # MatMulNBits nodes over all graphs
    float_matmuls: tuple[str, ...] = ()  # weight MatMuls deliberately left in float (exit gates)
    calibration: dict = field(default_factory=dict)  # what the thresholds were calibrated on, and the
    # quantized model's own agreement with the fp32 one
    exact_blocks: dict = field(default_factory=dict)  # {"q4_1": n, "q8_0": n, ...}: weights whose GGUF blocks
    # were kept exactly instead of re-quantized (optional, added in schema 2)


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    tokenizer: TokenizerInfo
    segments: tuple[SegmentSpec, ...]
    calibration: CalibrationInfo
    precision: str  # "fp32" | "fp16" | "int8" | "int4" (weights; activations and KV stay float32 for int*)
    dims: dict  # named dims -> {"min", "opt", "max"} (TensorRT profiles, runtime checks)
    heads: tuple[GraphSpec, ...] = ()
    kv_cache: KVCacheInfo = field(default_factory=KVCacheInfo)
    exporter_version: str = ""
    quantization: QuantizationInfo | None = None
    # the n-gram draft table for exact decoding (runtime/drafting.NgramTable; `ngram.npz`), optional:
    # exports of checkpoints trained before `lama train` made one have none
    ngram: DataFile | None = None
    # every graph computes a position the same way whatever the call's shape (concat layout with
    # grouped attention, exporter/grouped_attention.py): exact decoding then gives the full path's
    # tokens bit for bit, int4 too. Optional (3); absent = False
    row_invariant: bool = False
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    # -- IO ----------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        # a segment's keys in the order every exporter has written them (the GraphSpec base would
        # put its fields first): the same export gives the same bytes
        d["segments"] = [{**{k: seg[k] for k in _SEGMENT_KEYS_FIRST}, **seg} for seg in d["segments"]]
        return json.dumps(d, indent=2)

    def save(self, folder: str | Path) -> Path:
        """Write manifest.json, after the checks a reader makes: a manifest the runtime would
        refuse is never written."""
        path = Path(folder) / MANIFEST_FILE
        self.check(str(path))
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        if d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a LAMA manifest (format={d.get('format')!r}, expected {FORMAT!r})")
        v = d.get("schema_version")
        if v not in SUPPORTED_VERSIONS:
            raise ManifestError(f"{where}: manifest schema version {v} is not supported by this runtime "
                                f"(supported: {list(SUPPORTED_VERSIONS)}); re-export with a matching exporter "
                                f"or upgrade the runtime")
        def tensors(items) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in items)

        def data_files(g: dict) -> tuple[DataFile, ...]:
            return tuple(DataFile(**f) for f in g.get("data_files", ()))


        def tokenizer_file(f) -> DataFile:  # schema < 3: a bare name, no checksum
            return DataFile(f, None, None) if isinstance(f, str) else DataFile(**f)

        try:
            def graph(h: dict) -> GraphSpec:
                return GraphSpec(**{**h, "inputs": tensors(h["inputs"]), "outputs": tensors(h["outputs"]),
                                    "data_files": data_files(h)})

            segs = tuple(
                SegmentSpec(**{**s, "layers": tuple(s["layers"]), "inputs": tensors(s["inputs"]),
                               "outputs": tensors(s["outputs"]), "data_files": data_files(s),
                               "exit": ExitSpec(**{k: x for k, x in s["exit"].items() if k not in _OLD_EXIT_KEYS}) if s.get("exit") else None,
                               "kv_fill": graph(s["kv_fill"]) if s.get("kv_fill") else None})
                for s in d["segments"])
            heads = tuple(graph(h) for h in d.get("heads", ()))
            tok = d["tokenizer"]
            cal = d["calibration"]
            q = d.get("quantization")
            quant = (QuantizationInfo(**{**q, "graphs": tuple(q["graphs"]),
                                         "float_matmuls": tuple(q.get("float_matmuls", ()))}) if q else None)
            manifest = cls(
                model=ModelInfo(**d["model"]),
                tokenizer=TokenizerInfo(**{**tok, "files": tuple(tokenizer_file(f) for f in tok["files"]),
                                           "eos_ids": tuple(tok["eos_ids"])}),
                segments=segs,
                calibration=CalibrationInfo(**{**cal, "thresholds": tuple(cal["thresholds"])}),
                precision=d["precision"], dims=d["dims"], heads=heads,
                kv_cache=KVCacheInfo(**d["kv_cache"]) if "kv_cache" in d else KVCacheInfo(),
                exporter_version=d.get("exporter_version", ""), quantization=quant,
                ngram=DataFile(**d["ngram"]) if d.get("ngram") else None,
                row_invariant=d.get("row_invariant", False), format=d["format"],
                schema_version=v)
        except (KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        manifest.check(where)
        return manifest

    def check(self, where: str = "manifest") -> None:
        """ManifestError unless the values and the structure are what the runtime can run."""
        self.check_values(where)
        self.check_structure(where)

    def check_values(self, where: str = "manifest") -> None:
        """ManifestError naming the key unless every value the runtime relies on has its type
        and range: positive model sizes; token ids inside the vocabulary; thresholds that are
        numbers (not NaN) or None, in calibration and every by_target row; file names inside the
        folder with their sizes and sha256; a known precision and confidence kind; integer dims."""
        try:
            self._check_values()
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: {e}") from None

    def _check_values(self) -> None:
        v = validate
        m = self.model
        for key in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "vocab_size", "max_context"):
            v.integer(getattr(m, key), f"model.{key}", 1)
        vocab = m.vocab_size
        tok = self.tokenizer
        for i, f in enumerate(tok.files):
            v.file_name(f.file, f"tokenizer.files[{i}]")
            if f.sha256 is not None or f.size is not None or self.schema_version >= 3:
                self._check_file(f, f"tokenizer.files[{i}]")
        names = {f.file for f in tok.files}
        if tok.chat_template is not None:
            v.file_name(tok.chat_template, "tokenizer.chat_template")
        for key in ("bos_id", "pad_id"):
            v.integer(getattr(tok, key), f"tokenizer.{key}", 0, vocab - 1, optional=True,
                      meaning="a token id of the model's vocabulary")
        for i, t in enumerate(tok.eos_ids):
            v.integer(t, f"tokenizer.eos_ids[{i}]", 0, vocab - 1, meaning="a token id of the model's vocabulary")
        if self.schema_version >= 3 and "tokenizer.json" not in names:
            raise ValueError(f"tokenizer.files must list tokenizer.json (the tokenizer the runtime reads), "
                             f"got {sorted(names)}")
        v.one_of(self.precision, "precision", PRECISIONS)
        if not isinstance(self.row_invariant, bool):
            raise TypeError(f"row_invariant must be true or false, got {self.row_invariant!r}")
        if self.row_invariant and self.kv_cache.layout != "concat":
            raise ValueError("row_invariant is only true for the concat KV layout (GroupQueryAttention's "
                             "one-position calls round differently)")
        if self.ngram is not None:
            v.file_name(self.ngram.file, "ngram.file")
            self._check_file(self.ngram, "ngram")
        graphs = [(f"segments[{k}]", s) for k, s in enumerate(self.segments)]
        graphs += [(f"heads[{k}]", h) for k, h in enumerate(self.heads)]
        graphs += [(f"segments[{k}].kv_fill", s.kv_fill) for k, s in enumerate(self.segments) if s.kv_fill]
        for what, g in graphs:
            v.file_name(g.file, f"{what}.file")
            self._check_file(g, what)
            for i, f in enumerate(g.data_files):
                v.file_name(f.file, f"{what}.data_files[{i}].file")
                self._check_file(f, f"{what}.data_files[{i}]")
            for kind in ("inputs", "outputs"):
                for i, t in enumerate(getattr(g, kind)):
                    at = f"{what}.{kind}[{i}]"
                    for key in ("role", "name", "dtype"):
                        if not isinstance(getattr(t, key), str):
                            raise TypeError(f"{at}.{key} must be a str, got {getattr(t, key)!r}")
                    v.integer(t.layer, f"{at}.layer", 0, m.num_layers - 1, optional=True)
            if g.engine is not None and not isinstance(g.engine, dict):
                raise TypeError(f"{what}.engine must be an object or null, got {g.engine!r}")
        for k, s in enumerate(self.segments):
            v.integer(s.index, f"segments[{k}].index", k, k, meaning="its place in the list")
            if len(s.layers) != 2:
                raise ValueError(f"segments[{k}].layers must be [first, end), got {list(s.layers)}")
            for i, layer in enumerate(s.layers):
                v.integer(layer, f"segments[{k}].layers[{i}]", 0, m.num_layers)
            if s.exit is not None:
                v.integer(s.exit.exit_layer, f"segments[{k}].exit.exit_layer", 1, m.num_layers)
                v.one_of(s.exit.confidence, f"segments[{k}].exit.confidence", CONFIDENCES)
                v.integer(s.exit.head, f"segments[{k}].exit.head", 0, optional=True)
        cal = self.calibration
        v.one_of(cal.confidence, "calibration.confidence", CONFIDENCES)
        _check_thresholds(cal.thresholds, "calibration.thresholds")
        if not isinstance(cal.by_target, dict):
            raise TypeError(f"calibration.by_target must be an object (target -> thresholds), got {cal.by_target!r}")
        for key, row in cal.by_target.items():
            try:
                target = float(key)
            except ValueError:
                raise ValueError(f"calibration.by_target key {key!r} is not a target number") from None
            v.number(target, f"calibration.by_target key {key!r}", 0, 1, low_open=True)
            _check_thresholds(row, f"calibration.by_target[{key!r}]")
        v.number(cal.by_target_delta, "calibration.by_target_delta", 0, 1, low_open=True, optional=True)
        if not isinstance(self.dims, dict):
            raise TypeError(f"dims must be an object (name -> min/opt/max), got {self.dims!r}")
        for name, dim in self.dims.items():
            if not isinstance(dim, dict):
                raise TypeError(f"dims[{name!r}] must be an object with min/opt/max, got {dim!r}")
            for key in ("min", "opt", "max"):
                v.integer(dim.get(key), f"dims[{name!r}].{key}", 0, optional=True)
        decode = self.dims.get("decode_sequence")
        if decode is not None and decode.get("max") is not None:
            v.integer(decode["max"], "dims['decode_sequence'].max", 1, meaning="positions one decode call takes")

    @staticmethod
    def _check_file(f, what: str) -> None:
        if not isinstance(f.sha256, str) or len(f.sha256) != 64:
            raise ValueError(f"{what}.sha256 must be 64 hex digits, got {f.sha256!r}")
        validate.integer(f.size, f"{what}.size", 0, meaning="bytes")

    def check_structure(self, where: str = "manifest") -> None:
        """ManifestError unless the segments chain the whole model: contiguous layer ranges
        from 0 to num_layers, an exit at the end of every segment but the last (which is the
        model's own head), every gate-mode exit's head index naming one of `heads`, and one
        threshold per exit in calibration.thresholds and in every by_target row."""
        n = self.model.num_layers
        if not self.segments:
            raise ManifestError(f"{where}: the manifest lists no segments")
        expected = 0
        for k, seg in enumerate(self.segments):
            first, end = seg.layers
            if first != expected:
                what = "the model's first layer 0" if k == 0 else f"where segment {k - 1} ends ({expected})"
                raise ManifestError(f"{where}: segment {k} starts at layer {first}, not at {what}: the layer "
                                    f"ranges must be contiguous")
            if end <= first:
                raise ManifestError(f"{where}: segment {k} has the empty layer range [{first}, {end})")
            expected = end
            last = k == len(self.segments) - 1
            if last and seg.exit is not None:
                raise ManifestError(f"{where}: the last segment ({k}) has an exit; it must end in the model's own head")
            if not last and seg.exit is None:
                raise ManifestError(f"{where}: segment {k} has no exit; every segment but the last ends in one")
            if seg.exit is not None and seg.exit.exit_layer != end:
                raise ManifestError(f"{where}: segment {k}'s exit is after layer {seg.exit.exit_layer}, but the "
                                    f"segment ends at layer {end}")
            if seg.exit is not None and seg.exit.head is not None and not 0 <= seg.exit.head < len(self.heads):
                raise ManifestError(f"{where}: segment {k}'s exit runs head {seg.exit.head}, but the manifest lists "
                                    f"{len(self.heads)} head graph(s)")
        if expected != n:
            raise ManifestError(f"{where}: the segments cover layers [0, {expected}), but the model has {n} layers")
        exits = len(self.exits)
        rows = {"calibration.thresholds": self.calibration.thresholds,
                **{f"calibration.by_target[{k!r}]": row for k, row in self.calibration.by_target.items()}}
        for what, row in rows.items():
            if len(row) != exits:
                raise ManifestError(f"{where}: {what} has {len(row)} thresholds for {exits} exits")

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{folder}: no {MANIFEST_FILE} found; is this a `lama export` folder?")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    # -- helpers -----------------------------------------------------------------------
    @property
    def exits(self) -> list[ExitSpec]:
        return [s.exit for s in self.segments if s.exit is not None]

    def thresholds_for(self, target: float) -> list[float | None]:
        key = target_key(target)
        if key not in self.calibration.by_target:
            raise ManifestError(f"no thresholds for target {target} in this export; "
                                f"available: {sorted(self.calibration.by_target)}")
        return list(self.calibration.by_target[key])


def target_key(target: float) -> str:
    """The key of `target` in CalibrationInfo.by_target ("0.9", "0.95"): one spelling for
    the exporter that writes the table and the runtime that looks rows up."""
    return f"{float(target):g}"


def to_json_thresholds(thresholds) -> list[float | None]:
    """Thresholds as the manifest and checkpoints store them: +inf (never exits) -> None."""
    return [None if t is None or t == float("inf") else float(t) for t in thresholds]


def _check_thresholds(values, what: str) -> None:
    """A list of thresholds, each None (never exits) or a number that is not NaN."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{what} must be a list of thresholds (one per exit), got {values!r}")
    for i, t in enumerate(values):
        validate.number(t, f"{what}[{i}]", finite=False, optional=True, meaning="null = never exits")


def from_json_thresholds(thresholds) -> list[float]:
    """Stored thresholds back to numbers: None (never exits) -> +inf."""
    return [float("inf") if t is None else float(t) for t in thresholds]
