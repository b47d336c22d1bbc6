"""Exit gates: decide *whether* to leave for a fraction of a layer's cost.

On small models the exit head is expensive: SmolLM2-135M's LM head (576 x 49152) costs
as much as ~8 of its decoder layers, so a full-vocabulary softmax at every exit can make
early exit slower than no exit. A gate is a tiny MLP per exit, trained self-supervised to
predict whether that exit's head agrees with the full model. The segment graph outputs
only the gate's score; the head runs once, for the token that actually leaves. Scores
are calibrated exactly like head confidences (target, guarantee, EERO budget).

What a gate sees (`FEATURES`, chosen per checkpoint; every one is computed inside the
segment graph from what the segment already has, so the runtime feeds nothing new):

* ``hidden``: the RMS-normalised hidden state at the exit (D numbers).
* ``move``: how far the state moved since the previous exit (CALM's state saturation):
  cosine between this exit's hidden state and the segment's *input* (the previous exit's
  state, or the embeddings for the first segment), the log relative size of the change,
  and the log RMS of the state.
* ``shortlist``: the exit head on a shortlist of the S words the full model predicts most
  often: top-1 probability and top-1 minus top-2 within the shortlist, and the top logit
  (S*D multiply-adds instead of V*D).
* ``position``: log(1 + position).

Scalar features are standardised with training-set statistics kept as buffers.
Cost per check: (D + F)*H + H multiply-adds, + S*D with the shortlist
(SmolLM2, H=32, S=256: ~165k, ~5% of one layer).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .scores import NonFiniteError

FEATURES = ("hidden", "move", "shortlist", "position")
N_SCALARS = {"hidden": 0, "move": 3, "shortlist": 3, "position": 1}


def check_features(features) -> tuple[str, ...]:
    features = tuple(features)
    bad = [f for f in features if f not in FEATURES]
    if bad or "hidden" not in features:
        raise ValueError(f"gate features must include 'hidden' and come from {FEATURES}; got {list(features)}")
    return tuple(f for f in FEATURES if f in features)  # canonical order: the graph and training agree


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(-1) + 1e-6)


class ExitGates(nn.Module):
    """One small MLP per exit over the features above."""

    def __init__(self, num_exits: int, hidden_size: int, width: int = 32, features=("hidden",), shortlist: int = 0):
        super().__init__()
        self.width = width
        self.features = check_features(features)
        self.n_short = shortlist if "shortlist" in self.features else 0
        if "shortlist" in self.features and shortlist < 2:
            raise ValueError("the 'shortlist' gate feature needs a shortlist of at least 2 words")
        self.n_scalar = sum(N_SCALARS[f] for f in self.features)
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(hidden_size + self.n_scalar, width), nn.GELU(),
                                                 nn.Linear(width, 1)) for _ in range(num_exits))
        self.register_buffer("scalar_mean", torch.zeros(num_exits, self.n_scalar))
        self.register_buffer("scalar_std", torch.ones(num_exits, self.n_scalar))
        # per exit: the shortlist's rows of that exit's vocabulary matrix, and their bias
        self.register_buffer("short_w", torch.zeros(num_exits, self.n_short, hidden_size))
        self.register_buffer("short_b", torch.zeros(num_exits, self.n_short))

    def set_shortlist(self, heads, ids: torch.Tensor) -> None:
        """Copy the shortlist's vocabulary rows out of each exit head."""
        for k in range(len(self.gates)):
            w, b = heads.vocab_matrix(k)
            self.short_w[k] = w.detach()[ids].float()
            if b is not None:
                self.short_b[k] = b.detach()[ids].float()

    def scalars(self, k: int, hidden: torch.Tensor, prev: torch.Tensor | None, position: torch.Tensor | None,
                vocab_input: torch.Tensor | None) -> torch.Tensor:
        """(B, n_scalar) raw scalar features. hidden, prev, vocab_input: (B, D); position: (B,)."""
        out = []
        if "move" in self.features:
            diff = hidden - prev
            cos = (hidden * prev).sum(-1) / (torch.linalg.vector_norm(hidden, dim=-1)
                                              * torch.linalg.vector_norm(prev, dim=-1) + 1e-6)
            out += [cos, torch.log(_rms(diff) / _rms(hidden)), torch.log(_rms(hidden))]
        if "shortlist" in self.features:
            logits = vocab_input @ self.short_w[k].T + self.short_b[k]  # (B, S)
            top = torch.topk(logits, 2, dim=-1).values
            p = torch.softmax(logits, -1).max(-1).values
            p2 = torch.exp(top[:, 1] - torch.logsumexp(logits, -1))
            out += [p, p - p2, top[:, 0]]
        if "position" in self.features:
            out.append(torch.log1p(position.float()))
        return torch.stack(out, -1) if out else hidden.new_zeros(hidden.shape[0], 0)

    def logit(self, k: int, hidden: torch.Tensor, prev: torch.Tensor | None = None, position: torch.Tensor | None = None,
              vocab_input: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden.float()
        prev = None if prev is None else prev.float()
        vocab_input = None if vocab_input is None else vocab_input.float()
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)  # scale grows with depth: ignore it
        if self.n_scalar:
            s = (self.scalars(k, hidden, prev, position, vocab_input) - self.scalar_mean[k]) / self.scalar_std[k]
            x = torch.cat([x, s], -1)
        return self.gates[k](x).squeeze(-1)  # (B,) logit of P(exit head agrees)

    def score(self, k: int, hidden: torch.Tensor, prev: torch.Tensor | None = None, position: torch.Tensor | None = None,
              vocab_input: torch.Tensor | None = None) -> torch.Tensor:
        """Estimated probability that exit k's top-1 token agrees with the full model."""
        return torch.sigmoid(self.logit(k, hidden, prev, position, vocab_input))

    def forward(self, k: int, hidden: torch.Tensor, prev: torch.Tensor | None = None,
                position: torch.Tensor | None = None, vocab_input: torch.Tensor | None = None) -> torch.Tensor:
        """`score`, called as the module so that every op of the gate (the shortlist's product
        included) is named under /gates/ in exported graphs, which quantization leaves in float."""
        return self.score(k, hidden, prev, position, vocab_input)

    def macs(self) -> int:
        return sum(p.numel() for p in self.gates[0].parameters()) + self.n_short * self.short_w.shape[-1]

    # -- feeding from the training cache ---------------------------------------------------
    def inputs(self, k: int, backbone, heads, features, rows: np.ndarray, device) -> tuple:
        """(hidden, prev, position, vocab_input) for exit k on cached tokens `rows`, exactly as the
        segment graph forms them: prev is the previous exit's state or the token's embedding."""
        hidden = features.hidden(k, rows, device)
        prev = position = z = None
        if "move" in self.features:
            if k > 0:
                prev = features.hidden(k - 1, rows, device)
            else:
                tok = torch.from_numpy(np.asarray(features.token[rows], dtype=np.int64)).to(device)[:, None]
                pos = torch.from_numpy(np.asarray(features.position[rows], dtype=np.int64)).to(device)[:, None]
                prev = backbone.family.embed(tok, pos)[:, 0].float()
        if "position" in self.features:
            position = torch.from_numpy(np.asarray(features.position[rows], dtype=np.int64)).to(device)
        if "shortlist" in self.features:
            z = heads.vocab_input(k, hidden)
        return hidden, prev, position, z

    @torch.no_grad()
    def score_features(self, backbone, heads, features, *, chunk: int = 2048, device="cpu") -> np.ndarray:
        """(N, E) gate scores for the cache's active tokens."""
        rows = features.active
        out = np.zeros((len(rows), len(self.gates)), dtype=np.float32)
        self.to(device)
        heads.to(device)
        backbone.model.to(device)
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            for k in range(len(self.gates)):
                out[s:s + chunk, k] = self.score(k, *self.inputs(k, backbone, heads, features, r, device)).cpu().numpy()
        self.to("cpu")
        heads.to("cpu")
        backbone.model.to("cpu")
        return out


def shortlist_ids(features, size: int) -> torch.Tensor:
    """The `size` words the full model predicts most often on the cached training tokens."""
    top1 = np.asarray(features.top_idx[features.active, 0], dtype=np.int64)
    counts = np.bincount(top1, minlength=size)
    return torch.from_numpy(np.argsort(-counts, kind="stable")[:size].copy())


@torch.no_grad()
def _standardise(gates: ExitGates, backbone, heads, features, rows: np.ndarray, device) -> None:
    if not gates.n_scalar:
        return
    for k in range(len(gates.gates)):
        s = gates.scalars(k, *gates.inputs(k, backbone, heads, features, rows, device))
        gates.scalar_mean[k] = s.mean(0)
        gates.scalar_std[k] = s.std(0).clamp_min(1e-4)


def train_gates(gates: ExitGates, backbone, heads, features, agree: np.ndarray, *, steps: int = 300,
                batch: int = 1024, lr: float = 3e-3, seed: int = 0, device="cpu") -> list[float]:
    """Fit each gate to predict agreement (binary cross-entropy) on cached tokens.

    agree: (N, E) bool, whether each exit's head agrees on features.active tokens (same order).
    """
    rows = features.active
    if agree.shape != (len(rows), len(gates.gates)):
        raise ValueError(f"agree must be (tokens, exits) = {(len(rows), len(gates.gates))}, got {agree.shape}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gates.to(device)
    heads.to(device)
    backbone.model.to(device)
    if "shortlist" in gates.features:
        gates.set_shortlist(heads, shortlist_ids(features, gates.n_short).to(device))
    _standardise(gates, backbone, heads, features, rows[np.sort(rng.permutation(len(rows))[:8192])], device)
    opt = torch.optim.AdamW(gates.gates.parameters(), lr=lr, weight_decay=1e-4)
    target = torch.from_numpy(agree.astype(np.float32)).to(device)
    losses = []
    gates.train()
    for step in tqdm(range(steps), desc="training exit gates", unit="step", leave=False):
        pick = np.sort(rng.integers(0, len(rows), min(batch, len(rows))))
        loss = 0.0
        per_exit = []
        for k in range(len(gates.gates)):
            with torch.no_grad():
                inp = gates.inputs(k, backbone, heads, features, rows[pick], device)
            per_exit.append(F.binary_cross_entropy_with_logits(gates.logit(k, *inp), target[pick, k]))
            loss = loss + per_exit[-1]
        loss = loss / len(gates.gates)
        if not torch.isfinite(loss):  # before the step, which would spread it to every weight
            k = next(i for i, v in enumerate(per_exit) if not torch.isfinite(v))
            value = float(per_exit[k].detach())
            raise NonFiniteError(f"exit gate after layer {heads.exits[k]}: training loss {value:.4g} at "
                                 f"step {step + 1} of {steps} (non-finite gate inputs, or training diverged: try a "
                                 "lower gate learning rate). Stopped before writing a checkpoint.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gates.eval()
    for p in gates.parameters():
        p.requires_grad_(False)
    gates.to("cpu")
    heads.to("cpu")
    backbone.model.to("cpu")
    return losses
