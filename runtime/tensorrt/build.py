"""Building TensorRT engines from an export's ONNX graphs, on the device that will run them,
and the command line for it (`python -m runtime.tensorrt EXPORT_DIR`)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..manifest import Manifest, ManifestError
from ..verify import sha256, verify_files
from . import versions
from .profiles import input_profiles, label, profile_dims


def build_engine(trt, onnx_path: Path, shapes: dict, fp16: bool, workspace_bytes: int) -> bytes:
    """Parse one segment graph and build a serialized engine with a single optimization profile."""
    log = versions.logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # TensorRT >= 10: always explicit batch
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: finds external weight data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 removed it: networks are strongly typed,
        config.set_flag(trt.BuilderFlag.FP16)      # and an fp16 export's graph is fp16 already
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ManifestError(f"{onnx_path.name}: graph input {name!r} is not listed in the manifest")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    return bytes(serialized)


def build_engines(folder: str | Path, manifest: Manifest, workspace_gb: float = 2.0, limits: dict | None = None,
                  log=None) -> Manifest:
    """Build an engine beside each graph in `folder` (`segment_XX.engine`); return the manifest
    with each graph's `engine` filled in (the caller saves it)."""
    folder = Path(folder)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    heads = tuple(manifest.heads)
    trt, cuda = versions.load_tensorrt()
    dims = profile_dims(manifest, limits)
    cc, device = cuda.compute_capability(), cuda.device_name()
    fp16 = manifest.precision == "fp16"

    def build(graph):
        shapes = input_profiles(graph, dims)
        t0 = time.perf_counter()
        data = build_engine(trt, folder / graph.file, shapes, fp16, int(workspace_gb * (1 << 30)))
        seconds = time.perf_counter() - t0
        path = folder / (Path(graph.file).stem + ".engine")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        engine = {"file": path.name, "sha256": sha256(path), "size": path.stat().st_size,
                  "tensorrt_version": str(trt.__version__), "compute_capability": cc, "device": device,
                  "build_seconds": round(seconds, 3), "fp16_flag": bool(fp16 and hasattr(trt.BuilderFlag, "FP16")),
                  "workspace_gb": workspace_gb,
                  "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()}}
        log(f"{label(graph)}: engine built in {seconds:.1f} s ({engine['size'] / 1e6:.1f} MB)")
        return replace(graph, engine=engine)

    out = replace(manifest, segments=tuple(build(seg) for seg in manifest.segments))
    return replace(out, heads=tuple(build(h) for h in heads)) if heads else out


def build_engines_on_device(folder: str | Path, workspace_gb: float = 2.0, limits: dict | None = None,
                            log=None) -> Manifest:
    """Build engines for an export folder on this device and record them in its manifest.json."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    verify_files(folder, manifest)
    manifest = build_engines(folder, manifest, workspace_gb, limits, log)
    manifest.save(folder)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tensorrt",
                                description="Build TensorRT engines for an export folder on this device (engines "
                                            "are not portable: build them where they run).")
    p.add_argument("folder", type=Path, help="a `lama export` folder (its ONNX graphs and manifest.json)")
    p.add_argument("--workspace-gb", type=float, default=2.0, help="builder workspace limit")
    p.add_argument("--max-batch", type=int, help="largest batch the engines accept (default: the manifest's)")
    p.add_argument("--max-sequence", type=int, help="longest prompt chunk per call (default: the model's context)")
    p.add_argument("--max-past", type=int, help="longest cached past (default: the model's context)")
    a = p.parse_args(argv)
    limits = {"batch": a.max_batch, "sequence": a.max_sequence, "past": a.max_past}
    try:
        versions.load_tensorrt()
    except RuntimeError as e:
        print(f"error: this device cannot build TensorRT engines: {e}", file=sys.stderr)
        return 2
    try:
        manifest = build_engines_on_device(a.folder, a.workspace_gb, limits)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(s.engine["build_seconds"] for s in manifest.segments)
    print(f"built {len(manifest.segments)} engines in {total:.1f} s into {a.folder}")
    return 0
