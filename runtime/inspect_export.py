"""`lama inspect DIR`: what an export holds, in words, without opening a single graph.

Reads the manifest only (and the sizes of the files beside it), so it is instant on any
device and works on exports whose backend is not installed here. `describe` returns plain
data (what `--json` prints); `render` turns it into the text a person reads. (Not named
`inspect.py`: a module of that name would shadow the standard library's when run as a script.)
"""

from __future__ import annotations

from pathlib import Path

from . import roles as R
from .chat import ChatTemplate
from .manifest import Manifest, SegmentSpec


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n} B"


def _threshold(t) -> str:
    return "never" if t is None else f"{t:.4f}"


def _sampling(graph) -> str:
    if graph.output(R.LOGITS) is not None:
        return "full logits"
    topk = graph.output(R.TOPK_VALUES)
    return f"top-{topk.shape[1]} logits" if topk is not None else "greedy only (no logits exported)"


def backends_here() -> dict:
    """Which backends this machine can run, and why not where it cannot."""
    out: dict = {}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = {"available": True, "version": ort.__version__,
                              "providers": list(ort.get_available_providers())}
    except ImportError as e:
        out["onnxruntime"] = {"available": False, "reason": str(e)}
    from .tensorrt import TensorRTBackend

    reason = TensorRTBackend.unavailable_reason()
    out["tensorrt"] = {"available": reason is None, **({"reason": reason} if reason else {})}
    return out


def _bytes(graph) -> int:
    """A graph's bytes on disk: the .onnx file and its external-weights files."""
    return graph.size + sum(d.size for d in graph.data_files)


def _segment(folder: Path, seg: SegmentSpec, thresholds) -> dict:
    path = folder / seg.file
    d = {"index": seg.index, "layers": list(seg.layers), "file": seg.file, "size": _bytes(seg),
         "present": path.is_file(), "exit": None, "sampling": _sampling(seg)}
    if seg.exit is not None:
        d["exit"] = {"after_layer": seg.exit.exit_layer, "confidence": seg.exit.confidence,
                     "threshold": thresholds[seg.index], "head_graph": seg.exit.head}
    if seg.engine:
        d["engine"] = {k: seg.engine.get(k) for k in ("file", "size", "tensorrt_version", "compute_capability")}
    return d


def describe(folder: str | Path) -> dict:
    folder = Path(folder)
    m = Manifest.load(folder)
    cal = m.calibration
    try:
        template = ChatTemplate.from_folder(folder, m.tokenizer.chat_template)
    except ValueError as e:
        template, template_error = None, str(e)
    else:
        template_error = None
    fills = [s.kv_fill for s in m.segments if s.kv_fill is not None]  # the fill KV policy's graphs
    sizes = [_bytes(s) for s in m.segments] + [_bytes(h) for h in m.heads] + [_bytes(f) for f in fills]
    return {
        "folder": str(folder),
        "format": f"{m.format} v{m.schema_version}", "exporter_version": m.exporter_version,
        "model": {"base_model": m.model.base_model, "family": m.model.family, "layers": m.model.num_layers,
                  "hidden_size": m.model.hidden_size, "vocab_size": m.model.vocab_size,
                  "max_context": m.model.max_context},
        "precision": m.precision,
        "kv_cache": {"layout": m.kv_cache.layout, "capacity": m.kv_cache.capacity},
        "total_size": sum(sizes),
        "kv_fill_graphs": [{"file": f.file, "size": _bytes(f)} for f in fills],
        "segments": [_segment(folder, s, list(cal.thresholds)) for s in m.segments],
        "head_graphs": [{"file": h.file, "size": _bytes(h), "present": (folder / h.file).is_file(),
                         "sampling": _sampling(h)} for h in m.heads],
        "calibration": {"confidence": cal.confidence, "policy": cal.policy,
                        "thresholds": list(cal.thresholds), "by_target": cal.by_target,
                        "by_target_delta": cal.by_target_delta, "report": cal.report},
        "tokenizer": {"files": [f.file for f in m.tokenizer.files], "bos_id": m.tokenizer.bos_id,
                      "eos_ids": list(m.tokenizer.eos_ids),
                      "chat_template": template.origin if template else None,
                      **({"chat_template_error": template_error} if template_error else {})},
        "draft_sources": ["lookup"] + (["ngram"] if m.ngram is not None else []),
        "ngram": {"file": m.ngram.file, "size": m.ngram.size} if m.ngram is not None else None,
        "row_invariant": m.row_invariant,
        "backends": backends_here(),
    }


def _exactness(info: dict) -> str:
    """How exact exact decoding is on this export (docs/design.md, "Exactness, bit for bit")."""
    if info["row_invariant"]:
        return "bit for bit (row-invariant graphs: a position computes alike in any call)"
    if info["kv_cache"]["layout"] == "buffer":
        return ("bit for bit as computed by calls of >= 2 positions (it pads one-position calls); the plain full "
                "path's one-position calls can round near-ties differently (--kv concat: no difference)")
    return ("up to rounding: one-position calls can round near-ties differently (export again for grouped attention; "
            "a model with one query head per key/value head keeps this)")


def _policy(p: dict) -> str:
    if p.get("kind") == "budget":
        mu = f", mu {p['mu']:.4g}" if isinstance(p.get("mu"), (int, float)) else ""
        return f"compute budget {p.get('budget')} of the full model (EERO{mu})"
    text = f"agreement target {p.get('target')}"
    return text + (f" with probability >= {1 - p['delta']:g} (delta {p['delta']})" if p.get("delta") else
                   " (no guarantee mode: delta not set)")


def _report(rep: dict) -> list[str]:
    if not rep:
        return ["  (no held-out report in this export)"]
    nan = float("nan")
    lines = [f"  {rep.get('split', 'report')}: {rep.get('tokens', '?')} tokens, overall agreement "
             f"{rep.get('agreement', nan):.4f}, layers computed {rep.get('layers_fraction', nan):.3f} "
             f"of the full model, compute incl. checks {rep.get('compute_fraction', nan):.3f}"]
    for e in rep.get("exits", []):
        agree = "-" if e.get("agreement") is None else f"{e['agreement']:.3f}"
        lines.append(f"    exit after layer {e.get('exit_layer')}: threshold {_threshold(e.get('threshold'))}, "
                     f"coverage {e.get('coverage', 0):.3f}, agreement {agree}")
    return lines


def _kv(kv: dict) -> str:
    if kv["layout"] == "buffer":
        return (f"buffers of {kv['capacity']} positions per layer, updated in place by GroupQueryAttention "
                f"(onnxruntime CPU)")
    return "past in, past+new out (copied every token)"


def render(info: dict) -> str:
    m = info["model"]
    cal = info["calibration"]
    out = [f"{info['folder']}: {info['format']}, exported by lama {info['exporter_version'] or '?'}",
           f"model: {m['base_model']} ({m['family']}), {m['layers']} layers, hidden {m['hidden_size']}, "
           f"vocab {m['vocab_size']}, context {m['max_context']}",
           f"precision: {info['precision']}; graphs: {_mb(info['total_size'])} in all",
           f"KV cache: {_kv(info['kv_cache'])}", "",
           "segments:"]
    for s in info["segments"]:
        ex = s["exit"]
        where = (f"exit after layer {ex['after_layer']} ({ex['confidence']}), threshold {_threshold(ex['threshold'])}"
                 if ex else "the model's own head (final)")
        missing = "" if s["present"] else "  [FILE MISSING]"
        out.append(f"  segment {s['index']}: layers {s['layers'][0]}-{s['layers'][1] - 1}, {s['file']} "
                   f"({_mb(s['size'])}), {where}; sampling: {s['sampling']}{missing}")
        if s.get("engine"):
            e = s["engine"]
            out.append(f"    TensorRT engine {e['file']} ({_mb(e['size'] or 0)}), TensorRT {e['tensorrt_version']}, "
                       f"compute capability {e['compute_capability']}")
    for h in info["head_graphs"]:
        out.append(f"  exit head graph: {h['file']} ({_mb(h['size'])}), run only for tokens that leave; "
                   f"sampling: {h['sampling']}" + ("" if h["present"] else "  [FILE MISSING]"))
    out += ["", f"calibration: confidence {cal['confidence']}, {_policy(cal['policy'])}",
            "  default thresholds: " + ", ".join(_threshold(t) for t in cal["thresholds"])]
    if cal["by_target"]:
        out.append("  thresholds by target (use --target T):")
        for target, ths in sorted(cal["by_target"].items(), key=lambda kv: float(kv[0])):
            out.append(f"    target {target}: " + ", ".join(_threshold(t) for t in ths))
    out += _report(cal["report"])
    tok = info["tokenizer"]
    chat = tok["chat_template"] or tok.get("chat_template_error") or "none (lama chat needs --chat-template)"
    out += ["", f"tokenizer: {', '.join(tok['files'])}; bos {tok['bos_id']}, eos {tok['eos_ids']}",
            f"chat template: {chat}",
            "exact decoding's draft sources: " + ", ".join(info["draft_sources"])
            + (f" (n-gram table {info['ngram']['file']}, {_mb(info['ngram']['size'])})" if info["ngram"] else ""),
            "exact decoding gives the full path's tokens " + _exactness(info),
            "", "backends here:"]
    for name, b in info["backends"].items():
        if b["available"]:
            extra = f" {b['version']}, providers: {', '.join(b['providers'])}" if "providers" in b else ""
            out.append(f"  {name}: available{extra}")
        else:
            out.append(f"  {name}: not available ({b['reason'].splitlines()[0][:200]})")
    return "\n".join(out)
