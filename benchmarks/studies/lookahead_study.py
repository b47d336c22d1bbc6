"""Offline study: how far ahead can a small head on a cached hidden state guess the full model?

    python -m benchmarks.studies.lookahead_study MODEL --train-cache DIR --heldout-cache DIR
        [--exit -1] [--heads 3] [--shortlist 1024 4096 16384] [--steps 600] [--out DIR]

Before building a lookahead drafter into the runtime, measure what it would accept. Medusa-1
style heads (arXiv 2401.10774) on the frozen model: head k maps the hidden state at position t
(here: an exit's, read from the hidden-state cache `lama train --cache-dir` keeps) through one
residual SiLU block, the model's own final norm and the model's LM head restricted to a
shortlist of the N tokens the full model predicts most often on the training text (FR-Spec's
trick, arXiv 2502.14856: the draft's LM head costs N/V of the full one). Targets are the full
model's own top-1 at position t+k (the cache's teacher ids: no labels), i.e. the token the full
model would choose k+1 steps ahead given the true text so far.

Reported on held-out windows (text neither training nor calibration saw), per domain:
acceptance by draft position (all heads 1..k right), the expected tokens per verifying call
for a chain of K drafts, the shortlist's coverage of the full model's tokens, and each head's
cost in multiply-accumulates against one token of the full model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.report import command_line, write_report


class LookaheadHeads(nn.Module):
    """K heads: h -> h + SiLU(W_k h) -> final norm -> shortlist rows of the LM head."""

    def __init__(self, k: int, width: int, norm: nn.Module, lm_rows: torch.Tensor):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(k))
        for b in self.blocks:  # start as the identity: head k begins as the logit lens
            nn.init.zeros_(b.weight)
            nn.init.zeros_(b.bias)
        self.norm = norm
        self.register_buffer("lm_rows", lm_rows)  # (N, D), frozen

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [self.norm(h + nn.functional.silu(b(h))) @ self.lm_rows.T for b in self.blocks]


def targets(feats, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid, ids): the full model's top-1 at row + k, where that row is in the same window."""
    T = feats.total_tokens
    nxt = np.minimum(rows + k, T - 1)
    valid = (rows + k < T) & (feats.sequence[nxt] == feats.sequence[rows])
    return valid, np.asarray(feats.top_idx[nxt, 0])


def study(model: str, train_dir: Path, heldout_dir: Path, exit_index: int, heads: int, shortlists: list[int],
          steps: int, batch: int = 512, lr: float = 3e-3, seed: int = 0) -> dict:
    from tqdm.auto import tqdm

    from exporter.backbone import load_backbone
    from exporter.cache import load_features

    torch.manual_seed(seed)
    bb = load_backbone(model)
    norm, lm = bb.family.final_norm, bb.family.lm_head
    for p in list(norm.parameters()) + list(lm.parameters()):
        p.requires_grad_(False)
    W = lm.weight.detach()  # (V, D)
    V, D = W.shape
    tr, ho = load_features(train_dir), load_features(heldout_dir)
    use_final = exit_index is None
    e = None if use_final else exit_index % len(tr.exits)
    state = (lambda f, r: f.final_hidden(r)) if use_final else (lambda f, r: f.hidden(e, r))
    freq = np.bincount(np.asarray(tr.top_idx[:, 0]), minlength=V)
    order = np.argsort(-freq, kind="stable")
    full_macs = bb.shape.num_layers * 12 * D * D + V * D  # rough: attention + MLP per layer, plus the head
    rng = np.random.default_rng(seed)
    import json

    exit_layers = json.loads((train_dir / "meta.json").read_text())["exits"]
    out = {"model": getattr(model, "model_id", str(model)),
           "exit_layer": bb.shape.num_layers if use_final else exit_layers[e], "hidden": D, "vocab": V, "heads": heads, "steps": steps,
           "train_tokens": tr.total_tokens, "heldout_tokens": ho.total_tokens, "shortlists": {}}
    for n in shortlists:
        keep = np.sort(order[:n])
        pos_of = np.full(V, -1)
        pos_of[keep] = np.arange(len(keep))
        model_ = LookaheadHeads(heads, D, norm, W[torch.as_tensor(keep)].clone())
        opt = torch.optim.Adam([p for p in model_.parameters() if p.requires_grad], lr=lr)
        t0 = time.perf_counter()
        for _ in tqdm(range(steps), desc=f"lookahead heads, shortlist {n}", unit="step"):
            rows = rng.integers(0, tr.total_tokens, batch)
            h = state(tr, rows)
            loss = 0.0
            for k, logits in enumerate(model_(h), start=1):
                valid, ids = targets(tr, rows, k)
                tgt = pos_of[ids]
                m = torch.as_tensor(valid & (tgt >= 0))
                if m.any():
                    loss = loss + nn.functional.cross_entropy(logits[m], torch.as_tensor(tgt)[m])
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        # held-out: a draft at position t is right when the head's top-1 equals the full model's
        per_domain: dict[str, dict] = {}
        with torch.no_grad():
            rows = np.arange(ho.total_tokens)
            right = np.zeros((heads, len(rows)), bool)
            valid_all = np.ones(len(rows), bool)
            for s in range(0, len(rows), 4096):
                r = rows[s:s + 4096]
                for k, logits in enumerate(model_(state(ho, r)), start=1):
                    valid, ids = targets(ho, r, k)
                    guess = keep[logits.argmax(-1).numpy()]
                    right[k - 1, s:s + 4096] = guess == ids
                    valid_all[s:s + 4096] &= valid
        chain = np.cumprod(right, axis=0)  # all heads up to k right
        coverage = float(np.isin(np.asarray(ho.top_idx[:, 0]), keep).mean())
        for d, name in list(enumerate(ho.domains)) + [(-1, "all")]:
            m = valid_all & ((ho.domain == d) if d >= 0 else True)
            acc = chain[:, m].mean(axis=1)
            per_domain[name] = {"tokens": int(m.sum()), "acceptance_at": acc.tolist(),
                                "tokens_per_call": float(1 + acc.sum())}
        head_macs = D * D + n * D
        out["shortlists"][str(n)] = {"coverage": coverage, "train_seconds": train_s, "domains": per_domain,
                                     "head_macs": head_macs, "head_share_of_token": head_macs / full_macs}
    return out


def build_heldout(checkpoint: Path, folder: Path, exits: list[int]) -> None:
    """Cache the frozen model's states on the checkpoint's held-out windows (text that neither
    training nor calibration drew from; Checkpoint.splits checks they are the recorded ones)."""
    from exporter.backbone import load_backbone
    from exporter.cache import cache_features
    from exporter.checkpoint import Checkpoint

    ck = Checkpoint.open(checkpoint)
    bb = load_backbone(ck.config.source)
    windows = ck.splits(bb.tokenizer)["heldout"]
    cache_features(bb, windows, exits, folder=folder, desc="caching held-out states")


def markdown(res: dict, command: str) -> str:
    lines = [f"# Lookahead heads on {res['model']}: acceptance on held-out text", "",
             f"`{command}`", "",
             f"{res['heads']} heads on the hidden state after layer {res['exit_layer']}, {res['steps']} steps of batch 512 "
             f"on {res['train_tokens']:,} training tokens; {res['heldout_tokens']:,} held-out tokens. Acceptance at "
             "k = share of positions where heads 1..k all guess the full model's top-1; tokens per call = 1 + their "
             "sum (a chain of drafts verified in one call, before its cost).", ""]
    for n, s in res["shortlists"].items():
        lines += [f"## Shortlist {int(n):,} tokens (coverage of the full model's held-out tokens {s['coverage']:.3f}; "
                  f"each head {s['head_macs'] / 1e6:.2f} M MACs = {s['head_share_of_token']:.1%} of a full token)", "",
                  "| domain | tokens | " + " | ".join(f"k={k + 1}" for k in range(res["heads"])) + " | tokens per call |",
                  "|---|---:|" + "---:|" * res["heads"] + "---:|"]
        for name, d in s["domains"].items():
            lines.append(f"| {name} | {d['tokens']:,} | " + " | ".join(f"{a:.3f}" for a in d["acceptance_at"])
                         + f" | {d['tokens_per_call']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="recipe name or model id (its LM head and final norm are used)")
    p.add_argument("--train-cache", type=Path, required=True)
    p.add_argument("--heldout-cache", type=Path, required=True)
    p.add_argument("--exit", default="-1",
                   help="whose hidden state feeds the heads: an exit index of the caches (default -1: the deepest) "
                        "or 'final' (the last layer's; `lama train` keeps it only in RAM caches)")
    p.add_argument("--checkpoint", type=Path,
                   help="build --heldout-cache first (if missing) from this checkpoint's held-out windows")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--shortlist", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    from exporter.recipes import load_recipe

    import json

    if a.checkpoint and not (a.heldout_cache / "meta.json").is_file():  # the same exits as the training cache
        build_heldout(a.checkpoint, a.heldout_cache, json.loads((a.train_cache / "meta.json").read_text())["exits"])
    for d in (a.train_cache, a.heldout_cache):
        if not (d / "meta.json").is_file():
            p.error(f"{d} is not a finished feature cache (no meta.json)")
    try:
        source = load_recipe(a.model).source
    except Exception:
        source = a.model
    res = study(source, a.train_cache, a.heldout_cache, None if a.exit == "final" else int(a.exit), a.heads,
                a.shortlist, a.steps)
    command = command_line("benchmarks.studies.lookahead_study", argv)
    md = markdown(res, command)
    write_report(a.out, "lookahead", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
