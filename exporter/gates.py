"""Exit gates: decide *whether* to leave for a fraction of a layer's cost.

On small models the exit head is expensive: SmolLM2-135M's LM head (576 x 49152) costs
as much as ~8 of its decoder layers, so a full-vocabulary softmax at every exit can make
early exit slower than no exit. A gate is a tiny MLP on the (normalised) hidden state at
an exit, trained self-supervised to predict whether that exit's head agrees with the full
model. The segment graph outputs only the gate's score; the head runs once, for the token
that actually leaves. Scores are calibrated exactly like head confidences (target,
guarantee, EERO budget), since they are just another per-exit confidence.

Cost per check: D*H + H multiply-adds (D=576, H=32: 18k, ~0.5% of one SmolLM2 layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class Gate(nn.Module):
    def __init__(self, hidden_size: int, width: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # RMS-normalise without weights: hidden-state scale grows with depth, the gate should not care
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc2(F.gelu(self.fc1(x))).squeeze(-1)  # (...,) logit of P(exit head agrees)


class ExitGates(nn.Module):
    def __init__(self, num_exits: int, hidden_size: int, width: int = 32):
        super().__init__()
        self.width = width
        self.gates = nn.ModuleList(Gate(hidden_size, width) for _ in range(num_exits))

    def score(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Estimated probability that exit k's top-1 token agrees with the full model (float32).

        The hidden state is cast to the gate's own dtype: an fp16 export keeps the gates in
        float32 (they are tiny) so the score matches the calibrated one, but a caller that
        casts them anyway still gets a working, if less exact, gate.
        """
        gate = self.gates[k]
        return torch.sigmoid(gate(hidden.to(gate.fc1.weight.dtype))).float()

    def macs(self) -> int:
        return sum(p.numel() for p in self.gates[0].parameters())


def train_gates(gates: ExitGates, hiddens: list[torch.Tensor], agree: torch.Tensor, *, steps: int = 300,
                batch: int = 1024, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Fit each gate to predict agreement (binary cross-entropy) from cached hidden states.

    hiddens: per exit (T, D); agree: (T, E) bool from the trained heads on the same tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=1e-4)
    target = agree.float()
    n = target.shape[0]
    losses = []
    gates.train()
    for _ in tqdm(range(steps), desc="training exit gates", unit="step", leave=False):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        loss = sum(F.binary_cross_entropy_with_logits(gates.gates[k](hiddens[k][idx].float()), target[idx, k])
                   for k in range(len(gates.gates))) / len(gates.gates)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gates.eval()
    for p in gates.parameters():
        p.requires_grad_(False)
    return losses
