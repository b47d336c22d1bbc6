"""The benchmark's rows, declared.

Each row is a small entry: its name, the kind of figure it gives, what it records beside the
measurement, and how its worker starts (the python to run and the spec the worker reads:
benchmarks/optimum_worker.py, or for llama.cpp benchmarks/llamacpp_worker.py) or why it
cannot run here. `declare` turns the entries into the report's rows and the timing specs.

    a  transformers generate, PyTorch (the model as shipped)          full_model_rows
    b  the whole model exported by optimum, run by onnxruntime        full_model_rows
    c  our segment chain with every exit off                          policy_rows
    d  our runtime with calibrated exits (targets, EERO budgets)      policy_rows
    f  llama.cpp on the GGUF file as shipped                          llamacpp_row
    g  our chain exported at int8 / int4, exits off and at targets    quantized_rows
    h  onnxruntime-genai on its model builder's int4 graph            genai_row

Row e (the oracle) is derived, not timed (run.py's `derive`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from runtime.manifest import Manifest, to_json_thresholds
from benchmarks.timing import WORKERS

ROOT = Path(__file__).resolve().parent.parent
WORKERS.setdefault("genai", ROOT / "benchmarks" / "genai_worker.py")  # row h's worker (optimum_worker's protocol)
GENAI_ROW = "h: onnxruntime-genai (model builder, int4, CPU)"


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "full" | "target" | "budget" | "quant-full" | "quant-target"
    worker: tuple[Path, dict] | str  # (python, worker spec), or why the row is skipped here
    fields: dict = field(default_factory=dict)  # what the row records beside the measurement


@dataclass(frozen=True)
class Setup:
    """What every worker spec shares, and where the models and exports are."""

    base: dict  # prompts, max_new_tokens, threads
    model_path: str
    gguf: str | None
    work: Path
    export_dir: Path
    python: Path = Path(sys.executable)


def declare(entries: list[Row]) -> tuple[list[dict], dict[str, tuple[Path, dict]]]:
    """(rows for the report, {row name: (python, worker spec)} for the timing)."""
    rows, specs = [], {}
    for e in entries:
        row = {"row": e.name, "kind": e.kind, **e.fields}
        if isinstance(e.worker, str):
            row.update(status="skipped", reason=e.worker)
        else:
            specs[e.name] = e.worker
        rows.append(row)
    return rows, specs


def full_model_rows(s: Setup, optimum_python: Path, full_tf: dict) -> list[Row]:
    """Rows a and b: the whole model, as shipped (PyTorch) and exported by optimum."""
    model = {"model_path": s.model_path, "gguf_file": s.gguf}
    optimum = ((optimum_python, {**s.base, "backend": "optimum", **model, "onnx_dir": str(s.work / "optimum-onnx")})
               if optimum_python.is_file() else
               f"{optimum_python} not found: run `bash benchmarks/setup_optimum.sh` to create the optimum venv "
               "(transformers 4.57 + optimum-onnx)")
    return [Row("a: PyTorch generate", "full", (s.python, {**s.base, "backend": "torch", **model}),
                {"teacher_forced": full_tf}),
            Row("b: optimum + onnxruntime", "full", optimum, {"teacher_forced": full_tf})]


def policy_rows(s: Setup, policies, max_pending: int | None, evaluate) -> list[Row]:
    """Rows c and d: our runtime on the export under each exit policy (benchmarks/policies.py).
    `evaluate(policy)` gives what the row records beside its timing (teacher-forced figures)."""
    out = []
    for p in policies:
        kv = "fill" if p.kv == "fill" else "defer"
        spec = {**s.base, "backend": "lama", "export_dir": str(s.export_dir), "thresholds": p.runtime,
                "kv_policy": kv, "exact": p.kv == "exact", "max_pending": max_pending}
        out.append(Row(p.key, p.kind, (s.python, spec),
                       {"value": p.value, "kv_policy": p.kv, "thresholds": to_json_thresholds(p.thresholds),
                        **evaluate(p)}))
    return out


def llamacpp_row(s: Setup, llamacpp_python: Path) -> Row:
    """Row f: llama.cpp on the same GGUF file the model ships as."""
    if not s.gguf:
        worker = "this model has no GGUF file for llama.cpp to load"
    elif not llamacpp_python.is_file():
        worker = f"{llamacpp_python} not found: run `bash benchmarks/setup_llamacpp.sh`"
    else:
        worker = (llamacpp_python, {**s.base, "backend": "llamacpp", "gguf_path": str(Path(s.model_path) / s.gguf)})
    return Row("f: llama.cpp (the GGUF as shipped)", "full", worker)


def genai_row(s: Setup, genai_python: Path, genai_dir: Path) -> Row:
    """Row h: onnxruntime-genai's generation loop on the int4 graph its model builder makes from
    the model as shipped (a GGUF dequantized first), built once into `genai_dir` by the worker."""
    if not genai_python.is_file():
        worker = (f"{genai_python} not found: run `bash benchmarks/setup_genai.sh` to create the onnxruntime-genai "
                  "venv (transformers 5 + onnxruntime-genai and its model builder)")
    else:
        worker = (genai_python, {**s.base, "backend": "genai", "model_path": s.model_path, "gguf_file": s.gguf,
                                 "genai_dir": str(genai_dir)})
    return Row(GENAI_ROW, "full", worker, {"engine": "onnxruntime-genai", "precision": "int4"})


def quantized_rows(s: Setup, precision: str, export_dir: Path, manifest: Manifest, targets: list[float]) -> list[Row]:
    """Rows g: the chain exported at `precision`, exits off and at each target (thresholds
    calibrated on the quantized model)."""
    full = f"g: {precision} chain, exits off"
    out = []
    for label, th in [("exits off", "never")] + [(f"target {t:g}", t) for t in targets]:
        fields = {"precision": precision, "value": None if th == "never" else th, "same_precision_full": full}
        if th != "never" and f"{th:g}" not in manifest.calibration.by_target:
            worker = f"no thresholds for target {th:g} in {export_dir}"
        else:
            worker = (s.python, {**s.base, "backend": "lama", "export_dir": str(export_dir), "thresholds": th})
        out.append(Row(f"g: {precision} chain, {label}", "quant-full" if th == "never" else "quant-target", worker,
                       fields))
    return out
