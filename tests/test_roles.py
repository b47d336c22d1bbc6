"""Tensor roles are defined once (runtime/roles.py) and spelled nowhere else.

The exporter writes every tensor's role into the manifest and the runtime looks every tensor
up by it; a role string typed twice is a contract that can drift. Two checks:

- no string constant equal to a role appears in exporter/, runtime/ or lama/ code outside
  runtime/roles.py (docstrings and comments are not code; the few places where one of these
  words means something else, e.g. the gate feature "hidden", are listed with their reason);
- a fresh export's manifest uses only known roles, and between a gate-mode buffer-layout export
  with full logits and a plain concat one, every known role.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime import roles

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("exporter", "runtime", "lama")

# (file, string): the word is not a tensor role there
NOT_ROLES = {
    ("exporter/gates.py", "hidden"): "gate feature (gates.FEATURES)",
    ("exporter/api.py", "hidden"): "gate feature",
    ("exporter/checkpoint.py", "hidden"): "gate feature",
    ("exporter/recipes.py", "hidden"): "gate feature",
    ("exporter/cache.py", "hidden"): "cache metadata key (hidden size)",
    ("exporter/cache.py", "token"): "cached array name",
    ("exporter/scores.py", "confidence"): "stored score array name",
    ("exporter/data.py", "input_ids"): "the transformers tokenizer's output key",
    ("runtime/results.py", "token"): "TokenRecord.to_dict key",
    ("runtime/results.py", "confidence"): "TokenRecord.to_dict key",
    ("runtime/inspect_export.py", "confidence"): "`lama inspect` dict key (the exit's confidence kind)",
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are bare string statements (docstrings and the like)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def role_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in roles.ALL
            and id(n) not in skip]


def test_role_strings_are_spelled_only_in_the_roles_module():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "runtime/roles.py":
                continue
            found += [f"{rel}:{line}: {value!r}" for line, value in role_literals(path)
                      if (rel, value) not in NOT_ROLES]
    assert not found, ("tensor role strings outside runtime/roles.py (use the constant, e.g. roles.HIDDEN_OUT):\n"
                       + "\n".join(found))


def test_the_scan_sees_a_role_in_code_but_not_in_a_docstring(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Reads hidden_out."""\ndef g(seg):\n    """The "token"."""\n    return seg.name("hidden_out")\n')
    assert role_literals(f) == [(4, "hidden_out")]


def test_the_exemptions_are_still_needed():
    """An exemption whose file no longer holds the word is stale: drop it."""
    for rel, value in NOT_ROLES:
        assert any(v == value for _, v in role_literals(ROOT / rel)), (rel, value)


def test_per_layer_roles_are_known():
    assert set(roles.PER_LAYER) <= roles.ALL and roles.layer_name(roles.PAST_KEY, 3) == "past_key.3"


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory):
    from conftest import make_checkpoint

    from exporter import api

    out = []
    for name, kw, ck in (("gated", {"kv": "buffer", "kv_capacity": 64, "with_logits": True}, {"gates": True}),
                         ("plain", {"kv": "concat"}, {})):
        d = tmp_path_factory.mktemp(name)
        ckpt, bb = make_checkpoint(d, "llama_hd16", **ck)
        out.append(api.export(ckpt, out=d / "onnx", backbone=bb, **kw))
    return out


def _manifest_roles(folder: Path) -> set[str]:
    from runtime.manifest import Manifest

    m = Manifest.load(folder)
    graphs = [*m.segments, *m.heads, *(s.kv_fill for s in m.segments if s.kv_fill)]
    return {t.role for g in graphs for t in (*g.inputs, *g.outputs)}


def test_a_fresh_export_uses_known_roles_and_every_role_is_written(two_exports):
    used = [_manifest_roles(f) for f in two_exports]
    for folder, r in zip(two_exports, used):
        assert r <= roles.ALL, (folder, sorted(r - roles.ALL))
    assert set().union(*used) == roles.ALL, sorted(roles.ALL - set().union(*used))
