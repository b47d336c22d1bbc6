"""An experiment, not an export: a copy of a gate-mode export whose segments with an exit lose
their gate (the outputs `confidence` and `exit_hidden` and every node only they need), so the
chain with exits off can be timed without the gates' work.

    python benchmarks/results/smollm2-135m/chain-overhead/prune_gates.py runs/smol/onnx-int4-fused3 /tmp/pruned

The other files are symbolic links to the source export's; the manifest is the source's with the
two outputs removed and the pruned files' sizes and sha256 updated. Only thresholds "never" run
on it (the chain reads no confidence then): a threshold would look for the missing output.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import onnx

GATE_OUTPUTS = ("confidence", "exit_hidden")


def prune(model: onnx.ModelProto) -> tuple[int, int]:
    g = model.graph
    outputs = [o for o in g.output if o.name not in GATE_OUTPUTS]
    del g.output[:]
    g.output.extend(outputs)
    need, kept = {o.name for o in outputs}, []
    for node in reversed(list(g.node)):  # nodes are topologically sorted: walk back from the outputs
        if any(o in need for o in node.output):
            kept.append(node)
            need.update(i for i in node.input if i)
    before = len(g.node)
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [i for i in g.initializer if i.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    return before, len(kept)


def main(src: str, dst: str) -> int:
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())
    gated = {s["file"]: s for s in manifest["segments"] if s.get("exit")}
    for f in src.iterdir():
        if f.name not in gated and f.name != "manifest.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f)
    for name, seg in gated.items():
        model = onnx.load(str(src / name))
        before, after = prune(model)
        onnx.save(model, str(dst / name))
        data = (dst / name).read_bytes()
        seg["size"], seg["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        seg["outputs"] = [o for o in seg["outputs"] if o["role"] not in GATE_OUTPUTS]
        print(f"{name}: {before} -> {after} nodes")
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
