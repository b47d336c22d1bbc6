"""Online calibration: relaxed mode checks its own exits while it generates.

With the `defer` KV policy a position that left early still runs the deeper layers later (with
the next token that goes deep, or when the deferred positions are flushed), and the last
segment then reports the full model's token there. So the runtime learns, almost for free,
whether each exited token agreed with the full model. Calibration promised agreement `target`
on text like the calibration text; on other text it can fall short (SmolLM2 at target 0.95:
0.86 and 0.77 on two held-out texts unlike every calibration domain). `OnlineCheck` counts,
per exit, the exited tokens checked and those that agreed; once an exit has been checked
`min_checked` times and its running agreement is below `target - tolerance`, its threshold is
tightened to the next stricter row of the export's per-target table (or the exit is switched
off when none is stricter), and its counts restart. Tokens already shown stay shown: the
check bounds the damage from then on, it does not undo it (exact mode does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .manifest import Manifest, from_json_thresholds


@dataclass
class ExitCheck:
    checked: int = 0
    agreed: int = 0
    total_checked: int = 0
    total_agreed: int = 0

    def add(self, agreed: bool) -> None:
        self.checked += 1
        self.agreed += agreed
        self.total_checked += 1
        self.total_agreed += agreed


@dataclass
class OnlineCheck:
    """Per-exit running agreement of exited tokens, and the thresholds it tightened."""

    target: float
    ladder: list[list[float]]  # per exit: stricter thresholds to step to, loosest first (inf last)
    min_checked: int = 16
    tolerance: float = 0.02
    exits: list[ExitCheck] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)  # {"exit", "after_checked", "agreement", "threshold"}

    @classmethod
    def for_manifest(cls, manifest: Manifest, thresholds: list[float], target: float | None = None,
                     min_checked: int = 16, tolerance: float = 0.02) -> "OnlineCheck":
        """Ladders from the export's per-target table: for each exit, the thresholds of every
        stricter row than the one in use, then 'never'."""
        cal = manifest.calibration
        if target is None:
            target = cal.policy.get("target") if isinstance(cal.policy, dict) else None
        target = float(target if target is not None else 0.95)
        if not 0 < target <= 1:
            raise ValueError(f"online check target must be in (0, 1], got {target}")
        if min_checked < 1:
            raise ValueError(f"min_checked must be >= 1, got {min_checked}")
        rows = [from_json_thresholds(v) for _, v in sorted(cal.by_target.items(), key=lambda kv: float(kv[0]))]
        ladder = []
        for j, t in enumerate(thresholds):
            stricter = sorted({r[j] for r in rows if r[j] > t and r[j] != float("inf")})
            ladder.append(stricter + [float("inf")])
        return cls(target, ladder, min_checked, tolerance, [ExitCheck() for _ in thresholds])

    def observe(self, exit_index: int, agreed: bool, thresholds: list[float]) -> None:
        """One exited token checked against the full model; may tighten thresholds[exit_index]."""
        c = self.exits[exit_index]
        c.add(agreed)
        if c.checked >= self.min_checked and c.agreed / c.checked < self.target - self.tolerance:
            steps = [t for t in self.ladder[exit_index] if t > thresholds[exit_index]]
            new = steps[0] if steps else float("inf")
            self.changes.append({"exit": exit_index, "after_checked": c.total_checked,
                                 "agreement": c.agreed / c.checked, "threshold": None if new == float("inf") else new})
            thresholds[exit_index] = new
            c.checked = c.agreed = 0

    def report(self) -> dict:
        return {"target": self.target, "tolerance": self.tolerance, "min_checked": self.min_checked,
                "exits": [{"checked": c.total_checked, "agreed": c.total_agreed,
                           "agreement": c.total_agreed / c.total_checked if c.total_checked else None}
                          for c in self.exits],
                "changes": list(self.changes)}
