"""Per-token exit scores on a calibration set, and what an exit rule does with them.

Threshold calibration (`calibrate.py`) and the budgeted EERO policy (`budget.py`) both
choose one threshold per non-final exit from the same evidence: for every calibration
token, each exit's confidence and whether that exit's top-1 token agrees with the full
model. This module holds that evidence and the one simulation both use, so the two
policies are compared on exactly the same rule the runtime applies:

    a token leaves at the first exit k with confidence[k] >= threshold[k];
    a token that no exit takes runs the whole model.

Work is counted as the runtime counts it (runtime/results.py): layer-positions, one decoder
layer on one position. What an exit saves depends on the KV policy. With `fill` (the policy
that saves work) a token leaving after exit_layers[k] layers costs exit_layers[k]
layer-positions, plus the K/V projections of the skipped layers, which are not layer-positions
and are reported apart. With `defer` every position a token skipped still runs the deeper
layers later (batched with a deeper token), so every token costs all num_layers layer-positions
unless generation ends first: early exits save calls and latency there, not work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KV_POLICIES = ("fill", "defer")
NEVER = float("inf")  # threshold that disables an exit (confidences are finite)


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss, score or threshold: training, gate fitting and calibration stop at
    the first one (naming the exit and the step) rather than write a checkpoint from it."""


@dataclass
class ExitScores:
    """Evidence for choosing thresholds.

    confidence: (N, E) score of each non-final exit for each token; higher = more sure.
    agree:      (N, E) whether that exit's top-1 token equals the full model's.
    sequence:   (N,) index of the text window each token came from; tokens of one
                window are not independent, so guarantee mode (guarantee.py) takes
                windows, not tokens, as its i.i.d. unit.
    exit_layers: E ints, number of decoder layers computed before each exit.
    num_layers: decoder layers in the full model.
    check_cost: cost of one exit check, in decoder layers (head or gate).
    """

    confidence: np.ndarray
    agree: np.ndarray
    sequence: np.ndarray
    exit_layers: list[int]
    num_layers: int
    check_cost: float = 0.0
    domain: np.ndarray | None = None  # (N,) index into `domains` (per-domain reports), optional
    domains: tuple[str, ...] = ()
    # (N,) the full model's own top-1 token at each position, optional: an int8/int4 export
    # compares its quantized model against it instead of running the fp32 model again
    full_top1: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.confidence = np.asarray(self.confidence, dtype=np.float64)
        self.agree = np.asarray(self.agree, dtype=bool)
        self.sequence = np.asarray(self.sequence, dtype=np.int64)
        if self.confidence.shape != self.agree.shape or self.confidence.ndim != 2:
            raise ValueError(
                f"confidence {self.confidence.shape} and agree {self.agree.shape} must both be (tokens, exits)"
            )
        if self.sequence.shape != (self.confidence.shape[0],):
            raise ValueError(f"sequence must have one entry per token, got {self.sequence.shape}")
        if self.domain is not None:
            self.domain = np.asarray(self.domain, dtype=np.int16)
            if self.domain.shape != self.sequence.shape:
                raise ValueError(f"domain must have one entry per token, got {self.domain.shape}")
        if self.full_top1 is not None:
            self.full_top1 = np.asarray(self.full_top1, dtype=np.int64)
            if self.full_top1.shape != self.sequence.shape:
                raise ValueError(f"full_top1 must have one entry per token, got {self.full_top1.shape}")
        if len(self.exit_layers) != self.confidence.shape[1]:
            raise ValueError(f"{len(self.exit_layers)} exit layers for {self.confidence.shape[1]} exits")
        bad = ~np.isfinite(self.confidence)
        if bad.any():
            t, k = np.argwhere(bad)[0]
            raise NonFiniteError(f"exit after layer {self.exit_layers[k]}: confidence {self.confidence[t, k]} for "
                                 f"token {t} (window {self.sequence[t]}); {int(bad[:, k].sum())} of "
                                 f"{self.num_tokens} of its scores are not finite (NaN heads or gates?)")

    @property
    def num_tokens(self) -> int:
        return int(self.confidence.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.confidence.shape[1])

    def layers(self, kv_policy: str = "fill") -> np.ndarray:
        """(E+1,) layer-positions a token leaving at each exit costs (last = full model)."""
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"unknown KV policy {kv_policy!r}; choose one of {KV_POLICIES}")
        if kv_policy == "defer":  # the skipped layers run later anyway
            return np.full(self.num_exits + 1, float(self.num_layers))
        return np.asarray(list(self.exit_layers) + [self.num_layers], dtype=np.float64)

    def costs(self, kv_policy: str = "fill") -> np.ndarray:
        """(E+1,) compute of leaving at each exit (last = full model), as a fraction of the full model.

        Leaving at exit k means computing exit_layers[k] layers (all layers under `defer`) and
        k+1 checks; running the full model means all layers and every check (all of which rejected).
        """
        e = np.arange(1, self.num_exits + 1)
        layers = self.layers(kv_policy)
        checks = np.concatenate([e, [self.num_exits]]).astype(np.float64) * self.check_cost
        return (layers + checks) / self.num_layers

    def save(self, path) -> None:
        np.savez_compressed(path, confidence=self.confidence, agree=self.agree, sequence=self.sequence,
                            exit_layers=np.asarray(self.exit_layers), num_layers=self.num_layers,
                            check_cost=self.check_cost,
                            **({} if self.domain is None else {"domain": self.domain,
                                                               "domains": np.asarray(self.domains, dtype=str)}),
                            **({} if self.full_top1 is None else {"full_top1": self.full_top1}))

    @classmethod
    def load(cls, path) -> "ExitScores":
        with np.load(path) as z:
            return cls(z["confidence"], z["agree"], z["sequence"], [int(x) for x in z["exit_layers"]],
                       int(z["num_layers"]), float(z["check_cost"]),
                       z["domain"] if "domain" in z else None,
                       tuple(str(d) for d in z["domains"]) if "domains" in z else (),
                       z["full_top1"] if "full_top1" in z else None)

    def subset(self, mask: np.ndarray) -> "ExitScores":
        return ExitScores(self.confidence[mask], self.agree[mask], self.sequence[mask],
                          list(self.exit_layers), self.num_layers, self.check_cost,
                          None if self.domain is None else self.domain[mask], self.domains,
                          None if self.full_top1 is None else self.full_top1[mask])

    def domain_mask(self, name: str) -> np.ndarray:
        """(N,) True for the tokens of domain `name`."""
        if self.domain is None or name not in self.domains:
            raise ValueError(f"no domain {name!r} in these scores (domains: {list(self.domains)})")
        return self.domain == self.domains.index(name)


@dataclass(frozen=True)
class Outcome:
    """What a threshold vector does on a set of tokens."""

    exit_index: np.ndarray  # (N,) exit taken per token; E means the full model
    agreement: float  # share of all tokens whose output equals the full model's
    compute: float  # mean compute as a fraction of the full model (costs(kv_policy) weighted)
    layers: float  # mean layer-positions run per token under kv_policy (fill: the exit's depth)
    coverage: np.ndarray  # (E,) share of tokens leaving at each exit
    exit_agreement: np.ndarray  # (E,) agreement among the tokens leaving at each exit (nan if none)


def exit_index(scores: ExitScores, thresholds: np.ndarray | list[float]) -> np.ndarray:
    """(N,) first exit whose confidence reaches its threshold; E where none does."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (scores.num_exits,):
        raise ValueError(f"need {scores.num_exits} thresholds, got {t.shape}")
    passes = scores.confidence >= t[None, :]
    any_pass = passes.any(axis=1)
    first = passes.argmax(axis=1)
    return np.where(any_pass, first, scores.num_exits)


def simulate(scores: ExitScores, thresholds: np.ndarray | list[float], kv_policy: str = "fill") -> Outcome:
    """What the thresholds do, with work counted under `kv_policy` (module doc). Agreement is
    teacher-forced: each token's exit head against the full model on exact hidden states."""
    idx = exit_index(scores, thresholds)
    n, e = scores.num_tokens, scores.num_exits
    agree_full = np.concatenate([scores.agree, np.ones((n, 1), dtype=bool)], axis=1)
    ok = agree_full[np.arange(n), idx]
    layers_per_exit = scores.layers(kv_policy)
    coverage = np.array([(idx == k).mean() for k in range(e)]) if n else np.zeros(e)
    exit_agree = np.array([ok[idx == k].mean() if (idx == k).any() else np.nan for k in range(e)])
    return Outcome(
        exit_index=idx,
        agreement=float(ok.mean()) if n else 1.0,
        compute=float(scores.costs(kv_policy)[idx].mean()) if n else 1.0,
        layers=float(layers_per_exit[idx].mean()) if n else float(scores.num_layers),
        coverage=coverage,
        exit_agreement=exit_agree,
    )


def oracle(scores: ExitScores) -> Outcome:
    """Upper bound: every token leaves at the earliest exit that already agrees."""
    n, e = scores.num_tokens, scores.num_exits
    agree_full = np.concatenate([scores.agree, np.ones((n, 1), dtype=bool)], axis=1)
    idx = agree_full.argmax(axis=1)
    layers_per_exit = np.asarray(list(scores.exit_layers) + [scores.num_layers], dtype=np.float64)
    return Outcome(
        exit_index=idx,
        agreement=1.0,
        compute=float(scores.costs()[idx].mean()) if n else 1.0,
        layers=float(layers_per_exit[idx].mean()) if n else float(scores.num_layers),
        coverage=np.array([(idx == k).mean() for k in range(e)]) if n else np.zeros(e),
        exit_agreement=np.ones(e),
    )
