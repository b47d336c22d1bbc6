"""Thresholds for a quantized export, calibrated on the quantized model's own outputs.

A token may leave at an exit only when the exit agrees with the model that runs on the
device, and for an int4/int8 export that is the quantized model, not the fp32 one the
checkpoint's stored scores came from. So the export recomputes the calibration and held-out
scores with a fake-quantized copy of the backbone and heads (`quantize.fake_quantize`: the
weights and, at accuracy level 4, the int8 activation rounding of MatMulNBits), on the same
text windows training drew, and calibrates those. It also measures what quantization costs
on its own: the quantized full model's agreement with the fp32 one, teacher-forced on the
held-out windows and in free-running greedy continuations.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.manifest import target_key, to_json_thresholds
from runtime.policy import Policy

from .calibrate import calibrate_thresholds, report
from .checkpoint import Checkpoint, CheckpointConfig, score_kind, scores_file
from .quantize import Scheme, fake_quantize
from .scores import ExitScores
from .train import cache_features, score_split

GREEDY_PROMPTS = 4
PROMPT_TOKENS = 32
NEW_TOKENS = 32


@dataclass
class QuantCalibration:
    thresholds: list[float]  # the policy's thresholds on the quantized scores (inf = never)
    by_target: dict[str, list]  # target key -> thresholds (None = never), with the calibration's delta
    delta: float | None  # the guarantee's delta the table was computed with (None: plain calibration)
    reports: dict  # CalibrationReport dicts by split ("calibration", "heldout")
    record: dict  # for the manifest's quantization record: scores' source, agreement with fp32
    scores: dict[str, ExitScores]  # file name (checkpoint.scores_file) -> quantized scores


def quantized_backbone(bb, checkpoint: Checkpoint, scheme: Scheme):
    """(backbone, heads, gates) with the quantized graphs' numerics; `bb` itself is left untouched."""
    qbb = copy.deepcopy(bb)  # one deepcopy keeps the family adapter pointing at the copied layers
    qbb.model.float()
    n = fake_quantize([qbb.model], scheme)  # decoder layers and the LM head (untied from the embedding)
    heads = checkpoint.heads(qbb)  # adapters sit in front of the quantized LM head
    n += fake_quantize([heads.heads], scheme)
    gates = checkpoint.gates(qbb) if checkpoint.config.confidence == "gate" else None  # stay fp32
    return qbb, heads, gates, n


def policy_thresholds(calib: ExitScores, policy: Policy) -> list[float]:
    """The thresholds `policy` chooses on `calib`: a target's (at target + margin, or with its
    delta's guarantee) or a budget's (EERO). Every per-target table row is
    `policy_thresholds(calib, policy.at_target(t))`, so it keeps the policy's margin and delta."""
    if policy.kind == "budget":
        from .budget import budget_thresholds

        return [float(t) for t in budget_thresholds(calib, policy.budget, kv_policy=policy.kv_policy).thresholds]
    return calibrate_thresholds(calib, policy.target, delta=policy.delta, margin=policy.margin)


UNCALIBRATED = Policy("target", target=0.95)  # a checkpoint without a policy: 0.95, margin 0, no delta


def threshold_table(calib: ExitScores, policy: Policy | None, targets) -> tuple[float | None, dict[str, list]]:
    """(delta, {target key: thresholds (None = never)}) for `targets`: the per-target table an
    export ships, every row `policy_thresholds(calib, policy.at_target(t))`. A guarantee-mode
    policy carries its delta into every row, so switching target on the device keeps the
    guarantee. The one builder of the table, for fp32/fp16 exports (the checkpoint's scores)
    and int8/int4 ones (the quantized model's)."""
    policy = policy or UNCALIBRATED
    return policy.table_delta, {target_key(t): to_json_thresholds(policy_thresholds(calib, policy.at_target(t)))
                                for t in targets}


def fp32_heldout_top1(bb, checkpoint: Checkpoint, windows, exit_layer: int, n: int) -> np.ndarray:
    """The fp32 model's top-1 at each of the `n` held-out positions: stored by `lama train` with the
    checkpoint's held-out scores (the windows are the same: `Checkpoint.splits` checks their hash),
    else, for a checkpoint trained before they were stored, one more fp32 pass over the windows."""
    try:
        stored = checkpoint.scores("heldout", "head").full_top1
    except FileNotFoundError:
        stored = None
    if stored is not None and stored.shape == (n,):
        return stored
    ref = cache_features(bb, windows, [exit_layer], desc="caching fp32 held-out hidden states")
    return ref.teacher_top1(ref.active).astype(np.int64)


@torch.no_grad()
def _greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        past = None
        x, toks = ids, []
        for _ in range(n):
            r = model(input_ids=x, cache=past, use_cache=True)
            past = r.cache
            t = int(r.logits[0, -1].argmax())
            toks.append(t)
            x = torch.tensor([[t]])
        out.append(toks)
    return out


def calibrate_quantized(bb, checkpoint: Checkpoint, scheme: Scheme, targets: tuple[float, ...],
                        data: list[str | Path] | None = None) -> QuantCalibration:
    """Scores, thresholds and reports of the fake-quantized model on the checkpoint's own splits."""
    config = checkpoint.config
    try:
        splits = checkpoint.splits(bb.tokenizer, data)  # the same domains, the same windows as api.train
    except ValueError as e:
        raise ValueError(f"{e}: quantized scores cannot be recomputed") from None
    qbb, heads, gates, n_weights = quantized_backbone(bb, checkpoint, scheme)
    exits = list(config.exits)
    kind = score_kind(config.confidence)
    scores: dict[str, ExitScores] = {}
    tf = {}
    for split, name in (("calib", "calibration"), ("heldout", "heldout")):
        feats = cache_features(qbb, splits[split], exits, desc=f"caching quantized {split} hidden states")
        scores.update(score_split(qbb, heads, gates, feats, name, config.head_confidence, "cpu"))
        if split == "heldout":  # the quantized full model against the fp32 one, same positions
            q_top = feats.teacher_top1(feats.active).astype(np.int64)  # each model's own top-1
            f_top = fp32_heldout_top1(bb, checkpoint, splits[split], exits[0], len(q_top))
            tf = {"teacher_forced_agreement_vs_fp32": float((q_top == f_top).mean()),
                  "teacher_forced_tokens": int(q_top.size)}
    calib, held = scores[scores_file("calibration", kind)], scores[scores_file("heldout", kind)]
    policy = config.policy or UNCALIBRATED
    thresholds = policy_thresholds(calib, policy)
    target = policy.target
    delta, by_target = threshold_table(calib, policy, targets)
    reports = {"calibration": report(calib, thresholds, "calibration", target, delta).to_dict(),
               "heldout": report(held, thresholds, "heldout", target, delta).to_dict()}
    windows = splits["heldout"].ids
    rows = np.linspace(0, len(windows) - 1, num=min(GREEDY_PROMPTS, len(windows))).round().astype(int)
    plen = min(PROMPT_TOKENS, windows.shape[1] - 1)
    prompts = [windows[i, :plen].tolist() for i in rows]
    new = min(NEW_TOKENS, bb.shape.max_context - plen)
    q_gen, f_gen = _greedy(qbb.model, prompts, new), _greedy(bb.model, prompts, new)
    greedy = float(np.mean([np.mean([a == b for a, b in zip(q, f)]) for q, f in zip(q_gen, f_gen)]))
    record = {
        "scores": "fake-quantized PyTorch model: MatMulNBits' dequantized weights"
                  + (" and int8 activation blocks" if scheme.accuracy_level == 4 else "")
                  + ", on the checkpoint's calibration / held-out windows",
        "fake_quantized_weights": n_weights,
        "calibration_tokens": calib.num_tokens, "heldout_tokens": held.num_tokens,
        **tf,
        "greedy_agreement_vs_fp32": greedy, "greedy_prompts": len(prompts), "greedy_new_tokens": new,
        "fp32_thresholds": list(config.thresholds),
        "thresholds": to_json_thresholds(thresholds),
        "exit_agreement_heldout_mean": [float(x) for x in held.agree.mean(axis=0).round(4)],
    }
    del qbb, heads, gates
    return QuantCalibration(thresholds, by_target, delta, reports, record, scores)


def replace_thresholds(config: CheckpointConfig, qc: QuantCalibration) -> CheckpointConfig:
    """A copy of `config` whose thresholds and reports are the quantized ones."""
    return dataclasses.replace(config, thresholds=to_json_thresholds(qc.thresholds),
                               calibration=qc.reports)
