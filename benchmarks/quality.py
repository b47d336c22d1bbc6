"""Quality of a row, measured two ways: free-running (each continuation's tokens against the
reference row's: position agreement, ROUGE-L) and teacher-forced on the held-out windows
(every exit's head on exact hidden states: agreement with the full model, perplexity of the
distribution an exit policy would use), computed in PyTorch from the checkpoint's heads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def rouge_l(reference: list[int], candidate: list[int]) -> float:
    """ROUGE-L F1: longest common subsequence over tokens, F-measure of its precision and recall."""
    if not reference or not candidate:
        return float(reference == candidate)
    prev = [0] * (len(candidate) + 1)
    for r in reference:  # O(len(ref) * len(cand)) dynamic programme, one row at a time
        cur = [0]
        for j, c in enumerate(candidate):
            cur.append(prev[j] + 1 if r == c else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def position_agreement(reference: list[int], candidate: list[int]) -> float:
    n = max(len(reference), len(candidate))
    return sum(a == b for a, b in zip(reference, candidate)) / n if n else 1.0


@dataclass
class TeacherForced:
    """Per held-out position (the last of each window has no next token and is left out):
    confidence of each exit, top-1 of each exit and the full model, NLL of the true next token."""

    confidence: np.ndarray  # (N, E)
    top1: np.ndarray  # (N, E+1), last column = full model
    nll: np.ndarray  # (N, E+1)
    sequence: np.ndarray  # (N,)
    exit_layers: list[int]
    num_layers: int
    scores_check: dict = field(default_factory=dict)

    def scores(self):
        from exporter.scores import ExitScores

        agree = self.top1[:, :-1] == self.top1[:, -1:]
        return ExitScores(self.confidence, agree, self.sequence, self.exit_layers, self.num_layers)

    def evaluate(self, exit_idx: np.ndarray) -> dict:
        n = len(exit_idx)
        rows = np.arange(n)
        layers = np.asarray(self.exit_layers + [self.num_layers], dtype=np.float64)
        return {"perplexity": float(np.exp(self.nll[rows, exit_idx].mean())),
                "agreement": float((self.top1[rows, exit_idx] == self.top1[:, -1]).mean()),
                "mean_layers": float(layers[exit_idx].mean()), "tokens": int(n)}


def gate_scores(gates, heads, bb, ids, captured: dict, exits: list[int], k: int):
    """(B, S) gate scores of exit k at every position, with the inputs the segment graph gives
    the gate: the exit's state, the previous exit's state (or the embeddings) for 'move', the
    position, and the head's vocabulary input for 'shortlist'."""
    import torch

    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    hidden = captured[exits[k]].reshape(b * s, -1)
    prev = (captured[exits[k - 1]] if k else bb.family.embed(ids, pos)).reshape(b * s, -1)
    z = heads.vocab_input(k, hidden) if "shortlist" in gates.features else None
    return gates.score(k, hidden, prev, pos.reshape(-1), z).reshape(b, s)


def teacher_forced(bb, heads, windows: np.ndarray, confidence_kind: str, gates=None, batch: int = 4
                   ) -> TeacherForced:
    import torch

    from exporter.heads import confidence

    exits = list(heads.exits)
    conf_all, top_all, nll_all = [], [], []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[s:s + batch])  # (B, S)
            captured, full = bb.forward(ids, capture=exits)
            target = ids[:, 1:].unsqueeze(-1)  # (B, S-1, 1)
            confs, tops, nlls = [], [], []
            for k, layer in enumerate(exits + [None]):
                logits = full if layer is None else heads.logits(k, captured[layer])  # (B, S, V)
                tok, c = confidence(logits, "top1" if confidence_kind == "gate" else confidence_kind)
                if layer is not None and gates is not None:
                    c = gate_scores(gates, heads, bb, ids, captured, exits, k)
                logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
                nlls.append(-logp.gather(-1, target).squeeze(-1))
                tops.append(tok)
                if layer is not None:
                    confs.append(c)
            conf_all.append(torch.stack(confs, -1).numpy())  # (B, S, E), every position
            top_all.append(torch.stack(tops, -1).numpy())  # (B, S, E+1)
            nll_all.append(torch.stack(nlls, -1).double().numpy())  # (B, S-1, E+1)
    conf, top, nll = np.concatenate(conf_all), np.concatenate(top_all), np.concatenate(nll_all)
    w, s, e = conf.shape
    seq = np.repeat(np.arange(w), s - 1)
    tf = TeacherForced(conf[:, :-1].reshape(-1, e), top[:, :-1].reshape(-1, e + 1), nll.reshape(-1, e + 1), seq,
                       exits, bb.shape.num_layers)
    tf.scores_check = {"all_positions_confidence": conf.reshape(-1, e),
                       "all_positions_agree": (top[..., :-1] == top[..., -1:]).reshape(-1, e)}
    return tf


def check_against_checkpoint(tf: TeacherForced, heldout) -> dict:
    """Do our held-out windows and head outputs reproduce the checkpoint's heldout_scores.npz?"""
    conf, agree = tf.scores_check.pop("all_positions_confidence"), tf.scores_check.pop("all_positions_agree")
    if conf.shape != heldout.confidence.shape:
        return {"match": False, "reason": f"{conf.shape[0]} held-out positions here, {heldout.num_tokens} in the "
                                          "checkpoint: it was trained on other text or split settings"}
    diff = float(np.abs(conf - heldout.confidence).max())
    agree_same = float((agree == heldout.agree).mean())
    return {"match": bool(diff < 1e-3 and agree_same > 0.999), "max_confidence_diff": diff,
            "agree_equal_share": agree_same}
