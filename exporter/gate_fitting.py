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


def refit_gates(bb, heads, cfg: TrainConfig, device, *, feats=None, windows=None):
    """Gates for the exits `heads` kept after pruning, trained as `lama train` trains them (the
    heads stay as they are): the one gate step both pruning paths run. From `feats`, the training
    features when they are still at hand (`lama train`, exits pruned by the recipe), else from
    `windows`, the training windows: only a random draw of whole windows worth `gate_tokens`
    runs through the model, on `device` (`lama calibrate --exit-min-share`, a saved checkpoint)."""
    import dataclasses

    import numpy as np

    if feats is None:
        from .cache import cache_features

        n = max(1, cfg.gate_tokens // windows.ids.shape[1])
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(windows.ids))[:n])
        sub = dataclasses.replace(windows, ids=windows.ids[pick], domain=windows.domain[pick])
        feats = cache_features(bb, sub, list(heads.exits), topk=cfg.topk, keep_final=False, device=device,
                               desc="caching gate training windows")
    return fit_gates(bb, heads, feats, cfg, device)[0]
