"""The gate step of training: draw the gates' tokens, measure where each exit's head agrees
with the full model, train the gates on that (exporter/gates.py's `train_gates`).

`lama train` runs it after the heads (exporter/api.py), and exit pruning runs it again for
the exits it keeps, since a gate's `move` feature reads the previous exit (exporter/placement.py).
It lives apart from both so that neither imports the other, and apart from gates.py because it
scores heads with exporter/train.py, which reaches gates.py through the checkpoint loader.
"""

from __future__ import annotations

from .recipes import TrainConfig


def fit_gates(bb, heads, feats, cfg: TrainConfig, device):
    """(gates | None when the config trains none, the heads' agreement on the gates' tokens):
    gates trained on `cfg.gate_tokens` of the training features, for the heads' exits."""
    from .gates import ExitGates, train_gates
    from .train import exit_scores

    gate_feats = feats.with_tokens(cfg.gate_tokens, seed=cfg.seed)
    agree = exit_scores(bb, heads, gate_feats, device=device).agree
    if not cfg.gates:
        return None, agree
    gates = ExitGates(len(heads.exits), bb.shape.hidden_size, cfg.gate_width, cfg.gate_features,
                      min(cfg.gate_shortlist, bb.shape.vocab_size))
    train_gates(gates, bb, heads, gate_feats, agree, steps=cfg.gate_steps, seed=cfg.seed, device=device)
    return gates, agree
