"""Graph bytes of exports, from their manifests (every graph's file and data files), and the
GGUF block kinds each keeps exactly: what an exporter change did to an export's size.

    python -m benchmarks.studies.export_sizes EXPORT [EXPORT ...] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.report import command_line, write_report
from runtime.manifest import Manifest


def graph_bytes(folder: Path) -> int:
    m = Manifest.load(folder)
    graphs = list(m.segments) + list(m.heads) + [s.kv_fill for s in m.segments if s.kv_fill]
    return sum(g.size + sum(f.size for f in g.data_files) for g in graphs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows = []
    for folder in a.exports:
        m = Manifest.load(folder)
        rows.append({"export": str(folder), "precision": m.precision, "graph_mb": round(graph_bytes(folder) / 1e6, 1),
                     "exact_blocks": m.quantization.exact_blocks if m.quantization else {}})
    md = ["# Export sizes", "", f"`{command_line('benchmarks.studies.export_sizes', argv)}`", "",
          "| export | precision | graphs, MB | GGUF blocks kept exactly |", "|---|---|---:|---|"]
    md += [f"| {r['export']} | {r['precision']} | {r['graph_mb']:,} | "
           + ", ".join(f"{k} {v}" for k, v in r["exact_blocks"].items() if v) + " |" for r in rows]
    write_report(a.out, "export_sizes", {"command": command_line("benchmarks.studies.export_sizes", argv),
                                         "exports": rows}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
