"""Exit heads: map a mid-network hidden state to next-token logits.

Two kinds, chosen per checkpoint:

* ``adapter`` (default): a low-rank residual ``h + B(A h)`` in front of the model's own,
  frozen final norm and LM head. B starts at zero, so an untrained head is the "logit
  lens" of that layer; training only has to nudge the hidden state toward what the last
  layer would produce. It ships as 2·D·r numbers per exit (SmolLM2, r=32: 37k floats)
  because the device already holds the LM head.
* ``full``: a trainable copy of the final norm and LM head (LAMA v2's heads). More
  capacity, but D·V numbers per exit (SmolLM2: 28M) travel to the device.

Confidence functions live here too: the exporter computes them in PyTorch for
calibration and bakes the same formula into each segment's graph.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

HEAD_KINDS = ("adapter", "full")
CONFIDENCE_KINDS = ("top1", "margin")


class AdapterHead(nn.Module):
    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.normal_(self.down.weight, std=hidden_size ** -0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(hidden))  # (..., D)


class FullHead(nn.Module):
    def __init__(self, final_norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = copy.deepcopy(final_norm)
        self.lm_head = copy.deepcopy(lm_head)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))  # (..., V)


class ExitHeads(nn.Module):
    """All exit heads of one model. `logits(k, h)` gives exit k's next-token logits."""

    def __init__(self, kind: str, exits: list[int], hidden_size: int, final_norm: nn.Module,
                 lm_head: nn.Module, rank: int = 32):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")
        self.kind = kind
        self.exits = list(exits)
        self.rank = rank
        # The frozen model's own finish, shared by adapter heads; kept out of state_dict()
        # so checkpoints hold only what was trained.
        object.__setattr__(self, "_final_norm", final_norm)
        object.__setattr__(self, "_lm_head", lm_head)
        if kind == "adapter":
            self.heads = nn.ModuleList(AdapterHead(hidden_size, rank) for _ in exits)
        else:
            self.heads = nn.ModuleList(FullHead(final_norm, lm_head) for _ in exits)

    def logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.kind == "adapter":
            return self._lm_head(self._final_norm(self.heads[k](hidden)))
        return self.heads[k](hidden)

    # Gate mode splits logits(k, h) in two: the cheap part runs in the segment graph,
    # the vocabulary-sized part only for the token that leaves.
    def head_input(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads[k](hidden) if self.kind == "adapter" else hidden

    def head_output(self, k: int | None, head_input: torch.Tensor) -> torch.Tensor:
        if self.kind == "adapter":
            return self._lm_head(self._final_norm(head_input))
        return self.heads[k](head_input)

    # Top-k distillation needs the vocabulary projection split open, so a step can multiply
    # only the rows it needs (the teacher's top-k and a few negatives) instead of all V.
    def vocab_input(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D): what exit k's vocabulary matrix multiplies (logits = vocab_input @ W.T + b)."""
        if self.kind == "adapter":
            return self._final_norm(self.heads[k](hidden))
        return self.heads[k].norm(hidden)

    def vocab_matrix(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exit k's (V, D) vocabulary weight and (V,) bias or None."""
        lm = self._lm_head if self.kind == "adapter" else self.heads[k].lm_head
        return lm.weight, lm.bias

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def confidence(logits: torch.Tensor, kind: str = "top1") -> tuple[torch.Tensor, torch.Tensor]:
    """(token, score) from logits (..., V): top-1 id and its confidence.

    top1:   the top-1 softmax probability.
    margin: top-1 minus top-2 probability (EERO's score).
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence {kind!r}; choose one of {CONFIDENCE_KINDS}")
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, 2, dim=-1)
    token = top.indices[..., 0]
    score = top.values[..., 0] if kind == "top1" else top.values[..., 0] - top.values[..., 1]
    return token, score
