"""Distillation on the teacher's top-k: a step costs k + m vocabulary rows, not V.

The cached teacher gives, per token, its top-k ids with log-probabilities and the log of
the mass outside them (the tail). The loss is the KL divergence between teacher and
student over k + 1 buckets (the k tokens, and "everything else"):

    KL = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

The student's normaliser Z = sum_v exp(s_v) over all V words is estimated from its logits
on the row's own top-k, a shared set of *hard* negatives (counted once, weight 1) and m
uniformly drawn *random* negatives (each standing for (V - k - |hard|) / m words).
Hard negatives are the batch's teacher argmaxes plus a pool of words the student itself
ranked first where it was wrong, refreshed by a periodic full-vocabulary check: what
matters at an exit is the student's argmax over all V words, so words that win it
wrongly must be pushed down even when the teacher never ranks them.

When k + |negatives| would cover the vocabulary anyway (small models), all V words are
used with weight 1 and Z is exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class Negatives:
    """Vocabulary ids shared by a batch, with the log of how many words each stands for."""

    idx: torch.Tensor  # (M,) long
    logw: torch.Tensor  # (M,) float

    @classmethod
    def draw(cls, vocab: int, k: int, m: int, hard: torch.Tensor, gen: torch.Generator,
             device: torch.device | str = "cpu") -> "Negatives":
        hard = torch.unique(hard.to("cpu"))
        if k + len(hard) + m >= vocab:  # the sample would be most of the vocabulary: use it all, exactly
            return cls(torch.arange(vocab, device=device), torch.zeros(vocab, device=device))
        rand = torch.randint(0, vocab, (m,), generator=gen)
        w = math.log(max(vocab - k - len(hard), 1) / m)
        idx = torch.cat([hard, rand]).to(device)
        logw = torch.cat([torch.zeros(len(hard)), torch.full((m,), w)]).to(device)
        return cls(idx, logw)


class HardPool:
    """Words the student wrongly ranked first in recent full-vocabulary checks (FIFO)."""

    def __init__(self, size: int = 256):
        self.ids: deque[int] = deque(maxlen=size)

    def add(self, ids: torch.Tensor) -> None:
        for i in torch.unique(ids.cpu()).tolist():
            if i not in self.ids:
                self.ids.append(i)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(list(self.ids), dtype=torch.long)


def duplicate_mask(top_idx: torch.Tensor, neg: Negatives) -> torch.Tensor:
    """(B, M) True where a negative is one of the row's own top-k (counted there, not twice)."""
    out = torch.zeros(top_idx.shape[0], len(neg.idx), dtype=torch.bool, device=top_idx.device)
    for j in range(top_idx.shape[1]):  # k small loops of (B, M): avoids a (B, k, M) temporary
        out |= top_idx[:, j:j + 1] == neg.idx[None, :]
    return out


def topk_loss(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_idx: torch.Tensor,
              top_logp: torch.Tensor, tail_logp: torch.Tensor, neg: Negatives, dup: torch.Tensor,
              kind: str = "kl", rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean loss over the batch. z (B, D) student's vocab input; weight (V, D); top_* (B, k).

    rows: (weight[top_idx], weight[neg.idx]) already gathered, when several exits share one
    frozen vocabulary matrix (adapter heads): the gather is then paid once per step.
    """
    w_top, w_neg = rows if rows is not None else (weight[top_idx], weight[neg.idx])
    s_top = torch.bmm(w_top, z.unsqueeze(-1)).squeeze(-1)  # (B, k)
    s_neg = z @ w_neg.T  # (B, M)
    if bias is not None:
        s_top = s_top + bias[top_idx]
        s_neg = s_neg + bias[neg.idx]
    s_neg = (s_neg + neg.logw[None, :]).masked_fill(dup, float("-inf"))
    lse_tail = torch.logsumexp(s_neg, -1)  # (B,) log of the student's mass outside the row's top-k
    log_z = torch.logaddexp(torch.logsumexp(s_top, -1), lse_tail)
    logq_top = s_top - log_z[:, None]
    loss = torch.zeros((), device=z.device)
    if "kl" in kind:
        p_top, p_tail = top_logp.exp(), tail_logp.exp()
        logq_tail = (lse_tail - log_z).clamp_min(-100.0)  # -inf when the top-k is the whole vocabulary
        kl = (p_top * (top_logp - logq_top)).sum(-1) + p_tail * (tail_logp - logq_tail)
        loss = loss + kl.mean()
    if "ce" in kind:
        loss = loss - logq_top[:, 0].mean()  # top_idx[:, 0] is the teacher's argmax
    return loss
