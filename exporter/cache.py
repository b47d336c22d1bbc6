"""One frozen forward pass, cached on disk: hidden states at the exits + the teacher's top-k.

Training used to recompute the teacher's full 49,152-word distribution in every step.
Here the frozen model runs once over the text; per token we keep

* the hidden state after each exit layer (16 bits on disk for training text, fp32 for the
  calibration / held-out text whose scores set the thresholds; see "Storage type" below),
* the teacher's top-k token ids and log-probabilities, plus the log of the probability
  mass outside them (the tail bucket); top_idx[:, 0] is the full model's argmax,
* the final hidden state (optional; full-vocabulary training and tests use it),
* position, input token, window (sequence) and domain labels.

Arrays are `.npy` files opened as memory maps, so a 400k-token cache (~4 GB for
SmolLM2's 8 exits) never has to fit in RAM; `meta.json` is written last and doubles
as the completeness marker, so an interrupted run is rebuilt rather than half-used. A
folder whose meta matches (model, exits, k, the windows' exact token ids) is reused.

Storage type. float16 keeps 11 significant bits but nothing above 65,504; some families'
residual streams go past that (Gemma 3 270M: 8.8e4 after layer 12 in the first training
batch), and a cast there turns them into inf, and every head's loss into NaN. A 16-bit
request therefore stores float16 where the model's states fit it and bfloat16 (float32's
range with 8 significant bits; Gemma 3 is released in it) where they do not: the states are
checked per batch, and a float16 cache that would overflow is restarted in bfloat16. The type chosen
is recorded in meta.json ("dtype", and "dtype_note" for why). bfloat16 is stored as its
uint16 bit patterns (.npy has no bfloat16) and read back as `ml_dtypes.bfloat16`. float32
holds everything exactly at twice the bytes. The model's own states must be finite: a
non-finite one stops caching (`NonFiniteError`) instead of reaching training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone
from .data import Windows
from .scores import NonFiniteError

# 2: the stored type may be bfloat16 (chosen per model) and every stored state is checked
# finite; a version-1 cache (float16, unchecked) is rebuilt by cache_features.
CACHE_VERSION = 2
META = "meta.json"
DTYPES = ("float16", "bfloat16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65,504


def _bfloat16():
    import ml_dtypes  # onnx's dependency; pinned in the `export` extra

    return ml_dtypes.bfloat16


def _stored(dtype: str):
    """The numpy type a hidden-state array is written as (bfloat16: its bit patterns)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def _view(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A stored hidden-state array as the float type it holds (bfloat16 bits -> ml_dtypes.bfloat16)."""
    return arr.view(_bfloat16()) if dtype == "bfloat16" else arr


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    """float32 tensor from a float16 / bfloat16 / float32 array. bfloat16 (which torch cannot read
    from numpy) is the upper half of float32's bits: a shift widens it exactly, in numpy (~1 ms
    for 7 exits x 256 rows at D=640; torch's own conversion took 35 ms on 2 busy cores)."""
    if arr.dtype.itemsize == 2 and arr.dtype != np.float16:  # bfloat16
        return torch.from_numpy((np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16).view(np.float32))
    if arr.dtype == np.float16:  # numpy widens it exactly too, and ~4x faster than torch did here
        return torch.from_numpy(arr.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(arr))


class _Overflow(Exception):
    """A hidden state past float16's range while caching in float16: restart in bfloat16."""

    def __init__(self, layer: int, value: float):
        super().__init__(layer, value)
        self.layer, self.value = layer, value


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
        return _to_torch(self.exits[k][rows]).to(device)

    def final_hidden(self, rows, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.final is None:
            raise ValueError("this feature cache has no final hidden states (cached with keep_final=False)")
        return _to_torch(self.final[rows]).to(device)

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


def _key(backbone: Backbone, windows: Windows, exits: list[int], topk: int, dtype: str, keep_final: bool) -> dict:
    return {"version": CACHE_VERSION, "model": backbone.source.model_id, "layers": backbone.shape.num_layers,
            "hidden": backbone.shape.hidden_size, "vocab": backbone.shape.vocab_size, "exits": list(exits),
            "topk": topk, "dtype": dtype, "final": keep_final, "shape": list(windows.ids.shape),
            "ids_sha1": hashlib.sha1(np.ascontiguousarray(windows.ids).tobytes()).hexdigest(),
            "domains": list(windows.domains)}


# the per-token arrays: name -> (top-k columns?, numpy type); the one list of them
_TOKEN_ARRAYS = {"sequence": (False, np.int32), "position": (False, np.int32), "token": (False, np.int32),
                 "top_idx": (True, np.int32), "top_logp": (True, np.float16), "tail_logp": (False, np.float32),
                 "domain": (False, np.int16)}


def _hidden_names(E: int, keep_final: bool) -> list[str]:
    """The hidden-state arrays: one per exit, and the final layer's if kept."""
    return [f"exit_{k}" for k in range(E)] + (["final"] if keep_final else [])


def _arrays(T: int, D: int, K: int, E: int, dtype: str, keep_final: bool) -> dict[str, tuple[tuple, object]]:
    """{array name: (shape, numpy type as stored)}; hidden states in `dtype` (module doc)."""
    out = {name: ((T, D), _stored(dtype)) for name in _hidden_names(E, keep_final)}
    out.update({name: ((T, K) if topk else (T,), t) for name, (topk, t) in _TOKEN_ARRAYS.items()})
    return out


def _features(arrs: dict, E: int, domains, folder, dtype: str = "float32") -> Features:
    final = arrs.get("final")
    return Features([_view(arrs[f"exit_{k}"], dtype) for k in range(E)], None if final is None else _view(final, dtype),
                    arrs["sequence"], arrs["position"], arrs["token"], arrs["top_idx"], arrs["top_logp"],
                    arrs["tail_logp"], arrs["domain"], tuple(domains), folder=folder)


def _load(folder: Path, names, E: int, domains, dtype: str) -> Features:
    return _features({n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}, E, domains, folder, dtype)


def _reusable(meta: Path, key: dict, dtype: str) -> str | None:
    """The stored dtype when the finished cache at `meta` matches `key` and the request (a
    float16 request accepts the bfloat16 it fell back to); None = rebuild."""
    if not meta.is_file():
        return None
    old = json.loads(meta.read_text())
    if old.get("version") != CACHE_VERSION:
        tqdm.write(f"feature cache {meta.parent} was written by cache version {old.get('version')} "
                   f"(stored states unchecked for overflow); rebuilding it as version {CACHE_VERSION}", file=sys.stderr)
        return None
    stored = old.get("dtype")
    same = {k: v for k, v in old.items() if k not in ("dtype", "dtype_note")} == {
        k: v for k, v in key.items() if k != "dtype"}
    ok = stored == dtype or (dtype == "float16" and stored == "bfloat16")
    return stored if same and ok else None


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
    files in `folder`, reused when their meta matches. dtype (default: float32 in RAM,
    float16 on disk): "float16" = 16 bits, float16 where the model's states fit it and
    bfloat16 where they do not (module doc); "bfloat16" or "float32" as named.
    """
    ids = torch.from_numpy(windows.ids)
    if ids.numel() == 0:
        raise ValueError("no tokens to cache: the text windows are empty")
    dtype = dtype or ("float32" if folder is None else "float16")
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
    N, S = ids.shape
    T, D, E = N * S, backbone.shape.hidden_size, len(exits)
    K = min(topk, backbone.shape.vocab_size)
    key = _key(backbone, windows, exits, K, dtype, keep_final)
    if folder is not None:
        folder = Path(folder)
        stored = _reusable(folder / META, key, dtype)
        if stored is not None:
            return _load(folder, _arrays(T, D, K, E, stored, keep_final), E, windows.domains, stored)
    try:
        return _fill(backbone, windows, exits, K, folder, dtype, keep_final, device, batch, desc, key)
    except _Overflow as o:  # float16 cannot hold this model's states: bfloat16 has float32's range
        note = (f"float16 overflowed (|h| = {o.value:.4g} > {FLOAT16_MAX:.0f} after layer {o.layer}): "
                "stored as bfloat16")
        tqdm.write(f"{desc}: {note}", file=sys.stderr)
        return _fill(backbone, windows, exits, K, folder, "bfloat16", keep_final, device, batch, desc,
                     {**key, "dtype": "bfloat16", "dtype_note": note})


def _fill(backbone: Backbone, windows: Windows, exits: list[int], K: int, folder: Path | None, dtype: str,
          keep_final: bool, device, batch: int, desc: str, meta: dict) -> Features:
    ids = torch.from_numpy(windows.ids)
    N, S = ids.shape
    T, D, E = N * S, backbone.shape.hidden_size, len(exits)
    spec = _arrays(T, D, K, E, dtype, keep_final)
    if folder is not None:
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
    L = backbone.shape.num_layers
    layers = list(exits) + ([L] if keep_final else [])
    names = _hidden_names(E, keep_final)
    model_device = next(backbone.model.parameters()).device
    backbone.model.to(device)
    try:
        for start in tqdm(range(0, N, batch), desc=desc, unit="batch", leave=False):
            chunk = ids[start:start + batch].to(device)
            lo, hi = start * S, (start + len(chunk)) * S
            captured, logits = backbone.forward(chunk, capture=list(exits) + [L])
            for name, layer in zip(names, layers):
                arrs[name][lo:hi] = _encode(captured[layer].reshape(-1, D), dtype, layer, start)
            idx, vals, tail = teacher_topk(logits.reshape(-1, logits.shape[-1]), K)
            if not torch.isfinite(vals[:, 0]).all():
                raise NonFiniteError(f"the model's own logits are non-finite in windows {start}-"
                                     f"{start + len(chunk) - 1} of this text: nothing can be distilled from them")
            arrs["top_idx"][lo:hi] = idx.cpu().numpy()
            arrs["top_logp"][lo:hi] = vals.cpu().numpy()
            arrs["tail_logp"][lo:hi] = tail.cpu().numpy()
    except BaseException:
        if folder is not None:  # no half-written cache left behind (meta.json is not there yet anyway)
            del arrs
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        backbone.model.to(model_device)
    if folder is not None:
        for a in arrs.values():
            a.flush()
        del arrs
        (folder / META).write_text(json.dumps(meta))
        return _load(folder, spec, E, windows.domains, dtype)
    return _features(arrs, E, windows.domains, None, dtype)


def _encode(h: torch.Tensor, dtype: str, layer: int, window: int) -> np.ndarray:
    """(T, D) hidden states as stored in `dtype`; raises on a non-finite state, and with
    _Overflow where float16 cannot hold one."""
    h = h.detach().float()
    peak = float(h.abs().max()) if h.numel() else 0.0
    if not np.isfinite(peak):
        raise NonFiniteError(f"the model's own hidden state after layer {layer} is non-finite (windows from {window} "
                             "on): the model overflows in its own precision; cache nothing from it")
    if dtype == "float16" and peak > FLOAT16_MAX:
        raise _Overflow(layer, peak)
    if dtype == "bfloat16":
        return h.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return h.cpu().numpy().astype(dtype)


def load_features(folder: str | Path) -> Features:
    """A finished on-disk cache, without the windows it came from (benchmarks reuse kept caches)."""
    folder = Path(folder)
    meta = folder / META
    if not meta.is_file():
        raise FileNotFoundError(f"{folder} is not a finished feature cache ({META} is missing)")
    key = json.loads(meta.read_text())
    E = len(key["exits"])
    names = _hidden_names(E, key["final"]) + list(_TOKEN_ARRAYS)
    # a version-1 cache names float16 / float32, which its .npy files carry themselves: it loads as before
    return _load(folder, names, E, key["domains"], key.get("dtype", "float32"))
