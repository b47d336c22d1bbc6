"""Does a KV buffer (GroupQueryAttention + IOBinding) keep decode cost flat with context?

Builds a Llama decoder with SmolLM2-135M shapes and random weights (no download), exports
it as one graph two ways, the "concat" layout (past in, concat(past, new) out: the whole
cache is copied every token) and the "buffer" layout (GroupQueryAttention writing into a
preallocated buffer bound as both past and present), checks both against PyTorch, and
times one decode step at several context lengths on CPU onnxruntime.

    python -m benchmarks.studies.kv_buffer_probe --threads 2 --contexts 32 512 2048 --rounds 5
    python -m benchmarks.studies.kv_buffer_probe --chain      # the same through `export` + Runtime.step:
                                                      # 9 segments (exits every 3 layers), exits off

Figures are medians over `--steps` steps per round and over rounds; run it on quiet cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporter.backbone import Backbone
from exporter.onnx_export import export_graph
from exporter.segments import Segment, io_specs
from runtime.backends import OnnxRuntimeBackend

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def build(layers: int) -> Backbone:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    return Backbone.from_model(LlamaForCausalLM(cfg).eval())


def export(bb: Backbone, kv: str, capacity: int, folder: Path) -> tuple[Path, list]:
    seg = Segment(bb, None, 0, (0, bb.shape.num_layers), with_logits=True, kv=kv, capacity=capacity).eval()
    inputs, outputs = io_specs(seg, "float32")
    path = folder / f"{kv}.onnx"
    if path.is_file():  # --work: reuse an earlier export
        return path, inputs
    t0 = time.perf_counter()
    inputs = export_graph(seg, inputs, outputs, path, "fp32", bb.shape.vocab_size)
    print(f"exported {kv}: {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 1e6:.0f} MB")
    return path, inputs


class ConcatRunner:
    """Today's runtime: numpy past in, new present arrays out, fed back next step."""

    def __init__(self, path: Path, threads: int, layers: int, kv_heads: int, head_dim: int):
        self.backend = OnnxRuntimeBackend(path, threads=threads)
        self.layers, self.shape = layers, (1, kv_heads, 0, head_dim)
        self.reset()

    def reset(self, context: np.ndarray | None = None):
        self.past = [np.zeros(self.shape, np.float32) for _ in range(2 * self.layers)] if context is None else \
            [c.copy() for c in context]
        self.length = self.past[0].shape[2]

    def step(self, ids: np.ndarray) -> np.ndarray:
        end = self.length + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, end), np.int64),
                 "position_ids": np.arange(self.length, end)[None, :]}
        for i in range(self.layers):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = self.past[2 * i], self.past[2 * i + 1]
        out = self.backend.run(feeds)
        self.past = [out[f"present_{kv}.{i}"] for i in range(self.layers) for kv in ("key", "value")]
        self.length = end
        return out["logits"]


class BufferRunner:
    """One preallocated buffer per layer, bound as both past and present through IOBinding."""

    def __init__(self, path: Path, threads: int, layers: int, kv_heads: int, head_dim: int, capacity: int):
        import onnxruntime as ort

        self.backend = OnnxRuntimeBackend(path, threads=threads)
        sess = self.backend.session
        self.buffers = [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in range(2 * layers)]
        self.io = sess.io_binding()
        self.io.bind_output("logits")  # output 0; onnxruntime allocates it
        for i in range(layers):
            for n, kv in enumerate(("key", "value")):
                val = ort.OrtValue.ortvalue_from_numpy(self.buffers[2 * i + n])  # shares the numpy memory
                self.io.bind_ortvalue_input(f"past_{kv}.{i}", val)
                self.io.bind_ortvalue_output(f"present_{kv}.{i}", val)
        self.names = {i.name for i in sess.get_inputs()}
        self.layers, self.length = layers, 0

    def reset(self, context: list[np.ndarray] | None = None):
        self.length = 0 if context is None else context[0].shape[2]
        if context is not None:
            for buf, c in zip(self.buffers, context):
                buf[:, :, :self.length] = c

    def step(self, ids: np.ndarray) -> np.ndarray:
        end = self.length + ids.shape[1]
        feeds = {"input_ids": ids, "position_ids": np.arange(self.length, end)[None, :],
                 "seqlens_k": np.array([end - 1], np.int32), "total_sequence_length": np.array(end, np.int32)}
        for k, v in feeds.items():
            if k in self.names:
                self.io.bind_cpu_input(k, v)
        self.backend.session.run_with_iobinding(self.io)
        self.length = end
        return self.io.get_outputs()[0].numpy()


def check(bb: Backbone, runners: dict, steps: int = 4) -> dict:
    """Max |logits - PyTorch| over a 12-token prefill, a 3-token chunk with past (as a deferred
    catch-up feeds), and single-token steps."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, bb.shape.vocab_size, (1, 12 + 3 + steps), generator=g)
    with torch.no_grad():
        ref = bb.model(ids).logits[0].numpy()  # (T, V)
    chunks = [(0, 12), (12, 15)] + [(t, t + 1) for t in range(15, 15 + steps)]
    diffs = {}
    for name, r in runners.items():
        r.reset()
        worst = 0.0
        for a, b in chunks:
            logits = r.step(ids[:, a:b].numpy())
            worst = max(worst, float(np.abs(logits[0] - ref[b - 1]).max()))
        diffs[name] = worst
    return diffs


def time_decode(runners: dict, context: list[np.ndarray], steps: int, rounds: int, vocab: int) -> dict:
    """Median ms per decode step, wall clock and CPU time of this process (all its threads:
    steadier than wall clock on shared cores, where other jobs take turns on ours); the
    runners alternate within each round so they share the load."""
    rng = np.random.default_rng(0)
    per_round: dict[str, list[tuple[float, float]]] = {n: [] for n in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            runner.reset(context)
            wall, cpu = [], []
            for _ in range(steps):
                ids = rng.integers(0, vocab, (1, 1))
                t0, c0 = time.perf_counter(), time.process_time()
                runner.step(ids)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            per_round[name].append((statistics.median(wall), statistics.median(cpu)))
    return {n: tuple(1000 * statistics.median(r[i] for r in v) for i in (0, 1)) for n, v in per_round.items()}


def char_tokenizer():
    """A fast tokenizer the export can save (the timing feeds token ids; the text is never decoded)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i): i for i in range(95)} | {"<unk>": 95}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>")


class ChainRunner:
    """An exported chain through the project's Runtime (exits off): what `lama generate` runs."""

    def __init__(self, folder: Path, threads: int):
        from runtime import Runtime

        self.rt = Runtime.load(folder, threads=threads)
        self.never = self.rt.resolve_thresholds("never")
        self.reset()

    def reset(self, context: list[np.ndarray] | None = None):
        self.cache = self.rt.new_cache()
        if context is None:
            return
        n = context[0].shape[2]
        layer = 0
        for st in self.cache.segments:  # install a random context of n positions in every layer
            for i in range(len(st.keys)):
                k, v = context[2 * layer], context[2 * layer + 1]
                if st.keys[i].shape[2] == 0:  # concat: the arrays are the cache
                    st.keys[i], st.values[i] = k.copy(), v.copy()
                else:  # buffer: fill the first n rows
                    st.keys[i][:, :, :n], st.values[i][:, :, :n] = k, v
                layer += 1
            st.length = n
        self.cache.position = n

    def step(self, ids: np.ndarray):
        return self.rt.step(ids[0], self.cache, self.never)


def export_chain(bb: Backbone, folder: Path, capacity: int) -> dict:
    from exporter import api
    from exporter.checkpoint import CheckpointConfig, save_checkpoint, scores_file
    from exporter.scores import ExitScores
    from runtime.manifest import to_json_thresholds
    from exporter.heads import ExitHeads
    from exporter.recipes import ModelSource

    exits = list(range(3, bb.shape.num_layers, 3))[:8]
    heads = ExitHeads("adapter", exits, bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=8)
    cfg = CheckpointConfig(source=ModelSource("random"), exits=exits, num_layers=bb.shape.num_layers, head="adapter",
                           rank=8, thresholds=to_json_thresholds([float("inf")] * len(exits)),
                           policy={"kind": "target", "target": 0.95, "delta": None})
    # the export ships a per-target threshold table built from calibration scores: random ones do
    # (the timing runs with every exit off)
    rng = np.random.default_rng(0)
    n = 512
    scores = {scores_file(split): ExitScores(rng.random((n, len(exits))), rng.random((n, len(exits))) < 0.5,
                                             np.arange(n) // 64, exits, bb.shape.num_layers)
              for split in ("calibration", "heldout")}
    ckpt = folder / "ckpt" if (folder / "ckpt").is_dir() else save_checkpoint(folder / "ckpt", cfg, heads, scores)
    out = {}
    for kv in ("concat", "buffer"):
        if (folder / kv / "manifest.json").is_file():  # --work: reuse an earlier export
            out[kv] = folder / kv
            continue
        t0 = time.perf_counter()
        out[kv] = api.export(ckpt, out=folder / kv, kv=kv, kv_capacity=capacity if kv == "buffer" else None,
                             backbone=bb)
        print(f"exported chain ({len(exits) + 1} segments, {kv}): {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 512, 2048])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chain", action="store_true", help="time the exported 9-segment chain through Runtime.step")
    ap.add_argument("--work", type=Path, help="keep the exports here and reuse them (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="also write kv_buffer.json / kv_buffer.md here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = build(args.layers)
    s = bb.shape
    capacity = max(args.contexts) + args.steps + 16
    load_before = os.getloadavg()
    print(f"load before: {load_before}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        if args.chain:
            bb.tokenizer = char_tokenizer()
            folders = export_chain(bb, Path(tmp), capacity)
            runners = {n: ChainRunner(f, args.threads) for n, f in folders.items()}
        else:
            cpath, _ = export(bb, "concat", capacity, Path(tmp))
            bpath, _ = export(bb, "buffer", capacity, Path(tmp))
            dims = (args.layers, s.num_kv_heads, s.head_dim)
            runners = {"concat": ConcatRunner(cpath, args.threads, *dims),
                       "buffer": BufferRunner(bpath, args.threads, *dims, capacity)}
            for name, d in check(bb, runners).items():
                print(f"max |logits - PyTorch| {name}: {d:.2e}")
        rng = np.random.default_rng(2)
        print("ms per decode step (median), wall clock / CPU time of this process")
        print(f"{'context':>8} {'concat wall':>12} {'buffer wall':>12} {'concat cpu':>11} {'buffer cpu':>11}")
        for c in args.contexts:
            context = [(0.5 * rng.standard_normal((1, s.num_kv_heads, c, s.head_dim))).astype(np.float32)
                       for _ in range(2 * args.layers)]
            ms = time_decode(runners, context, args.steps, args.rounds, s.vocab_size)
            (cw, cc), (bw, bc) = ms["concat"], ms["buffer"]
            print(f"{c:>8} {cw:>12.2f} {bw:>12.2f} {cc:>11.2f} {bc:>11.2f}   load {os.getloadavg()[0]:.1f}", flush=True)
            rows.append({"context": c, "concat_ms": cw, "buffer_ms": bw, "concat_cpu_ms": cc, "buffer_cpu_ms": bc,
                         "load": os.getloadavg()[0]})
    print(f"load after: {os.getloadavg()}")
    if args.out:
        write_report(args, rows, load_before, os.getloadavg())


def write_report(args, rows: list[dict], load_before, load_after) -> None:
    """kv_buffer.json (the figures) and kv_buffer.md (a table with tokens/s and the ratio)."""
    import json
    import sys

    what = ("the exported 9-segment chain through Runtime.step (exits every 3 layers, exits off; each segment "
            "still runs its in-graph full-vocabulary head check, which dominates the absolute figures)" if args.chain
            else "one graph of the whole model")
    res = {"command": "python -m benchmarks.studies.kv_buffer_probe " + " ".join(sys.argv[1:]), "what": what,
           "layers": args.layers, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "load_before": load_before, "load_after": load_after, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_buffer.json").write_text(json.dumps(res, indent=1))
    lines = [f"# KV layouts: decode cost vs context ({args.layers} layers, SmolLM2-135M shapes, random weights)", "",
             f"`{res['command']}`", "",
             f"Timed: {what}; {args.threads} thread(s); median ms per decode step over {args.steps} steps x "
             f"{args.rounds} rounds. Load average before {load_before[0]:.2f}, after {load_after[0]:.2f}.", "",
             "| context (tokens) | concat ms/token | buffer ms/token | concat tok/s | buffer tok/s | buffer speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['concat_ms']:.2f} | {r['buffer_ms']:.2f} | {1e3 / r['concat_ms']:.1f} | "
                     f"{1e3 / r['buffer_ms']:.1f} | {r['concat_ms'] / r['buffer_ms']:.2f}x |")
    (args.out / "kv_buffer.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
