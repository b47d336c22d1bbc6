"""Self-supervised head training: the frozen model's own prediction is the label.

One pass of the frozen backbone over the training text caches, per token, the hidden
state after every exit layer and the teacher's top-k next-token distribution
(`cache.py`). Training then never touches the backbone again: each step samples cached
tokens and fits all heads at once. Targets:

* ``topk`` (default): KL over the teacher's top-k + a tail bucket, with sampled and hard
  negatives standing in for the rest of the vocabulary (`distill.py`); a step costs
  k + m vocabulary rows instead of V (SmolLM2: ~600 of 49,152).
* ``full``: KL to the full distribution recomputed from the cached final hidden state
  by the frozen final norm + LM head (the original method; exact, V columns per step).

Everything runs on `device` ("cpu", "cuda", or "auto"); the device that runs the
exported model never trains.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbone import Backbone
from .cache import Features, cache_features  # noqa: F401  (re-exported: callers import it from here)
from .distill import HardPool, Negatives, duplicate_mask, topk_loss
from .heads import ExitHeads, confidence
from .recipes import TrainConfig
from .scores import ExitScores, NonFiniteError

LOSSES = ("kl", "ce", "kl+ce")
TARGETS = ("topk", "full")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" = cuda when this host has a GPU, else cpu; a named device must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU on this host")
    return device


def check_exits(exits: list[int], num_layers: int) -> list[int]:
    exits = sorted(set(int(e) for e in exits))
    if not exits:
        raise ValueError("no exit points given")
    bad = [e for e in exits if not 1 <= e < num_layers]
    if bad:
        raise ValueError(f"exit index out of range: {bad}; exits are layer counts in [1, {num_layers - 1}] "
                         f"(the model has {num_layers} layers; the last layer is the model's own head)")
    return exits


def default_exits(num_layers: int, every: int = 2) -> list[int]:
    return list(range(every, num_layers, every)) or [max(1, num_layers // 2)]


@dataclass
class TrainReport:
    seconds: float
    steps: int
    tokens: int
    loss_first: float
    loss_last: float
    head_bytes: int
    check_agreement: list[float] = dataclasses.field(default_factory=list)  # full-vocab checks, mean over exits


def train_heads(backbone: Backbone, heads: ExitHeads, features: Features, cfg: TrainConfig,
                device: str | torch.device | None = "cpu") -> TrainReport:
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {LOSSES}")
    if cfg.targets not in TARGETS:
        raise ValueError(f"unknown targets {cfg.targets!r}; choose one of {TARGETS}")
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    backbone.model.to(dev)
    heads.to(dev)
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    rows = features.active
    vocab = backbone.shape.vocab_size
    pool = HardPool()
    heads.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    checks: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training exit heads", unit="step")
    for step in bar:
        idx = np.sort(rows[rng.integers(0, len(rows), min(cfg.batch_tokens, len(rows)))])
        hid = [features.hidden(k, idx, dev) for k in range(len(heads.exits))]
        if cfg.targets == "full":
            per_exit = _full_vocab_loss(backbone, heads, features, idx, hid, cfg.loss, dev)
        else:
            top_idx = torch.from_numpy(np.asarray(features.top_idx[idx], dtype=np.int64)).to(dev)
            top_logp = torch.from_numpy(np.asarray(features.top_logp[idx], dtype=np.float32)).to(dev)
            tail = torch.from_numpy(np.asarray(features.tail_logp[idx], dtype=np.float32)).to(dev)
            neg = Negatives.draw(vocab, top_idx.shape[1], cfg.negatives, torch.cat([top_idx[:, 0].cpu(), pool.tensor()]),
                                 gen, dev)
            dup = duplicate_mask(top_idx, neg)
            shared = None
            if heads.kind == "adapter":  # one frozen matrix for every exit: gather its rows once
                w = heads.vocab_matrix(0)[0]
                shared = (w[top_idx], w[neg.idx])
            per_exit = []
            for k in range(len(heads.exits)):
                w, b = heads.vocab_matrix(k)
                per_exit.append(topk_loss(heads.vocab_input(k, hid[k]), w, b, top_idx, top_logp, tail, neg, dup,
                                          cfg.loss, shared))
            if cfg.check_every and step % cfg.check_every == 0:
                checks.append(_full_vocab_check(heads, hid, top_idx[:, 0], pool, cfg.check_rows))
        loss = sum(per_exit[1:], per_exit[0])  # summed in exit order, as before
        if not torch.isfinite(loss):  # before the step: a NaN would spread to every parameter it touches
            raise _non_finite_loss(heads, hid, per_exit, step, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item() / len(heads.exits))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    heads.eval()
    backbone.model.to("cpu")
    heads.to("cpu")
    return TrainReport(seconds=time.perf_counter() - t0, steps=cfg.steps, tokens=features.num_tokens,
                       loss_first=losses[0] if losses else float("nan"),
                       loss_last=float(np.mean(losses[-10:])) if losses else float("nan"),
                       head_bytes=heads.num_bytes(),
                       check_agreement=[round(c, 4) for c in checks])


def _non_finite_loss(heads: ExitHeads, hid: list[torch.Tensor], per_exit: list[torch.Tensor], step: int,
                     steps: int) -> NonFiniteError:
    """The error for a step whose loss is not finite: the first such exit, and a likely cause."""
    k = next(i for i, v in enumerate(per_exit) if not torch.isfinite(v))
    if not torch.isfinite(hid[k]).all():
        why = ("its cached hidden states are not finite: the feature cache holds inf/NaN "
               "(exporter/cache.py checks new caches; was this one written another way?)")
    elif any(not torch.isfinite(p).all() for p in heads.heads[k].parameters()):
        why = "its head's weights are no longer finite: training diverged (try a lower --lr)"
    else:
        why = "its inputs and weights are finite: the loss itself overflowed (try a lower --lr)"
    return NonFiniteError(f"exit after layer {heads.exits[k]}: training loss {float(per_exit[k].detach()):.4g} at step "
                          f"{step + 1} of {steps}; {why}. Stopped before writing a checkpoint.")


def _full_vocab_loss(backbone, heads, features, idx, hid, loss_kind, dev) -> list[torch.Tensor]:
    """Per exit, the loss against the full vocabulary's distribution."""
    with torch.no_grad():
        teacher = backbone.family.logits(features.final_hidden(idx, dev))
        t_logp = F.log_softmax(teacher, -1)
        t_top = teacher.argmax(-1)
    out = []
    for k in range(len(heads.exits)):
        s_logp = F.log_softmax(heads.logits(k, hid[k]), -1)
        loss = torch.zeros((), device=dev)
        if "kl" in loss_kind:
            loss = loss + F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        if "ce" in loss_kind:
            loss = loss + F.nll_loss(s_logp, t_top)
        out.append(loss)
    return out


@torch.no_grad()
def _full_vocab_check(heads: ExitHeads, hid: list[torch.Tensor], top1: torch.Tensor, pool: HardPool,
                      rows: int) -> float:
    """The student's argmax over the whole vocabulary on a few rows; words it wrongly ranks
    first become hard negatives. Returns the mean agreement over exits on those rows."""
    agree = []
    for k in range(len(heads.exits)):
        pred = heads.logits(k, hid[k][:rows]).argmax(-1)
        wrong = pred != top1[:rows]
        pool.add(pred[wrong])
        agree.append(float((~wrong).float().mean()))
    return float(np.mean(agree))


def layer_macs(backbone: Backbone) -> int:
    """Multiply-adds per token of one decoder layer (its matmul weights; attention over the
    context comes on top and grows with it)."""
    return sum(p.numel() for p in backbone.family.layers[0].parameters() if p.dim() >= 2)


def check_cost(backbone: Backbone, heads: ExitHeads, kind: str, gates=None) -> float:
    """Cost of one exit check in decoder layers: a gate, or a full-vocabulary head."""
    if kind == "gate":
        return gates.macs() / layer_macs(backbone)
    head = backbone.family.lm_head.weight.numel() + (2 * heads.rank * backbone.shape.hidden_size
                                                     if heads.kind == "adapter" else 0)
    return head / layer_macs(backbone)


@torch.no_grad()
def exit_scores(backbone: Backbone, heads: ExitHeads, features: Features, kind: str = "top1",
                gates=None, chunk: int = 2048, device: str | torch.device | None = "cpu") -> ExitScores:
    """Each exit's confidence (head top-1/margin, or its gate's score) and whether its head's
    argmax over the *whole* vocabulary agrees with the full model's, for every active token."""
    if kind == "gate":
        if gates is None:
            raise ValueError("confidence 'gate' needs trained gates (train with gates enabled)")
        return gate_scores(exit_scores(backbone, heads, features, "top1", chunk=chunk, device=device), backbone,
                           heads, features, gates, chunk, device)
    dev = resolve_device(device)
    backbone.model.to(dev)
    heads.to(dev)
    rows = features.active
    conf = np.zeros((len(rows), len(heads.exits)), dtype=np.float32)
    agree = np.zeros((len(rows), len(heads.exits)), dtype=bool)
    full_top1 = features.teacher_top1(rows).astype(np.int64)
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        full = torch.from_numpy(full_top1[s:s + chunk]).to(dev)
        for k in range(len(heads.exits)):
            tok, score = confidence(heads.logits(k, features.hidden(k, r, dev)), kind)
            conf[s:s + chunk, k] = score.cpu().numpy()
            agree[s:s + chunk, k] = (tok == full).cpu().numpy()
    backbone.model.to("cpu")
    heads.to("cpu")
    return ExitScores(conf, agree, features.sequence[rows], list(heads.exits), backbone.shape.num_layers,
                      check_cost(backbone, heads, kind), np.asarray(features.domain[rows]), features.domains,
                      full_top1)


@torch.no_grad()
def gate_scores(head_scores: ExitScores, backbone: Backbone, heads: ExitHeads, features: Features, gates,
                chunk: int = 2048, device: str | torch.device | None = "cpu") -> ExitScores:
    """The same tokens and agreements as `head_scores` (from `features`), scored by the gates:
    the vocabulary-sized heads need not run again."""
    conf = gates.score_features(backbone, heads, features, chunk=chunk, device=resolve_device(device))
    return dataclasses.replace(head_scores, confidence=conf, check_cost=check_cost(backbone, heads, "gate", gates))


def score_split(bb, heads, gates, feats, name: str, head_conf: str, device) -> dict[str, ExitScores]:
    """{score file name: ExitScores} for one split: head confidences, and gate scores if gates."""
    from .checkpoint import scores_file

    out = {scores_file(name): exit_scores(bb, heads, feats, head_conf, device=device)}
    if gates is not None:  # same tokens and agreements, scored by the gates
        out[scores_file(name, "gate")] = gate_scores(out[scores_file(name)], bb, heads, feats, gates, device=device)
    return out
