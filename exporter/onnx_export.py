"""Export a calibrated checkpoint as one ONNX graph per segment plus a manifest.

Every export ends with the same steps: graphs -> checker -> tokenizer files -> manifest,
all in a temporary folder that replaces the destination only when everything succeeded.
Tracing uses torch.onnx.export(dynamo=False) at batch 2, sequence 5, past 3 (see
../shared/KNOWN.md: tracing at sequence 1 bakes in a decode-only path), so one graph
serves both prefill (past 0) and decode.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime import roles as R
from runtime.manifest import (KV_LAYOUTS, CalibrationInfo, DataFile, ExitSpec, GraphSpec, KVCacheInfo, Manifest,
                              ModelInfo, SegmentSpec, TokenizerInfo)
from runtime.verify import sha256

from .checkpoint import Checkpoint
from .folders import replacing_folder
from .gguf_blocks import KINDS
from .grouped_attention import grouped_attention_in, row_invariant
from .onnx_files import needs_external_data, save_graph
from .segments import HeadGraph, KVFill, Segment, io_specs, segment_bounds

EXPORTER_VERSION = "0.1.0"
OPSET = 17
TARGETS = (0.8, 0.9, 0.95, 0.99)  # thresholds shipped for run-time switching
TRACE = {"batch": 2, "sequence": 5, "past": 3, "spare": 4}
DIMS = {"batch": {"min": 1, "opt": 1, "max": 8}, "sequence": {"min": 1, "opt": 1, "max": None},
        "past": {"min": 0, "opt": 256, "max": None}}
DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16"),
          # weight-only quantized: traced in fp32, then MatMul weights -> MatMulNBits (exporter/quantize.py)
          "int8": (torch.float32, "float32"), "int4": (torch.float32, "float32")}
QUANTIZED = ("int8", "int4")
# torch's deprecation notices for the TorchScript exporter (dynamo=False is deliberate, see above)
QUIET_EXPORT_WARNINGS = ("You are using the legacy TorchScript-based ONNX export",
                         "The feature will be removed. Please remove usage of this function")


def _dummy_inputs(inputs, dtype: torch.dtype, vocab: int):
    b, s, p = TRACE["batch"], TRACE["sequence"], TRACE["past"]
    g = torch.Generator().manual_seed(0)
    out = []
    for spec in inputs:
        if spec.role == R.INPUT_IDS:
            out.append(torch.randint(0, vocab, (b, s), generator=g))
        elif spec.role == R.HIDDEN:
            out.append(torch.randn(b, s, spec.shape[2], generator=g).to(dtype))
        elif spec.role == R.EXIT_HIDDEN:
            out.append(torch.randn(b, spec.shape[1], generator=g).to(dtype))
        elif spec.role == R.ATTENTION_MASK:
            out.append(torch.ones(b, p + s, dtype=torch.int64))
        elif spec.role == R.POSITION_IDS:
            out.append(torch.arange(p, p + s).unsqueeze(0).repeat(b, 1))
        elif spec.role == R.SEQLENS_K:  # KV buffer: positions [p, p + s) are written, p + s are valid after
            out.append(torch.full((b,), p + s - 1, dtype=torch.int32))
        elif spec.role == R.TOTAL_SEQUENCE_LENGTH:
            out.append(torch.tensor(p + s, dtype=torch.int32))
        elif spec.shape[2] == "capacity":  # KV buffer, with room to spare
            out.append(torch.randn(b, spec.shape[1], p + s + TRACE["spare"], spec.shape[3], generator=g).to(dtype))
        else:  # past key / value
            out.append(torch.randn(b, spec.shape[1], p, spec.shape[3], generator=g).to(dtype))
    return tuple(out)


def _dynamic_axes(specs) -> dict:
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs}


def export_graph(module: torch.nn.Module, inputs: list, outputs: list, path: Path, dtype_name: str,
                 vocab: int) -> list:
    """Trace `module` to ONNX, check it, and return the inputs the graph actually takes."""
    import onnx

    args = _dummy_inputs(inputs, DTYPES[dtype_name][0], vocab)
    with warnings.catch_warnings(), torch.no_grad():
        # mute only torch's notices about the legacy exporter itself; a TracerWarning (a value or
        # shape baked into the graph at trace time) comes through, and tests make it an error
        for message in QUIET_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(module, args, str(path), input_names=[t.name for t in inputs],
                          output_names=[t.name for t in outputs],
                          dynamic_axes=_dynamic_axes(inputs + outputs), opset_version=OPSET, dynamo=False,
                          custom_opsets={"com.microsoft": 1} if getattr(module, "kv", "") == "buffer" else None)
    model = onnx.load(str(path))
    if needs_external_data(model):  # torch wrote it whole: write it again with its weights beside it
        save_graph(model, path)
    onnx.checker.check_model(str(path))
    # TorchScript export drops inputs the graph does not use: record only what the graph takes
    graph_inputs = {i.name for i in model.graph.input}
    return [t for t in inputs if t.name in graph_inputs]


def _quantize(path: Path, scheme) -> tuple[str, int, list[str], dict] | None:
    """int8/int4: rewrite the graph's weight MatMuls as MatMulNBits before its checksum is taken."""
    if scheme is None:
        return None
    from .quantize import quantize_graph

    made, left, exact = quantize_graph(path, scheme)
    return path.name, made, left, exact


def _file_facts(path: Path) -> dict:
    """sha256 and size of a graph, and the same for each external-data file it reads (read
    from the graph itself, so whatever onnx wrote is what the manifest lists and checks)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)  # save_model externalises initializers only
    locations = sorted({ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)})
    data = tuple(DataFile(loc, sha256(path.parent / loc), (path.parent / loc).stat().st_size) for loc in locations)
    return {"sha256": sha256(path), "size": path.stat().st_size, "data_files": data}


def _threshold_table(checkpoint: Checkpoint) -> tuple[float | None, dict[str, list]]:
    """(delta, {target: thresholds}) for TARGETS, from the checkpoint's calibration scores
    (`quant_calibrate.threshold_table`). A missing scores file is an error, never an empty
    table a device would only discover when it asks for a target.
    """
    from .quant_calibrate import threshold_table

    try:
        calib = checkpoint.scores("calibration")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot build the per-target threshold table the export ships: {e}") from None
    return threshold_table(calib, checkpoint.config.policy, TARGETS)


def _backbone_in(backbone, dtype: torch.dtype):
    """The caller's backbone, or a copy of it when the export needs another dtype: exporting
    must not cast a model the caller still uses (an fp16 export used to leave it in fp16)."""
    from .backbone import Backbone

    if next(backbone.model.parameters()).dtype == dtype:
        return backbone
    return Backbone.from_model(copy.deepcopy(backbone.model), backbone.tokenizer, backbone.source)


def _eos_ids(tokenizer, model, family=None) -> tuple[int, ...]:
    """Every id that ends a sequence: the tokenizer's EOS, generation_config's (often a list,
    e.g. a chat model's end-of-turn token besides the EOS) and the family's end-of-turn tokens
    (Gemma 3's `<end_of_turn>`, which a GGUF's generation_config lacks), in that order, without repeats."""
    ids = [tokenizer.eos_token_id]
    e = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # what HF generate stops on
    ids += e if isinstance(e, (list, tuple)) else [e]
    vocab = tokenizer.get_vocab() if getattr(family, "end_of_turn_tokens", ()) else {}
    ids += [vocab.get(t) for t in getattr(family, "end_of_turn_tokens", ())]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _copy_ngram(checkpoint: Path, folder: Path) -> DataFile | None:
    """The checkpoint's n-gram draft table (exporter/ngram.py), copied into the export; None for
    a checkpoint trained before `lama train` made one."""
    import shutil

    from .checkpoint import NGRAM

    src = Path(checkpoint) / NGRAM
    if not src.is_file():
        return None
    shutil.copyfile(src, folder / NGRAM)
    return DataFile(NGRAM, sha256(folder / NGRAM), (folder / NGRAM).stat().st_size)


def _tokenizer_info(tokenizer, folder: Path, model=None, family=None) -> TokenizerInfo:
    from runtime.chat import TEMPLATE_FILE

    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise RuntimeError("the tokenizer could not be saved as tokenizer.json (a fast tokenizer is needed)")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template and not (folder / TEMPLATE_FILE).is_file():
        # transformers >= 4.47 writes chat_template.jinja itself; older ones put it in tokenizer_config.json
        (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in before)
    return TokenizerInfo(files=tuple(DataFile(n, sha256(folder / n), (folder / n).stat().st_size) for n in names),
                         bos_id=tokenizer.bos_token_id, eos_ids=_eos_ids(tokenizer, model, family),
                         pad_id=tokenizer.pad_token_id,
                         chat_template=TEMPLATE_FILE if (folder / TEMPLATE_FILE).is_file() else None)


def check_kv_options(kv: str | None, backend: str, capacity: int | None) -> None:
    """Conflicts between --kv, --kv-capacity and --backend, found before anything slow runs."""
    if kv is not None and kv not in KV_LAYOUTS:
        raise ValueError(f"unknown KV layout {kv!r}; choose one of {KV_LAYOUTS}")
    if kv == "buffer" and backend == "tensorrt":
        raise ValueError("--kv buffer uses onnxruntime's GroupQueryAttention, which TensorRT cannot build; "
                         "use --kv concat with --backend tensorrt")
    if capacity is not None and (kv == "concat" or backend == "tensorrt"):
        raise ValueError("--kv-capacity only applies to --kv buffer")


def resolve_kv(kv: str | None, backend: str, family, capacity: int | None, max_context: int) -> KVCacheInfo:
    """The KV layout to export: "buffer" where the family and backend support it (it keeps the
    per-token cost flat with context, benchmarks/kv_buffer_probe.py), unless asked otherwise."""
    from .families import UnsupportedArchitecture

    check_kv_options(kv, backend, capacity)
    if kv is None:
        try:
            family.check_kv_buffer()
            kv = "buffer" if backend == "onnx" else "concat"
        except UnsupportedArchitecture:
            kv = "concat"
    if kv == "concat":
        return KVCacheInfo("concat")
    family.check_kv_buffer()  # a clear error for families without it
    capacity = max_context if capacity is None else capacity
    if not 1 <= capacity <= max_context:
        raise ValueError(f"--kv-capacity must be between 1 and the model's context ({max_context}), got {capacity}")
    return KVCacheInfo("buffer", capacity)


def export(checkpoint: str | Path | Checkpoint, out: str | Path, *, precision: str = "fp32", backend: str = "onnx",
           with_logits: bool = False, workspace_gb: float = 2.0, kv: str | None = None,
           kv_capacity: int | None = None, backbone=None, data: list | None = None,
           quant_options: dict | None = None, max_pending: int | None = None, exits: bool = True,
           gate_switch: bool | None = None) -> Path:
    """`exits=False`: the plain model as one graph (no exit heads, gates or thresholds): the
    baseline a chain is measured against, and a full path for exact decoding with prompt-lookup
    drafts alone. `data`: the training text for the quantized model's calibration scores, if it moved (default:
    the recorded paths; either way the windows must match the hash training recorded);
    `quant_options`: overrides of the int8/int4 scheme (block_size, symmetric, accuracy_level);
    max_pending: the runtime's bound on deferred positions; decode calls then take at most
    max_pending + 1 positions (dim `decode_sequence`, for engine profiles). gate_switch: put each
    gated segment's gate under an `If` on a `gate_on` input (exporter/gate_switch.py), so that
    it costs nothing when its exit cannot fire. None: on where the graphs can only run in
    onnxruntime (KV layout buffer, or int8/int4 weights); off for TensorRT builds and for the
    concat fp32/fp16 graphs `python -m runtime.tensorrt` may build engines from later (If nodes
    are not tried with TensorRT here)."""
    from runtime.chain import DECODE_DIM, DEFAULT_MAX_PENDING

    from .backbone import load_backbone

    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(DTYPES)}")
    if backend not in ("onnx", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}; choose onnx or tensorrt")
    check_kv_options(kv, backend, kv_capacity)
    if gate_switch and backend == "tensorrt":
        raise ValueError("gate_switch makes If nodes, not tried with TensorRT engines; leave it off for TensorRT")
    scheme = None
    if precision in QUANTIZED:
        from .quantize import Scheme

        if backend == "tensorrt":
            raise ValueError(f"precision {precision} makes onnxruntime MatMulNBits graphs, which TensorRT cannot "
                             "build; use --precision fp16 for TensorRT")
        scheme = Scheme.for_precision(precision, **(quant_options or {}))
    elif quant_options:
        raise ValueError(f"quantization options given for precision {precision}; they apply to int8/int4")
    if backend == "tensorrt":
        from .tensorrt_build import check_can_build

        check_can_build()  # fail before the slow part: no GPU or no TensorRT here
    checkpoint, out = Checkpoint.open(checkpoint), Path(out)  # lama.json is read here, once
    config = checkpoint.config
    dtype = DTYPES[precision][0]
    bb = _backbone_in(backbone, dtype) if backbone is not None else load_backbone(config.source)
    kv_info = resolve_kv(kv, backend, bb.family, kv_capacity, bb.shape.max_context)
    if gate_switch is None:  # by default only where no TensorRT engine can be built from the graphs later
        gate_switch = backend == "onnx" and (kv_info.layout == "buffer" or scheme is not None)
    quant_cal = None
    if not exits:  # one segment, nothing to calibrate
        checkpoint = checkpoint.with_config(dataclasses.replace(config, exits=[], thresholds=[], policy=None,
                                                                        calibration={}))
        config = checkpoint.config
    elif scheme is not None:  # before tracing: the thresholds must come from the quantized model's own outputs
        from .quant_calibrate import calibrate_quantized, replace_thresholds

        checkpoint.scores("calibration")  # refuses a checkpoint without scores
        quant_cal = calibrate_quantized(bb, checkpoint, scheme, TARGETS, data)
        checkpoint = checkpoint.with_config(replace_thresholds(config, quant_cal))
        config = checkpoint.config
    heads = checkpoint.heads(bb) if config.exits else None  # built on bb: adapter heads share its norm and LM head
    bb.model.to(dtype)
    if heads is not None:
        heads.to(dtype)
    shape = bb.shape
    thresholds = config.thresholds
    if not exits:
        table_delta, by_target = None, {}
    elif quant_cal is None:
        table_delta, by_target = _threshold_table(checkpoint)
    else:  # the quantized model's own table, with the same delta
        table_delta, by_target = quant_cal.delta, quant_cal.by_target
    with replacing_folder(out, _refuse_non_export) as tmp:
        specs, head_specs, quantized = [], [], []
        gated = config.confidence == "gate" and bool(config.exits)
        # gates stay float32 in every precision: a few thousand weights, and their score is
        # then the calibrated one (the graph casts the fp16 hidden state up before the gate)
        gates = checkpoint.gates(bb) if gated else None
        dname = DTYPES[precision][1]
        if gated:  # adapter heads share one head graph; full heads get one each
            for k in ([None] if config.head == "adapter" else range(len(config.exits))):
                hg = HeadGraph(heads, k, shape.vocab_size, with_logits).eval()
                path = tmp / ("head.onnx" if k is None else f"head_{k:02d}.onnx")
                h_in, h_out = hg.io_specs(dname, shape.hidden_size, shape.vocab_size)
                h_in = export_graph(hg, h_in, h_out, path, precision, shape.vocab_size)
                quantized.append(_quantize(path, scheme))
                head_specs.append(GraphSpec(file=path.name, inputs=tuple(h_in), outputs=tuple(h_out),
                                            **_file_facts(path)))
        bounds = segment_bounds(config.exits, shape.num_layers)
        with grouped_attention_in(bb.model) as groups_traced:  # concat: a position's row is the same in any call
            for i, layers in enumerate(tqdm(bounds, desc="exporting segments", unit="segment")):
                seg = Segment(bb, heads, i, layers, config.confidence, with_logits, gates, kv=kv_info.layout,
                              capacity=kv_info.capacity).eval()
                path = tmp / f"segment_{i:02d}.onnx"
                inputs, outputs = io_specs(seg, dname)
                inputs = export_graph(seg, inputs, outputs, path, precision, shape.vocab_size)
                quantized.append(_quantize(path, scheme))
                if gate_switch and seg.gated:  # after quantizing: the gate's float MatMuls are final
                    from .gate_switch import switch_segment_file

                    inputs, _ = switch_segment_file(path, inputs, outputs)
                ex = None
                if i < len(config.exits):
                    head = (0 if config.head == "adapter" else i) if gated else None
                    ex = ExitSpec(config.exits[i], config.confidence, head)  # threshold: calibration.thresholds
                fill = None
                if i > 0 and bb.family.has_kv_projection():  # K/V of every layer a token leaving before segment i skips
                    kf = KVFill(bb, (layers[0], shape.num_layers)).eval()
                    fpath = tmp / f"kv_fill_{i:02d}.onnx"
                    f_in, f_out = kf.io_specs(dname)
                    f_in = export_graph(kf, f_in, f_out, fpath, precision, shape.vocab_size)
                    fill = GraphSpec(file=fpath.name, inputs=tuple(f_in), outputs=tuple(f_out), **_file_facts(fpath))
                specs.append(SegmentSpec(index=i, layers=tuple(layers), file=path.name, inputs=tuple(inputs),
                                         outputs=tuple(outputs), exit=ex, kv_fill=fill, **_file_facts(path)))
        tok = _tokenizer_info(bb.tokenizer, tmp, bb.model, bb.family)
        ngram = _copy_ngram(checkpoint.path, tmp)
        quant_info = None
        if scheme is not None:
            quantized = [q for q in quantized if q is not None]
            quant_info = scheme.info([q[0] for q in quantized], sum(q[1] for q in quantized),
                                     [f"{q[0]}:{m}" for q in quantized for m in q[2]],
                                     quant_cal.record if quant_cal else NO_EXITS_RECORD,
                                     {k: sum(q[3][k] for q in quantized) for k in KINDS})
            if quant_cal is not None:  # the quantized scores travel with the export, for later study
                (tmp / "scores").mkdir()
                for name, sc in quant_cal.scores.items():
                    sc.save(tmp / "scores" / name)
        manifest = Manifest(
            model=ModelInfo(**dataclasses.asdict(shape), base_model=config.source.model_id, family=bb.family.name),
            tokenizer=tok, segments=tuple(specs),
            calibration=CalibrationInfo(config.confidence, config.policy.to_dict() if config.policy else {},
                                        tuple(thresholds), by_target, config.calibration.get("heldout", {}),
                                        by_target_delta=table_delta),
            precision=precision, dims={**DIMS, "total": {"min": 1, "opt": 257, "max": shape.max_context},
                                       **({"capacity": {"min": 1, "opt": kv_info.capacity, "max": kv_info.capacity}}
                                          if kv_info.layout == "buffer" else {}),
                                       DECODE_DIM: {"min": 1, "opt": 1, "max": 1 + (
                                           DEFAULT_MAX_PENDING if max_pending is None else int(max_pending))}},
            kv_cache=kv_info,
            heads=tuple(head_specs),
            exporter_version=EXPORTER_VERSION, quantization=quant_info, ngram=ngram,
            row_invariant=_row_invariant(backend, precision, scheme, groups_traced, shape.num_layers))
        if backend == "tensorrt":
            from .tensorrt_build import build_engines

            manifest = build_engines(tmp, manifest, workspace_gb=workspace_gb)
        manifest.save(tmp)
    return out


def _row_invariant(backend: str, precision: str, scheme, groups_traced: list[int], layers: int) -> bool:
    """The manifest's `row_invariant`: grouped attention in every layer (concat layout), run by
    onnxruntime, whose kernels were checked row by row (benchmarks/studies/shape_invariance.py):
    float32 MatMul and MatMulNBits at accuracy level 4 compute a row alike in any call; level 0
    (float activations) does not, and fp16 and TensorRT were not checked."""
    quantized_ok = scheme is None or scheme.accuracy_level == 4
    return backend == "onnx" and precision != "fp16" and quantized_ok and row_invariant(groups_traced, layers)


# the quantization record of an export without exits (exits=False): nothing to recalibrate
NO_EXITS_RECORD = {"scores": "none: an export without exits has no thresholds to calibrate", "thresholds": []}


def _refuse_non_export(out: Path) -> None:
    if not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a LAMA export; refusing to overwrite it")
