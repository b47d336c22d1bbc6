"""One frozen forward pass, cached on disk: hidden states at the exits + the teacher's top-k.

Training used to recompute the teacher's full 49,152-word distribution in every step.
Here the frozen model runs once over the text; per token we keep

* the hidden state after each exit layer (fp16 on disk for training text, fp32 for the
  calibration / held-out text whose scores set the thresholds),
* the teacher's top-k token ids and log-probabilities, plus the log of the probability
  mass outside them (the tail bucket); top_idx[:, 0] is the full model's argmax,
* the final hidden state (optional; full-vocabulary training and tests use it),
* position, input token, window (sequence) and domain labels.

Arrays are `.npy` files opened as memory maps, so a 400k-token cache (~4 GB for
SmolLM2's 8 exits) never has to fit in RAM; `meta.json` is written last and doubles
as the completeness marker, so an interrupted run is rebuilt rather than half-used. A
folder whose meta matches (model, exits, k, the windows' exact token ids) is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone
from .data import Windows

CACHE_VERSION = 1
META = "meta.json"


@dataclass
class Features:
    """Per-token arrays, flattened over windows (T tokens). `rows` restricts use to a subset."""

    exits: list[np.ndarray]  # per exit (T, D)
    final: np.ndarray | None  # (T, D) last layer's hidden state, or None
    sequence: np.ndarray  # (T,) window index
    position: np.ndarray  # (T,) position inside the window
    token: np.ndarray  # (T,) input token id at that position
    top_idx: np.ndarray  # (T, K) teacher's top-k ids, best first
    top_logp: np.ndarray  # (T, K) their log-probabilities
    tail_logp: np.ndarray  # (T,) log of the teacher's mass outside the top-k
    domain: np.ndarray  # (T,) index into `domains`
    domains: tuple[str, ...] = ("text",)
    rows: np.ndarray | None = None  # active token indices (None = all)
    folder: Path | None = field(default=None, compare=False)

    @property
    def total_tokens(self) -> int:
        return int(self.sequence.shape[0])

    @property
    def active(self) -> np.ndarray:
        return np.arange(self.total_tokens) if self.rows is None else self.rows

    @property
    def num_tokens(self) -> int:
        return self.total_tokens if self.rows is None else int(len(self.rows))

    @property
    def topk(self) -> int:
        return int(self.top_idx.shape[1])

    def hidden(self, k: int, rows: np.ndarray | slice, device: torch.device | str = "cpu") -> torch.Tensor:
        """Exit k's hidden states for `rows`, as float32 on `device`."""
        return torch.from_numpy(np.ascontiguousarray(self.exits[k][rows])).to(device).float()

    def final_hidden(self, rows, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.final is None:
            raise ValueError("this feature cache has no final hidden states (cached with keep_final=False)")
        return torch.from_numpy(np.ascontiguousarray(self.final[rows])).to(device).float()

    def teacher_top1(self, rows) -> np.ndarray:
        return np.asarray(self.top_idx[rows, 0])

    def with_tokens(self, n: int, seed: int = 0) -> "Features":
        """Whole windows drawn at random until about n tokens (a learning curve's subsets)."""
        seqs = np.unique(self.sequence)
        per = self.total_tokens // max(len(seqs), 1)
        pick = np.random.default_rng(seed).permutation(seqs)[:max(1, n // max(per, 1))]
        rows = np.flatnonzero(np.isin(self.sequence, pick))
        return dataclasses.replace(self, rows=rows)

    def with_exits(self, keep: list[int]) -> "Features":
        """The same tokens with only the exits at indices `keep` (pruned exits)."""
        return dataclasses.replace(self, exits=[self.exits[i] for i in keep])

    def remove(self) -> None:
        """Delete the on-disk cache (after training, unless the caller keeps it)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _key(backbone: Backbone, windows: Windows, exits: list[int], topk: int, dtype: str, keep_final: bool) -> dict:
    return {"version": CACHE_VERSION, "model": backbone.source.model_id, "layers": backbone.shape.num_layers,
            "hidden": backbone.shape.hidden_size, "vocab": backbone.shape.vocab_size, "exits": list(exits),
            "topk": topk, "dtype": dtype, "final": keep_final, "shape": list(windows.ids.shape),
            "ids_sha1": hashlib.sha1(np.ascontiguousarray(windows.ids).tobytes()).hexdigest(),
            "domains": list(windows.domains)}


def _arrays(T: int, D: int, K: int, E: int, dtype, keep_final: bool) -> dict[str, tuple[tuple, object]]:
    out = {f"exit_{k}": ((T, D), dtype) for k in range(E)}
    if keep_final:
        out["final"] = ((T, D), dtype)
    out.update(sequence=((T,), np.int32), position=((T,), np.int32), token=((T,), np.int32),
               top_idx=((T, K), np.int32), top_logp=((T, K), np.float16), tail_logp=((T,), np.float32),
               domain=((T,), np.int16))
    return out


def _features(arrs: dict, E: int, domains, folder) -> Features:
    return Features([arrs[f"exit_{k}"] for k in range(E)], arrs.get("final"), arrs["sequence"], arrs["position"],
                    arrs["token"], arrs["top_idx"], arrs["top_logp"], arrs["tail_logp"], arrs["domain"],
                    tuple(domains), folder=folder)


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probs, log tail mass) of the k most likely tokens: logits (..., V)."""
    logp = torch.log_softmax(logits.float(), -1)
    k = min(k, logp.shape[-1])
    vals, idx = logp.topk(k, -1)
    covered = torch.logsumexp(vals, -1)  # <= 0
    tail = torch.log((-torch.expm1(covered)).clamp_min(1e-30))  # log(1 - sum of top-k probs)
    return idx, vals, tail


@torch.no_grad()
def cache_features(backbone: Backbone, windows: Windows, exits: list[int], *, batch: int = 8, topk: int = 64,
                   folder: str | Path | None = None, dtype: str | None = None, keep_final: bool = True,
                   device: str | torch.device = "cpu", desc: str = "caching hidden states") -> Features:
    """Run the frozen model once over `windows`; keep what training and scoring need.

    folder=None keeps everything in RAM (small runs, tests); otherwise memory-mapped .npy
    files in `folder`, reused when their meta matches. dtype "float16" | "float32"
    (default: float32 in RAM, float16 on disk).
    """
    ids = torch.from_numpy(windows.ids)
    if ids.numel() == 0:
        raise ValueError("no tokens to cache: the text windows are empty")
    dtype = dtype or ("float32" if folder is None else "float16")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    N, S = ids.shape
    T, D, E = N * S, backbone.shape.hidden_size, len(exits)
    K = min(topk, backbone.shape.vocab_size)
    spec = _arrays(T, D, K, E, np.dtype(dtype), keep_final)
    key = _key(backbone, windows, exits, K, dtype, keep_final)
    if folder is not None:
        folder = Path(folder)
        meta = folder / META
        if meta.is_file() and json.loads(meta.read_text()) == key:
            return _features({n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in spec}, E, windows.domains, folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        arrs = {n: np.lib.format.open_memmap(folder / f"{n}.npy", mode="w+", dtype=dt, shape=shp)
                for n, (shp, dt) in spec.items()}
    else:
        arrs = {n: np.zeros(shp, dtype=dt) for n, (shp, dt) in spec.items()}
    arrs["sequence"][:] = np.repeat(np.arange(N, dtype=np.int32), S)
    arrs["position"][:] = np.tile(np.arange(S, dtype=np.int32), N)
    arrs["token"][:] = windows.ids.reshape(-1)
    arrs["domain"][:] = np.repeat(np.asarray(windows.domain, dtype=np.int16), S)
    model_device = next(backbone.model.parameters()).device
    backbone.model.to(device)
    try:
        for start in tqdm(range(0, N, batch), desc=desc, unit="batch", leave=False):
            chunk = ids[start:start + batch].to(device)
            lo, hi = start * S, (start + len(chunk)) * S
            captured, logits = backbone.forward(chunk, capture=list(exits) + [backbone.shape.num_layers])
            for k, layer in enumerate(exits):
                arrs[f"exit_{k}"][lo:hi] = captured[layer].reshape(-1, D).float().cpu().numpy()
            if keep_final:
                arrs["final"][lo:hi] = captured[backbone.shape.num_layers].reshape(-1, D).float().cpu().numpy()
            idx, vals, tail = teacher_topk(logits.reshape(-1, logits.shape[-1]), K)
            arrs["top_idx"][lo:hi] = idx.cpu().numpy()
            arrs["top_logp"][lo:hi] = vals.cpu().numpy()
            arrs["tail_logp"][lo:hi] = tail.cpu().numpy()
    finally:
        backbone.model.to(model_device)
    if folder is not None:
        for a in arrs.values():
            a.flush()
        del arrs
        (folder / META).write_text(json.dumps(key))
        return _features({n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in spec}, E, windows.domains, folder)
    return _features(arrs, E, windows.domains, None)


def load_features(folder: str | Path) -> Features:
    """A finished on-disk cache, without the windows it came from (benchmarks reuse kept caches)."""
    folder = Path(folder)
    meta = folder / META
    if not meta.is_file():
        raise FileNotFoundError(f"{folder} is not a finished feature cache ({META} is missing)")
    key = json.loads(meta.read_text())
    E = len(key["exits"])
    names = [f"exit_{k}" for k in range(E)] + (["final"] if key["final"] else []) + [
        "sequence", "position", "token", "top_idx", "top_logp", "tail_logp", "domain"]
    return _features({n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}, E, key["domains"], folder)
