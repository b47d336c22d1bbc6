"""Self-supervised head training: the frozen model's own prediction is the label.

One pass of the frozen backbone over the training windows caches the hidden state after
every exit layer and after the last layer. Training then never touches the backbone
again: each step samples cached token positions and fits all heads at once to the full
model's next-token distribution (KL) and/or its argmax (cross-entropy), the teacher
logits being recomputed from the cached last hidden state by the frozen final norm + LM head.
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
from .data import Windows
from .heads import ExitHeads, confidence
from .recipes import TrainConfig
from .scores import ExitScores

LOSSES = ("kl", "ce", "kl+ce")


@dataclass
class Features:
    """Cached hidden states, flattened over tokens: exit k -> (T, D), final -> (T, D)."""

    exits: list[torch.Tensor]
    final: torch.Tensor
    sequence: np.ndarray  # (T,) window index of each token


@torch.no_grad()
def cache_features(backbone: Backbone, windows: Windows, exits: list[int], batch: int = 8,
                   desc: str = "caching hidden states") -> Features:
    ids = torch.from_numpy(windows.ids)
    if ids.numel() == 0:
        raise ValueError("no tokens to cache: the text windows are empty")
    dtype = torch.float16 if ids.numel() * backbone.shape.hidden_size * (len(exits) + 1) > 2e8 else torch.float32
    per_exit: list[list[torch.Tensor]] = [[] for _ in exits]
    finals: list[torch.Tensor] = []
    for start in tqdm(range(0, len(ids), batch), desc=desc, unit="batch", leave=False):
        chunk = ids[start:start + batch]
        captured, _ = backbone.forward(chunk, capture=list(exits) + [backbone.shape.num_layers])
        for k, layer in enumerate(exits):
            per_exit[k].append(captured[layer].reshape(-1, captured[layer].shape[-1]).to(dtype))
        last = captured[backbone.shape.num_layers]
        finals.append(last.reshape(-1, last.shape[-1]).to(dtype))
    seq = np.repeat(np.arange(len(ids)), ids.shape[1])
    return Features([torch.cat(x) for x in per_exit], torch.cat(finals), seq)


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


def train_heads(backbone: Backbone, heads: ExitHeads, features: Features, cfg: TrainConfig) -> TrainReport:
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {LOSSES}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    n = features.final.shape[0]
    heads.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training exit heads", unit="step")
    for _ in bar:
        idx = torch.randint(0, n, (min(cfg.batch_tokens, n),), generator=gen)
        with torch.no_grad():
            teacher = backbone.family.logits(features.final[idx].float())
            t_logp = F.log_softmax(teacher, -1)
            t_top = teacher.argmax(-1)
        loss = torch.zeros(())
        for k in range(len(heads.exits)):
            s_logp = F.log_softmax(heads.logits(k, features.exits[k][idx].float()), -1)
            if "kl" in cfg.loss:
                loss = loss + F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
            if "ce" in cfg.loss:
                loss = loss + F.nll_loss(s_logp, t_top)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item() / len(heads.exits))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    heads.eval()
    return TrainReport(seconds=time.perf_counter() - t0, steps=cfg.steps, tokens=n,
                       loss_first=losses[0] if losses else float("nan"),
                       loss_last=float(np.mean(losses[-10:])) if losses else float("nan"),
                       head_bytes=heads.num_bytes())


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
                gates=None, chunk: int = 2048) -> ExitScores:
    """Each exit's confidence (head top-1/margin, or its gate's score) and its head's agreement
    with the full model, for every cached token."""
    if kind == "gate":
        if gates is None:
            raise ValueError("confidence 'gate' needs trained gates (train with gates enabled)")
        return gate_scores(exit_scores(backbone, heads, features, "top1", chunk=chunk), backbone, heads, features,
                           gates, chunk)
    n = features.final.shape[0]
    conf = np.zeros((n, len(heads.exits)), dtype=np.float32)
    agree = np.zeros((n, len(heads.exits)), dtype=bool)
    for s in range(0, n, chunk):
        full = backbone.family.logits(features.final[s:s + chunk].float()).argmax(-1)
        for k in range(len(heads.exits)):
            tok, score = confidence(heads.logits(k, features.exits[k][s:s + chunk].float()), kind)
            conf[s:s + chunk, k] = score.numpy()
            agree[s:s + chunk, k] = (tok == full).numpy()
    return ExitScores(conf, agree, features.sequence, list(heads.exits), backbone.shape.num_layers,
                      check_cost(backbone, heads, kind))


@torch.no_grad()
def gate_scores(head_scores: ExitScores, backbone: Backbone, heads: ExitHeads, features: Features, gates,
                chunk: int = 2048) -> ExitScores:
    """The same tokens and agreements as `head_scores` (from `features`), scored by the gates:
    the vocabulary-sized heads need not run again."""
    conf = np.zeros(head_scores.confidence.shape, dtype=np.float32)
    for s in range(0, conf.shape[0], chunk):
        for k in range(conf.shape[1]):
            conf[s:s + chunk, k] = gates.score(k, features.exits[k][s:s + chunk].float()).numpy()
    return dataclasses.replace(head_scores, confidence=conf, check_cost=check_cost(backbone, heads, "gate", gates))
