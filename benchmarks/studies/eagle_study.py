"""Offline study: an EAGLE-style feature drafter on the frozen model, against prompt lookup.

    python -m benchmarks.studies.eagle_study --train-cache DIR [--calib-cache DIR] --export DIR
        [--shortlist 4096] [--epochs 6] [--per-domain 8] [--new-tokens 48] [--drafts 5] [--out DIR]

Medusa-style heads on a cached state guessed two tokens ahead on 0.217 of held-out positions
(../lookahead): they never see the token the full model has just chosen. EAGLE (arXiv 2401.15077)
does: one decoder layer takes the model's last feature f_t (the input of its LM head) and the
embedding of the token x_{t+1} just chosen, predicts the next feature f_{t+1}, and reads a draft
of x_{t+2} from it through the model's own (frozen) LM head, here restricted to a shortlist of
the N tokens the full model predicts most often on the training text (FR-Spec, arXiv 2502.14856);
then it runs on its own predicted features for further drafts. Trained self-supervised: features
and targets are the frozen model's own (no labels); loss = smooth-L1 on the feature + 0.1 x
cross-entropy against the model's top-1 (EAGLE's recipe).

Features come from the hidden-state cache `lama train --cache-dir` keeps: the state after the
deepest cached exit layer, run through the remaining layers and the final norm here (a fraction
of a full pass). Evaluation is decoding itself: greedy continuations of held-out prompts of every
domain by the full model (text neither training nor calibration saw); at every generated
position the drafter starts from the true prefix (as it would after each verifying call) and
drafts K tokens; a draft counts while it and all before it equal the full model's tokens.
Prompt lookup (runtime/drafting.py, what exact mode uses today) is scored on the same positions.
Reported: acceptance by draft position per domain, expected tokens per verifying call for K
drafts, shortlist coverage, and the drafter's cost in multiply-accumulates per draft against
one token of the full model.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.report import command_line, write_report


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split convention, as Llama in transformers) of x (..., S, d) at pos (S,) or (..., S)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.to(torch.float32)[..., None] * inv  # (..., S, d/2)
    if ang.dim() == 3:  # per-row positions (B, S): broadcast over the heads of x (B, H, S, d)
        ang = ang[:, None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Drafter(nn.Module):
    """fc([f, e]) -> one pre-norm decoder layer (GQA attention + SwiGLU) -> predicted next feature."""

    def __init__(self, width: int, heads: int, kv_heads: int, ffn: int, theta: float, lm_rows: torch.Tensor):
        super().__init__()
        self.h, self.kv, self.d, self.theta = heads, kv_heads, width // heads, theta
        self.fc = nn.Linear(2 * width, width, bias=False)
        self.n1, self.n2 = nn.RMSNorm(width, eps=1e-5), nn.RMSNorm(width, eps=1e-5)
        self.q = nn.Linear(width, heads * self.d, bias=False)
        self.k = nn.Linear(width, kv_heads * self.d, bias=False)
        self.v = nn.Linear(width, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, width, bias=False)
        self.gate, self.up = nn.Linear(width, ffn, bias=False), nn.Linear(width, ffn, bias=False)
        self.down = nn.Linear(ffn, width, bias=False)
        self.register_buffer("lm_rows", lm_rows)  # (N, D) shortlist rows of the frozen LM head

    def init_from(self, layer: nn.Module) -> None:
        """Start the decoder layer from one of the model's own (Llama naming)."""
        a, m = layer.self_attn, layer.mlp
        for mine, theirs in ((self.q, a.q_proj), (self.k, a.k_proj), (self.v, a.v_proj), (self.o, a.o_proj),
                             (self.gate, m.gate_proj), (self.up, m.up_proj), (self.down, m.down_proj)):
            mine.weight.data.copy_(theirs.weight.data)
        self.n1.weight.data.copy_(layer.input_layernorm.weight.data)
        self.n2.weight.data.copy_(layer.post_attention_layernorm.weight.data)

    def kv_of(self, x: torch.Tensor, pos: torch.Tensor):
        hx = self.n1(x)
        b, s, _ = x.shape
        k = rope(self.k(hx).view(b, s, self.kv, self.d).transpose(1, 2), pos, self.theta)
        v = self.v(hx).view(b, s, self.kv, self.d).transpose(1, 2)
        return hx, k, v

    def layer(self, x: torch.Tensor, pos: torch.Tensor, past=None, mask=None):
        """x (B, S, D) at positions pos; past: (k, v) (B, kv, P, d) before them; mask (B, S, P+S) bool."""
        b, s, _ = x.shape
        hx, k, v = self.kv_of(x, pos)
        q = rope(self.q(hx).view(b, s, self.h, self.d).transpose(1, 2), pos, self.theta)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        rep = self.h // self.kv
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q, kk, vv, attn_mask=None if mask is None else mask[:, None],
                                             is_causal=mask is None)
        x = x + self.o(att.transpose(1, 2).reshape(b, s, -1))
        hx = self.n2(x)
        return x + self.down(F.silu(self.gate(hx)) * self.up(hx)), (k, v)

    def forward(self, feat: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, past=None, mask=None):
        out, kv = self.layer(self.fc(torch.cat([feat, emb], -1)), pos, past, mask)
        return out, out @ self.lm_rows.T, kv


def final_features(bb, cache_dir: Path, batch: int = 16, limit: int | None = None):
    """(features (W, S, D) fp32 after the final norm, ids (W, S), the model's top-1 (W, S)) from a
    hidden-state cache: its deepest cached exit state run through the remaining layers."""
    from tqdm.auto import tqdm

    from exporter.cache import load_features

    feats = load_features(cache_dir)
    W, S = _shape(cache_dir)
    W = W if limit is None else min(W, limit)
    layer0 = _exits(cache_dir)[-1]
    ids = np.asarray(feats.token[: W * S]).reshape(W, S)
    top1 = np.asarray(feats.top_idx[: W * S, 0]).reshape(W, S)
    fam, n = bb.family, bb.shape.num_layers
    out = np.empty((W, S, bb.shape.hidden_size), dtype=np.float32)
    pos = torch.arange(S)[None, :]
    with torch.no_grad():
        for w0 in tqdm(range(0, W, batch), desc=f"features from layer {layer0}", leave=False):
            rows = np.arange(w0 * S, min(W, w0 + batch) * S)
            h = feats.hidden(len(feats.exits) - 1, rows).view(-1, S, bb.shape.hidden_size)
            am = torch.ones(h.shape[:2], dtype=torch.long)
            masks = fam.attention_masks(am, S, torch.float32)
            pe = fam.position_embeddings(h, pos.expand(h.shape[0], -1))
            for i in range(layer0, n):
                h = fam.run_layer(i, h, masks, pos.expand(h.shape[0], -1), pe, None)
            out[w0:w0 + h.shape[0]] = fam.final_norm(h).numpy()
    return out, ids, top1


def _meta(cache_dir: Path) -> dict:
    import json

    return json.loads((Path(cache_dir) / "meta.json").read_text())


def _shape(cache_dir: Path):
    return tuple(_meta(cache_dir)["shape"])


def _exits(cache_dir: Path) -> list[int]:
    return list(_meta(cache_dir)["exits"])


def train(drafter: Drafter, embed, data, short_of: torch.Tensor, epochs: int, lr: float, batch: int = 8,
          seed: int = 0) -> list[float]:
    """Teacher-forced over windows: pair i = (f_i, e(x_{i+1})) -> f_{i+1} and the model's top-1 at i+1."""
    from tqdm.auto import tqdm

    feats, ids, top1 = data
    W, S, _ = feats.shape
    g = torch.Generator().manual_seed(seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(W / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pos = torch.arange(S - 1)
    losses = []
    bar = tqdm(total=steps, desc="drafter", leave=False)
    for _ in range(epochs):
        for b in torch.randperm(W, generator=g).split(batch):
            f = torch.from_numpy(feats[b.numpy()])
            x = torch.from_numpy(ids[b.numpy()])
            t = short_of[torch.from_numpy(top1[b.numpy()])[:, 1:]]  # -1: outside the shortlist
            with torch.no_grad():
                e = embed(x[:, 1:])
            pred, logits, _ = drafter(f[:, :-1], e, pos)
            loss = F.smooth_l1_loss(pred, f[:, 1:]) + 0.1 * F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return losses


@torch.no_grad()
def continuations(bb, prompts: dict[str, list[list[int]]], new_tokens: int):
    """{domain: [(ids (L,), features (L, D), prompt length)]}: the full model's greedy continuations."""
    from tqdm.auto import tqdm

    out = {}
    for dom, ps in tqdm(prompts.items(), desc="greedy continuations", leave=False):
        out[dom] = []
        for p in ps:
            x = torch.tensor([p])
            g = bb.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                                  min_new_tokens=new_tokens, pad_token_id=0)
            o = bb.model(g, output_hidden_states=True)
            out[dom].append((g[0].numpy(), o.hidden_states[-1][0].float().numpy(), len(p)))
    return out


@torch.no_grad()
def eagle_drafts(drafter: Drafter, embed, short_ids: torch.Tensor, ids: np.ndarray, feats: np.ndarray,
                 starts: np.ndarray, K: int) -> np.ndarray:
    """(len(starts), K) drafts: at each t, from the true pairs up to t, K steps on its own features."""
    L = len(ids)
    x = torch.from_numpy(ids)
    f = torch.from_numpy(feats)[None]
    e = embed(x[None, 1:])
    pos = torch.arange(L - 1)
    pred, logits, (k_all, v_all) = drafter(f[:, :-1], e, pos)  # step 1 at every t at once
    st = torch.from_numpy(starts)
    n = len(st)
    drafts = torch.empty(n, K, dtype=torch.long)
    drafts[:, 0] = short_ids[logits[0, st].argmax(-1)]
    cur = pred[0, st][:, None]  # (n, 1, D): f^_{t+1}
    past = (k_all.expand(n, -1, -1, -1), v_all.expand(n, -1, -1, -1))  # the true pairs' keys/values
    true_ok = torch.arange(L - 1)[None, :] <= st[:, None]  # each start t sees the true pairs 0..t
    for s in range(1, K):
        p = (st + s)[:, None]  # the pair (f^_{t+s}, d_s) sits at position t+s
        own = torch.ones(n, s, dtype=torch.bool)  # its own draft pairs before, and this one
        mask = torch.cat([true_ok, own], 1)[:, None, :]  # (n, 1, L-1+s)
        cur, logits, past = drafter(cur, embed(drafts[:, s - 1:s]), p, past, mask)
        drafts[:, s] = short_ids[logits[:, 0].argmax(-1)]
    return drafts.numpy()


def chain_accept(drafts: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(n, K) bool: draft s and every draft before it equal the full model's tokens."""
    return np.cumprod(drafts == truth, axis=1).astype(bool)


def verify_points(ids: np.ndarray, plen: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, truth) in a greedy continuation of a `plen`-token prompt: every t where x_{t+1}
    was generated and the K tokens after it are known, and those K tokens (what drafts must equal)."""
    starts = np.arange(plen - 1, len(ids) - K - 1)
    return starts, np.stack([ids[t + 2:t + 2 + K] for t in starts])


def drafts_at(propose, ids: np.ndarray, starts: np.ndarray, K: int) -> np.ndarray:
    """(len(starts), K): what `propose(history, K)` drafts after each start, -1 past its end."""
    out = np.full((len(starts), K), -1)
    for r, t in enumerate(starts):
        d = propose(ids[: t + 2], K)
        out[r, : len(d)] = d
    return out


def acceptance_rows(per_domain: dict, mean: dict, sources, K: int, label: str = "drafter") -> list[str]:
    """The markdown table of acceptance per draft position, per domain and source, with the
    tokens per call drafting 1..K positions would give before cost."""
    rows = [f"| domain | {label} | " + " | ".join(f"pos {s + 1}" for s in range(K)) + " | tokens/call, K=1..K |",
            "|---|---|" + "---:|" * (K + 1)]
    for dom, v in list(per_domain.items()) + [("mean", mean)]:
        for k in sources:
            tpc = " / ".join(f"{1 + sum(v[k][:j + 1]):.2f}" for j in range(K))
            rows.append(f"| {dom} | {k} | " + " | ".join(f"{x:.3f}" for x in v[k]) + f" | {tpc} |")
    return rows


def main(argv=None) -> int:
    from exporter.api import resolve_recipe
    from exporter.backbone import load_backbone
    from exporter.data import default_data_dir, heldout_prompts
    from runtime.drafting import PromptLookup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-cache", type=Path, required=True, nargs="+")
    ap.add_argument("--export", type=Path, required=True, help="an export of the model (its tokenizer.json)")
    ap.add_argument("--shortlist", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=("last-layer", "random"), default="last-layer")
    ap.add_argument("--max-windows", type=int, help="train on the first N cached windows only (a smoke run)")
    ap.add_argument("--per-domain", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--drafts", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bb = load_backbone(resolve_recipe(a.model).source)
    cfg = bb.model.config
    D, V = bb.shape.hidden_size, cfg.vocab_size
    parts = [final_features(bb, c, limit=a.max_windows) for c in a.train_cache]
    data = tuple(np.concatenate([p[i] for p in parts])[: a.max_windows] for i in range(3))
    t_feat = time.time() - t0
    freq = np.bincount(data[2].reshape(-1), minlength=V)
    short_ids = torch.from_numpy(np.argsort(-freq, kind="stable")[: a.shortlist].copy())
    short_of = torch.full((V,), -1, dtype=torch.long)
    short_of[short_ids] = torch.arange(a.shortlist)
    W = bb.family.lm_head.weight.detach()
    drafter = Drafter(D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                      float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]),
                      W[short_ids].clone())
    if a.init == "last-layer":
        drafter.init_from(bb.family.layers[-1])
    embed = bb.model.get_input_embeddings()
    t1 = time.time()
    losses = train(drafter, embed, data, short_of, a.epochs, a.lr, seed=a.seed)
    t_train = time.time() - t1
    drafter.eval()

    prompts = heldout_prompts(a.export, [default_data_dir()], a.per_domain, a.prompt_tokens)
    conts = continuations(bb, prompts, a.new_tokens)
    lookup, K = PromptLookup(), a.drafts
    per_domain, cover = {}, []
    for dom, seqs in conts.items():
        acc = {"eagle": [], "lookup": []}
        for ids, feats, plen in seqs:
            starts, truth = verify_points(ids, plen, K)
            acc["eagle"].append(chain_accept(eagle_drafts(drafter, embed, short_ids, ids, feats, starts, K), truth))
            acc["lookup"].append(chain_accept(drafts_at(lookup.propose, ids, starts, K), truth))
            cover.append(np.isin(ids[plen:], short_ids.numpy()).mean())
        per_domain[dom] = {k: np.concatenate(v).mean(0).round(4).tolist() for k, v in acc.items()}
    macs_draft = 2 * D * D + D * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * (D // cfg.num_attention_heads) \
        + D * D + 3 * D * cfg.intermediate_size + a.shortlist * D
    macs_full = sum(p.numel() for n, p in bb.model.named_parameters() if "embed" not in n) + V * D
    result = {
        "command": command_line("benchmarks.studies.eagle_study", argv), "model": a.model, "train_tokens": int(data[1].size), "shortlist": a.shortlist,
        "shortlist_coverage_of_generated_tokens": round(float(np.mean(cover)), 4), "epochs": a.epochs,
        "init": a.init, "feature_minutes": round(t_feat / 60, 1), "train_minutes": round(t_train / 60, 1),
        "final_loss": round(float(np.mean(losses[-20:])), 4), "draft_macs": int(macs_draft),
        "draft_cost_vs_full_token": round(macs_draft / macs_full, 4), "drafts": K,
        "acceptance_by_position": per_domain,
        "mean": {k: np.mean([v[k] for v in per_domain.values()], 0).round(4).tolist() for k in ("eagle", "lookup")},
    }
    rows = acceptance_rows(per_domain, result["mean"], ("eagle", "lookup"), K)
    md = [f"# EAGLE-style drafter vs prompt lookup: {a.model}, greedy continuations of held-out prompts", "",
          f"`{result['command']}`", "",
          f"Trained on {result['train_tokens']:,} cached tokens ({a.epochs} epochs, {result['train_minutes']} min; "
          f"features {result['feature_minutes']} min), shortlist {a.shortlist} tokens covering "
          f"{result['shortlist_coverage_of_generated_tokens']:.3f} of the generated tokens. One draft costs "
          f"{macs_draft / 1e6:.1f} M multiply-accumulates = {result['draft_cost_vs_full_token']:.3f} of a full "
          f"token. {a.per_domain} prompts x {a.new_tokens} new tokens per domain.", "",
          "Acceptance: the share of positions where drafts 1..s all equal the full model's greedy tokens; "
          "tokens/call = 1 + the sum up to K (before any cost).", "", *rows]
    write_report(a.out, "eagle", result, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
