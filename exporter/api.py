"""The Python API behind the CLI: train, calibrate (target or budget), export.

    from exporter import api
    ckpt = api.train("smollm2-135m", out="runs/smollm2")       # heads + calibration scores
    api.calibrate(ckpt, target=0.95, delta=0.1)                  # thresholds with a guarantee
    api.calibrate(ckpt, budget=0.5)                              # or: EERO, half the compute
    api.export(ckpt, out="runs/smollm2-onnx")                    # per-segment graphs + manifest
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .calibrate import CalibrationReport, calibrate_thresholds, check_target, report
from runtime.manifest import from_json_thresholds, to_json_thresholds
from runtime.policy import Policy

from .checkpoint import Checkpoint, CheckpointConfig, check_replaceable, save_checkpoint, score_kind, scores_file
from .scores import KV_POLICIES, ExitScores, simulate
from .recipes import Recipe, TrainConfig, load_recipe, recipe_for_model


def resolve_recipe(model: str) -> Recipe:
    """A recipe name (models/*.json), a recipe file, or a model id / folder with defaults."""
    try:
        return load_recipe(model)
    except FileNotFoundError:
        return recipe_for_model(model)


def train(model: str | Recipe, *, out: str | Path, data: list[str | Path] | None = None,
          exits: list[int] | str | None = None, head: str | None = None, backbone=None, target: float | None = None,
          cache_dir: str | Path | None = None, keep_cache: bool = False, overwrite: bool = False,
          **train_overrides) -> Path:
    """Train exit heads on the frozen model's own predictions, then calibrate at the recipe's target.

    `backbone` lets callers pass an already loaded model (tests use tiny random ones).
    The frozen model's outputs are cached in `cache_dir` (default: a folder beside `out`,
    removed at the end unless keep_cache); a cache with matching contents is reused.
    An existing `out` is replaced only if it is a LAMA checkpoint or empty, unless `overwrite`.
    """
    import shutil

    import numpy as np
    import torch

    from .backbone import load_backbone
    from .cache import cache_features
    from .ngram import table_from_features
    from .data import default_data_dir, make_splits, read_docs, window_hashes
    from .train import check_exits, default_exits, resolve_device, score_split

    recipe = model if isinstance(model, Recipe) else resolve_recipe(model)
    cfg = dataclasses.replace(recipe.train, **{k: v for k, v in train_overrides.items() if v is not None})
    if head is not None:
        cfg = dataclasses.replace(cfg, head=head)
    target = recipe.target if target is None else target
    # the recipe's confidence picks the score the thresholds apply to; head scores are always kept
    head_conf = "top1" if recipe.confidence == "gate" else recipe.confidence
    if recipe.confidence == "gate" and not cfg.gates:  # before any training time is spent
        raise ValueError("the recipe asks for confidence 'gate' but gate training is off (gates=false)")
    check_target(target)
    check_replaceable(out, overwrite)  # before any training time is spent; save_checkpoint checks again
    device = resolve_device(cfg.device)
    data = list(data or [default_data_dir()])
    docs = read_docs(data)
    torch.manual_seed(cfg.seed)
    bb = backbone or load_backbone(recipe.source)
    n_layers = bb.shape.num_layers
    min_share = recipe.exit_min_share
    if exits in ("auto", ["auto"]):  # candidates at every other layer; the data picks (placement.py)
        exits, min_share = default_exits(n_layers, 2), min_share or 0.01
    exits = check_exits(exits or recipe.exits or default_exits(n_layers, recipe.exit_every), n_layers)
    candidates = list(exits)
    splits = make_splits(docs, bb.tokenizer, cfg.seq_len,
                         {"train": cfg.train_tokens, "calib": cfg.calib_tokens, "heldout": cfg.heldout_tokens},
                         seed=cfg.seed)
    out = Path(out)
    cache_root = Path(cache_dir) if cache_dir else out.parent / f".{out.name}.cache"
    t0 = time.perf_counter()
    feats = cache_features(bb, splits["train"], exits, topk=cfg.topk, folder=cache_root / "train", dtype="float16",
                           keep_final=cfg.targets == "full", device=device, desc="caching train hidden states")
    cache_s = time.perf_counter() - t0
    heads, gates, rep, before, after = fit(bb, exits, feats, cfg, device)
    ngram = table_from_features(feats)  # exact decoding's draft table: the model's own top-1 after each context
    split_feats = {name: cache_features(bb, splits[split], exits, topk=cfg.topk, folder=cache_root / split,
                                        dtype="float32", keep_final=False, device=device,
                                        desc=f"caching {split} hidden states")
                   for split, name in (("calib", "calibration"), ("heldout", "heldout"))}
    keep = list(range(len(exits)))  # indices of the exits that stay (all, unless pruned below)

    def scored(name: str) -> dict[str, ExitScores]:
        return score_split(bb, heads, gates, split_feats[name].with_exits(keep), name, head_conf, device)

    kind = score_kind(recipe.confidence)
    scores: dict[str, ExitScores] = scored("calibration")
    if min_share > 0:  # pruning reads the calibration scores only: held-out is scored once, below
        from .gate_fitting import refit_gates
        from .placement import keep_heads, prune_exits

        pruned = prune_exits(scores[scores_file("calibration", kind)], target, min_share, recipe.margin)
        if len(pruned) < len(exits):
            keep = pruned
            keep_heads(heads, keep)
            exits = [exits[i] for i in keep]
            if gates is not None:  # a gate's 'move' feature reads the previous exit, which pruning changes
                gates = refit_gates(bb, heads, cfg, device, feats=feats.with_exits(keep))
            scores = scored("calibration")
    scores.update(scored("heldout"))
    del feats, split_feats
    if not keep_cache and not cache_dir:
        shutil.rmtree(cache_root, ignore_errors=True)
    calib, held = scores[scores_file("calibration", kind)], scores[scores_file("heldout", kind)]
    thresholds = calibrate_thresholds(calib, target, margin=recipe.margin)
    config = CheckpointConfig(
        source=recipe.source, exits=exits, num_layers=n_layers, head=cfg.head, rank=cfg.rank,
        confidence=recipe.confidence, head_confidence=head_conf,
        gate_width=cfg.gate_width if gates is not None else None,
        gate_features=list(gates.features) if gates is not None else ["hidden"],
        gate_shortlist=gates.n_short if gates is not None else 0,
        thresholds=to_json_thresholds(thresholds),
        policy=Policy("target", target=target, margin=recipe.margin),
        calibration=_reports(calib, held, thresholds, target, None),
        train={"config": dataclasses.asdict(cfg), "report": dataclasses.asdict(rep),
               "data": [str(Path(p).resolve()) for p in data],  # to redraw the splits (Checkpoint.splits)
               "windows_sha256": window_hashes(splits),  # ... and to check they are the same windows
               "feature_cache_seconds": cache_s, "device": str(device),
               "domains": list(splits["train"].domains), "candidate_exits": candidates,
               "exit_min_share": min_share,
               "agreement_before": np.round(before, 4).tolist(), "agreement_after": np.round(after, 4).tolist()},
    )
    return save_checkpoint(out, config, heads, scores, gates, overwrite=overwrite, ngram=ngram)


def fit(bb, exits: list[int], feats, cfg: TrainConfig, device):
    """Heads (and gates) trained on cached features: (heads, gates | None, TrainReport,
    agreement before, agreement after) with agreements measured on 1024 training tokens."""
    from .gate_fitting import fit_gates
    from .heads import ExitHeads
    from .train import exit_scores, train_heads

    heads = ExitHeads(cfg.head, exits, bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=cfg.rank)
    # agreement on a random subset of the training tokens: the gates learn from it, and it shows progress
    gate_feats = feats.with_tokens(cfg.gate_tokens, seed=cfg.seed)
    probe = dataclasses.replace(gate_feats, rows=gate_feats.rows[:1024])  # a diagnostic: keep it cheap
    before = exit_scores(bb, heads, probe, device=device).agree.mean(axis=0)
    rep = train_heads(bb, heads, feats, cfg, device=device)
    gates, agree = fit_gates(bb, heads, feats, cfg, device)
    after = agree[:len(probe.rows)].mean(axis=0)
    return heads, gates, rep, before, after


def _reports(calib, heldout, thresholds, target, delta) -> dict:
    out = {"calibration": report(calib, thresholds, "calibration", target, delta).to_dict()}
    if heldout is not None:
        out["heldout"] = report(heldout, thresholds, "heldout", target, delta).to_dict()
    return out


def calibrate(checkpoint: str | Path, *, target: float | None = None, delta: float | None = None,
              budget: float | None = None, confidence: str | None = None,
              margin: float | None = None, exit_min_share: float | None = None,
              kv_policy: str | None = None, min_agreement: float = 0.5,
              backbone=None) -> dict[str, CalibrationReport]:
    """Choose new thresholds from the stored scores: an agreement target (optionally with a
    statistical guarantee) or an EERO compute budget. `confidence` switches the score the
    thresholds apply to ("gate" for the trained gates, or the head's "top1"/"margin" kind
    it was trained with). `margin`: calibrate at target + margin (default: the checkpoint's).
    `exit_min_share`: first drop the exits that would send out less than this share of the
    calibration tokens at the target (exporter/placement.py; rewrites heads, gates and scores).

    `kv_policy`: the KV policy the work is counted (and a budget fitted) for; default `fill` for a
    budget (the policy under which exits save work) and `defer` (the runtime's default, where the
    work stays at the full model's) for a target. Budget (exporter/budget.py): a share of the
    chain without early exits, checks included; 1 or more turns the exits off (the full model's
    output); below the cheapest policy it is refused naming the feasible range, and so is one
    whose held-out agreement (teacher-forced, stored scores; calibration if there are no held-out
    ones) falls below `min_agreement` (0 accepts any). Without `confidence`, a budget takes the
    cheaper check: the gate when the head's check (its LM head) costs half a layer or more."""
    if (target is None) == (budget is None):
        raise ValueError("give exactly one of target (agreement, e.g. 0.95) or budget (compute share, e.g. 0.5)")
    if not (isinstance(min_agreement, (int, float)) and 0.0 <= min_agreement <= 1.0):
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement!r}")
    kv_policy = kv_policy or ("fill" if budget is not None else "defer")
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
    ckpt = Checkpoint.open(checkpoint)
    config = ckpt.config
    if margin is None:  # the checkpoint's, kept across budget calibrations (runtime/policy.py)
        margin = config.policy.margin if config.policy else 0.0
    if exit_min_share:
        if target is None:
            raise ValueError("exit_min_share prunes exits at an agreement target: give target, not budget")
        if confidence is not None and confidence != config.confidence:
            raise ValueError("prune with the checkpoint's own confidence, then switch it in a second call")
        from .placement import prune_checkpoint

        ckpt, _ = prune_checkpoint(ckpt, exit_min_share, target, margin, backbone)
        config = ckpt.config
    notes: list[str] = []
    if confidence is None and budget is not None:
        confidence, why = _cheaper_check(ckpt)
        if why:
            notes.append(why)
    if confidence is not None:
        if score_kind(confidence) == "head" and confidence != config.head_confidence:
            raise ValueError(f"the stored head scores use confidence {config.head_confidence!r}; "
                             f"choose it or 'gate' (or retrain with confidence {confidence!r})")
        config.confidence = confidence
    calib = ckpt.scores("calibration")
    try:
        heldout = ckpt.scores("heldout")
    except FileNotFoundError:
        heldout = None
    if budget is not None:
        from .budget import budget_for_agreement, budget_thresholds

        result = budget_thresholds(calib, budget, kv_policy=kv_policy)  # refuses one below the range
        thresholds = [float(t) for t in result.thresholds]
        check, split = (calib, "calibration") if heldout is None else (heldout, "held-out")
        agreement = simulate(check, thresholds, kv_policy).agreement
        if agreement < min_agreement:
            need = budget_for_agreement(calib, min_agreement, heldout=heldout, kv_policy=kv_policy, below=budget)
            raise ValueError(f"budget {budget:g} would give {split} agreement {agreement:.3f} with the full model "
                             f"(teacher-forced, from the stored scores), below the floor {min_agreement:g} "
                             f"(min_agreement / --min-agreement; 0 accepts it); a budget of about {need:.3f} or "
                             f"more keeps it; {result.range.describe()}")
        notes.append(result.range.describe())
        if result.origin == "never":
            notes.append(f"budget {budget:g} covers the chain without early exits: every exit is off (the full "
                         "model's output)")
        if kv_policy == "fill":
            notes.append("fitted for the fill KV policy: run it with kv_policy='fill' (lama generate --kv-policy "
                         "fill); under the runtime's default, defer, the skipped layers run later and this budget "
                         "saves calls and latency, not work")
        config.policy = Policy("budget", budget=budget, mu=float(result.mu), margin=margin, kv_policy=kv_policy)
    else:
        thresholds = calibrate_thresholds(calib, target, delta=delta, margin=margin)
        config.policy = Policy("target", target=target, delta=delta, margin=margin, kv_policy=kv_policy)
    config.thresholds = to_json_thresholds(thresholds)
    config.calibration = {"calibration": report(calib, thresholds, "calibration", target, delta, kv_policy)}
    config.calibration["calibration"].notes = notes
    if heldout is not None:
        config.calibration["heldout"] = report(heldout, thresholds, "heldout", target, delta, kv_policy)
    for r in config.calibration.values():
        r.budget = budget
    config.calibration = {k: r.to_dict() for k, r in config.calibration.items()}
    _rewrite_config(ckpt.path, config)
    return {k: CalibrationReport(**{**v, "exits": [_exit_report(e) for e in v["exits"]]})
            for k, v in config.calibration.items()}


def _cheaper_check(ckpt: Checkpoint) -> tuple[str | None, str]:
    """(confidence, why) for a budget calibration that names none: the gate when the checkpoint
    has gates and its head check costs half a layer or more (its LM head: tiny models, large
    vocabularies), else the checkpoint's own (None). One check for every exit: an export gates
    all its exits or none."""
    config = ckpt.config
    if config.confidence == "gate" or not config.gate_width:
        return None, ""
    try:
        head, gate = ckpt.scores("calibration", "head"), ckpt.scores("calibration", "gate")
    except FileNotFoundError:
        return None, ""
    if head.check_cost >= 0.5 and gate.check_cost < head.check_cost:
        return "gate", (f"check: the gate ({gate.check_cost:.3g} layers per exit) instead of the head's "
                        f"{config.head_confidence} ({head.check_cost:.3g} layers: its LM head costs most of a layer)")
    return None, ""


def _exit_report(e: dict):
    from .calibrate import ExitReport

    return ExitReport(**{**e, "threshold": from_json_thresholds([e["threshold"]])[0]})


def _rewrite_config(checkpoint: Path, config: CheckpointConfig) -> None:
    """Only lama.json changes; write it atomically beside the untouched weights."""
    from .checkpoint import CONFIG

    tmp = checkpoint / (CONFIG + ".tmp")
    tmp.write_text(config.to_json())
    tmp.replace(checkpoint / CONFIG)



def export(checkpoint: str | Path | Checkpoint, *, out: str | Path, precision: str = "fp32", backend: str = "onnx",
           with_logits: bool = False, workspace_gb: float = 2.0, kv: str | None = None,
           kv_capacity: int | None = None, backbone=None, data: list | None = None,
           quant_options: dict | None = None, max_pending: int | None = None, exits: bool = True) -> Path:
    """Split the checkpoint into per-segment graphs (+ TensorRT engines) with a manifest.

    exits=False: the plain model as one graph, no exits (the baseline a chain is measured
    against; exact decoding then drafts from the prompt alone).
    kv: "concat" (past in, past+new out) or "buffer" (GroupQueryAttention on preallocated
    buffers updated in place; kv_capacity positions, default the model's context); None
    picks the default for the backend.
    precision "int8"/"int4": weight-only MatMulNBits graphs (exporter/quantize.py) whose
    thresholds are recalibrated on the quantized model's own scores (exporter/quant_calibrate.py),
    drawn from `data` (default: the text training used, checked against the windows' recorded
    hash: Checkpoint.splits); `quant_options` overrides the scheme's
    block_size, symmetric, accuracy_level. max_pending: the runtime's deferral bound to size
    decode profiles for (dim `decode_sequence`)."""
    from .onnx_export import export as _export

    return _export(checkpoint, out, precision=precision, backend=backend, with_logits=with_logits,
                   workspace_gb=workspace_gb, kv=kv, kv_capacity=kv_capacity, backbone=backbone, data=data,
                   quant_options=quant_options, max_pending=max_pending, exits=exits)
