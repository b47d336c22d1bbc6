"""How an export's thresholds were chosen: the calibration policy, decoded in one place.

Standard library only, so the runtime can read it as well as the exporter. A checkpoint's
lama.json and a manifest's `calibration.policy` store it as a dict; `Policy.from_dict` is
the only reader of that dict and `Policy.to_dict` the only writer:

    {"kind": "target", "target": 0.95, "delta": null, "margin": 0.03, ...}   agreement target
    {"kind": "budget", "budget": 0.5, "mu": 0.12, "margin": 0.03, ...}       EERO compute budget

The margin belongs to the checkpoint, not to one calibration: a budget calibration keeps it,
so the next target calibration and an export's per-target table (`at_target`) fit at
target + margin as before. Dicts written before a key existed still load (margin 0.0, the
`fill` KV policy every figure was counted under then).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("target", "budget")
KV_POLICIES = ("fill", "defer")  # as exporter/scores.py counts work and the runtime runs
DEFAULT_KV_POLICY = "fill"  # what exporter/scores.py counts by default, and what older records mean


@dataclass(frozen=True)
class Policy:
    """kind "target": thresholds reach agreement `target` with the full model, fitted at
    target + `margin` (or, with `delta`, guaranteed with probability >= 1 - delta); kind
    "budget": EERO thresholds within `budget` (share of the full model's compute; `mu` is
    its Lagrange multiplier), the checkpoint's `margin` kept for later target calibrations.
    `kv_policy`: the KV policy the compute figures (and a budget's cost model) were counted for."""

    kind: str
    target: float | None = None
    budget: float | None = None
    margin: float = 0.0
    delta: float | None = None
    mu: float | None = None
    kv_policy: str = DEFAULT_KV_POLICY

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"calibration policy kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "target" and self.target is None:
            raise ValueError("a 'target' calibration policy needs its target agreement")
        if self.kind == "budget" and self.budget is None:
            raise ValueError("a 'budget' calibration policy needs its compute budget")
        if self.target is not None and not (_number(self.target, "target") and 0.0 < self.target <= 1.0):
            raise ValueError(f"target agreement must be in (0, 1], got {self.target}")
        if self.budget is not None and not (_number(self.budget, "budget") and 0.0 < self.budget < math.inf):
            raise ValueError(f"compute budget must be a positive number, got {self.budget}")
        if not (_number(self.margin, "margin") and 0.0 <= self.margin < 1.0):
            raise ValueError(f"calibration margin must be in [0, 1), got {self.margin}")
        if self.delta is not None and not (_number(self.delta, "delta") and 0.0 < self.delta < 1.0):
            raise ValueError(f"delta (the guarantee's failure probability) must be in (0, 1), got {self.delta}")
        if self.mu is not None and not (_number(self.mu, "mu") and math.isfinite(self.mu)):
            raise ValueError(f"the budget's multiplier mu must be a finite number, got {self.mu}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {self.kv_policy!r}")

    @property
    def table_delta(self) -> float | None:
        """The delta every per-target row is chosen with: a guarantee calibration's, else None."""
        return self.delta if self.kind == "target" else None

    def at_target(self, target: float) -> "Policy":
        """The target policy of one row of an export's per-target table: this policy's margin,
        its guarantee's delta (target policies only) and its KV policy, at `target`."""
        return Policy("target", target=target, margin=self.margin, delta=self.table_delta, kv_policy=self.kv_policy)

    def kv_warning(self, kv_policy: str) -> str | None:
        """What to tell a user who runs a budget's thresholds under another KV policy than the one
        they were fitted for (None when they match, or for a target policy, whose thresholds do not
        depend on it). The runtime's default is defer; budgets are fitted for fill by default."""
        if self.kind != "budget" or kv_policy == self.kv_policy:
            return None
        if self.kv_policy == "fill":
            return (f"these thresholds hold a compute budget of {self.budget:g} counted for the fill KV policy, but "
                    f"they run under {kv_policy}: the skipped layers run later, so the work stays at the full "
                    "model's (exits save calls and latency only); load with kv_policy='fill' to save the work")
        return (f"these thresholds hold a compute budget of {self.budget:g} counted for the {self.kv_policy} KV "
                f"policy, but they run under {kv_policy}: their work differs from what was budgeted")

    def to_dict(self) -> dict:
        """The stored form (lama.json, manifest.json); `from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration policy") -> "Policy":
        """A stored policy; keys missing from older records take their defaults (margin 0.0,
        kv_policy "fill"). Unknown keys or bad values are refused, naming `where`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; a policy has {sorted(known)}")
        if "kind" not in d:
            raise ValueError(f"{where}: 'kind' is missing (one of {KINDS})")
        values = {k: v for k, v in d.items() if v is not None or k in ("target", "budget", "delta", "mu")}
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def _number(x, name: str) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a number, got {x!r}")
    return not math.isnan(x)
