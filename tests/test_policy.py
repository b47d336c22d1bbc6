"""The calibration policy (runtime/policy.py): one place decodes and encodes the stored dict."""

import json

import pytest

from runtime.policy import Policy


def test_old_records_load_with_their_defaults():
    # as lama.json / manifest.json stored them before the dataclass (no margin, no kv_policy)
    assert Policy.from_dict({"kind": "budget", "budget": 0.6, "mu": 0.125}) == Policy(
        "budget", budget=0.6, mu=0.125, margin=0.0, kv_policy="fill")
    assert Policy.from_dict({"kind": "target", "target": 0.95, "delta": None, "margin": None}).margin == 0.0
    p = Policy.from_dict({"kind": "target", "target": 0.9, "delta": 0.1, "margin": 0.03})
    assert (p.target, p.delta, p.margin, p.table_delta) == (0.9, 0.1, 0.03, 0.1)


def test_round_trip_through_json():
    for p in (Policy("target", target=0.95, margin=0.03, delta=0.1),
              Policy("budget", budget=0.5, mu=0.2, margin=0.03, kv_policy="defer")):
        assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_a_table_row_keeps_the_margin_and_only_a_target_policy_keeps_delta():
    budget = Policy("budget", budget=0.5, margin=0.03, kv_policy="defer")
    assert budget.at_target(0.8) == Policy("target", target=0.8, margin=0.03, kv_policy="defer")
    guaranteed = Policy("target", target=0.9, delta=0.1, margin=0.03)
    assert guaranteed.at_target(0.99) == Policy("target", target=0.99, delta=0.1, margin=0.03)


@pytest.mark.parametrize("stored, message", [
    ({"target": 0.9}, "'kind' is missing"),
    ({"kind": "speed", "target": 0.9}, "kind must be one of"),
    ({"kind": "target"}, "needs its target"),
    ({"kind": "budget", "margin": 0.03}, "needs its compute budget"),
    ({"kind": "target", "target": 1.5}, r"target agreement must be in \(0, 1\]"),
    ({"kind": "target", "target": float("nan")}, "target agreement"),
    ({"kind": "target", "target": "0.9"}, "target must be a number"),
    ({"kind": "target", "target": 0.9, "margin": 1.5}, r"margin must be in \[0, 1\)"),
    ({"kind": "target", "target": 0.9, "delta": 0.0}, "delta"),
    ({"kind": "budget", "budget": -1}, "compute budget must be a positive number"),
    ({"kind": "budget", "budget": 0.5, "kv_policy": "keep"}, "kv_policy must be one of"),
    ({"kind": "target", "target": 0.9, "tagret": 0.95}, r"unknown keys \['tagret'\]"),
])
def test_bad_records_are_refused_naming_where(stored, message):
    with pytest.raises(ValueError, match=f"lama.json policy: .*{message}"):
        Policy.from_dict(stored, "lama.json policy")


def test_the_policy_module_is_stdlib_only():
    import ast
    import sys
    from pathlib import Path

    import runtime.policy

    tree = ast.parse(Path(runtime.policy.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
