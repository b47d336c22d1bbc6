"""TensorRT optimization profiles: the manifest's named dims -> (min, opt, max) shapes per input."""

from __future__ import annotations

from ..manifest import GraphSpec, Manifest, ManifestError, SegmentSpec


def label(graph: SegmentSpec | GraphSpec) -> str:
    """"segment 2" for segments, "graph head.onnx" for other graphs (gate-mode exit heads)."""
    index = getattr(graph, "index", None)
    return f"segment {index}" if index is not None else f"graph {graph.file}"


def profile_dims(manifest: Manifest, limits: dict | None = None) -> dict[str, tuple[int, int, int]]:
    """Named dims -> (min, opt, max) from manifest.dims; a None max is the model's context.

    `limits` caps maxima ({"batch": 1, "sequence": 512}): TensorRT sizes activation memory for
    the largest shapes, and batch 8 x the full context can exceed an edge GPU's memory. When
    past or sequence is capped, total (= past + sequence) follows.
    """
    limits = {k: int(v) for k, v in (limits or {}).items() if v is not None}
    unknown = set(limits) - set(manifest.dims)
    if unknown:
        raise ValueError(f"unknown dims {sorted(unknown)}; the manifest has {sorted(manifest.dims)}")
    ctx = manifest.model.max_context
    out = {}
    for name, d in manifest.dims.items():
        lo = int(d.get("min", 1))
        hi = limits.get(name, ctx if d.get("max") is None else int(d["max"]))
        hi = max(hi, lo)
        out[name] = (lo, min(max(int(d.get("opt", lo)), lo), hi), hi)
    if {"past", "sequence", "total"} <= set(out):  # total = past + sequence: keep the three consistent
        (p0, po, p1), (s0, so, s1), (t0, _, t1) = out["past"], out["sequence"], out["total"]
        if "total" not in limits and ({"past", "sequence"} & set(limits)):
            t1 = max(t0, min(t1, p1 + s1))
        p1, s1 = max(p0, min(p1, t1 - s0)), max(s0, min(s1, t1 - p0))
        po, so = min(po, p1), min(so, s1)
        po = max(p0, min(po, t1 - so))
        out["past"], out["sequence"] = (p0, po, p1), (s0, so, s1)
        out["total"] = (t0, min(max(po + so, t0), t1), t1)  # the optimum is a real decode shape
    return out


def input_profiles(seg: SegmentSpec | GraphSpec,
                   dims: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Each input of the graph -> (min shape, opt shape, max shape)."""
    shapes = {}
    for t in seg.inputs:
        corners = ([], [], [])
        for d in t.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ManifestError(f"{label(seg)} input {t.name}: dim {d!r} has no min/opt/max in the manifest")
                values = dims[d]
            else:
                values = (int(d),) * 3
            for corner, v in zip(corners, values):
                corner.append(v)
        shapes[t.name] = tuple(tuple(c) for c in corners)
    return shapes
