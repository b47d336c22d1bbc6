"""Reference scores for gate_features.py: is the gate the limit, or what the heads know?

A gate that sends few tokens out at 95% precision may be a weak gate, or the heads may
simply not know, on most tokens, whether they agree with the full model. These reference
scores tell the two apart. None of them is in the exported graph; each is scored on the same
held-out tokens as the gates:

* ``head softmax``: the exit head's own top-1 probability over the whole vocabulary (CALM's
  classic signal; a vocabulary-sized product at every check, ~8 decoder layers on SmolLM2);
* ``gate + consistency``: the trained gate's logit with "the shortlist's top-1 equals the
  previous exit's shortlist top-1" (PABEE's patience signal at shortlist cost), combined by
  a logistic fit on the calibration tokens;
* ``head softmax + consistency``: the head's top-1 and top-1 minus top-2 probabilities,
  whether its full-vocabulary top-1 equals the previous exit's, and for how many exits in a
  row it has, by a logistic fit on the calibration tokens: what the expensive signals
  together can vouch for.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def top_words(heads, features, shortlist: torch.Tensor, *, chunk: int = 2048) -> dict:
    """Per exit and cached token, from one product with the whole vocabulary: the head's top-1 id
    and its top-1 and top-2 probabilities, and the top-1 id within the `shortlist` words."""
    n, e = features.num_tokens, len(heads.exits)
    top1, short1 = np.zeros((n, e), dtype=np.int64), np.zeros((n, e), dtype=np.int64)
    p = np.zeros((n, e, 2), dtype=np.float32)
    rows = features.active
    for k in range(e):
        w, b = heads.vocab_matrix(k)
        for s in range(0, n, chunk):
            logits = heads.vocab_input(k, features.hidden(k, rows[s:s + chunk])) @ w.T
            if b is not None:
                logits = logits + b
            short1[s:s + chunk, k] = shortlist[logits[:, shortlist].argmax(-1)].numpy()
            top = torch.softmax(logits.float(), -1).topk(2, -1)
            top1[s:s + chunk, k] = top.indices[:, 0].numpy()
            p[s:s + chunk, k] = top.values.numpy()
    return {"top1": top1, "p": p, "shortlist_top1": short1}


def consistency(top1: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(same as the previous exit, exits in a row that agree with this one's top-1) for exit k."""
    run, streak = np.ones(len(top1), dtype=bool), np.zeros(len(top1))
    for j in range(k - 1, -1, -1):
        run &= top1[:, j] == top1[:, k]
        streak += run
    return (streak > 0).astype(np.float64), streak


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def logistic_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray) -> np.ndarray:
    """Fit a logistic regression on (x_fit, y_fit) (standardised features, L-BFGS) and score x_eval."""
    from scipy.optimize import minimize

    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-9
    z = np.c_[(x_fit - mean) / std, np.ones(len(x_fit))]
    y = np.asarray(y_fit, dtype=np.float64)

    def loss(w):
        t = z @ w
        return (np.logaddexp(0, t) - y * t).mean(), z.T @ (1 / (1 + np.exp(-t)) - y) / len(y)

    w = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return np.c_[(x_eval - mean) / std, np.ones(len(x_eval))] @ w


def gate_consistency(gate_cal, gate_held, short_cal, short_held, agree_cal) -> np.ndarray:
    """(N_held, E) scores: gate logit, shortlist consistency and their product, fitted per exit."""
    out = np.zeros(gate_held.shape)
    for k in range(gate_held.shape[1]):
        def x(g, top1):
            same, _ = consistency(top1, k)
            return np.c_[_logit(g[:, k]), same, same * _logit(g[:, k])]
        out[:, k] = logistic_scores(x(gate_cal, short_cal), agree_cal[:, k], x(gate_held, short_held))
    return out


def softmax_consistency(words_cal: dict, words_held: dict, agree_cal) -> np.ndarray:
    """(N_held, E) scores from the full-vocabulary head: probabilities, consistency, streak."""
    out = np.zeros(words_held["top1"].shape)
    for k in range(out.shape[1]):
        def x(words):
            p1, p2 = words["p"][:, k, 0].astype(np.float64), words["p"][:, k, 1].astype(np.float64)
            same, streak = consistency(words["top1"], k)
            return np.c_[np.log(p1), np.log(p1 - p2 + 1e-6), same, streak, same * np.log(p1)]
        out[:, k] = logistic_scores(x(words_cal), agree_cal[:, k], x(words_held))
    return out
