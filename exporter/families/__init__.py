"""Family adapters behind one registry: `family_for(model)` picks the adapter for a model.

Adding a family is one module with one `Family` subclass, plus its line in `FAMILIES` (and a
line in tests/test_families.py's conformance suite, which fails for a family without one).
"""

from __future__ import annotations

from torch import nn

from .base import FULL, SLIDING, Family, LayerCache, ModelShape, UnsupportedArchitecture, causal_mask
from .gemma3 import Gemma3Family
from .gpt2 import GPT2Family
from .gpt_neox import GPTNeoXFamily
from .llama import LlamaFamily
from .phi3 import Phi3Family

FAMILIES: tuple[type[Family], ...] = (LlamaFamily, Gemma3Family, Phi3Family, GPTNeoXFamily, GPT2Family)

# rotary variants whose tables depend on the call's sequence length in Python (a traced graph
# would freeze one branch); longrope is handled by Phi3Family itself
UNSUPPORTED_ROPE = ("dynamic",)

__all__ = ["FAMILIES", "FULL", "SLIDING", "Family", "LayerCache", "ModelShape", "UnsupportedArchitecture",
           "causal_mask", "family_for", "supported_model_types", "check_config"]


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def check_config(config, name: str | None = None, where: str = "") -> None:
    """Refuse, with the reason, a config that a registered family cannot export exactly.
    `name` names the model when the config lists no architectures; `where` says where it came from."""
    model_type = getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or [name or str(model_type)])
    if where:
        arch += f" in {where!r}"
    if model_type not in supported_model_types():
        raise UnsupportedArchitecture(f"unsupported architecture {arch} (model_type={model_type!r}); "
                                      f"supported model types: {supported_model_types()}")
    params = getattr(config, "rope_parameters", None) or {}
    for p in (params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]):
        if p.get("rope_type") in UNSUPPORTED_ROPE:
            raise UnsupportedArchitecture(
                f"{arch}: rope_type {p['rope_type']!r} rescales positions by the call's length, which one "
                "exported graph cannot reproduce; supported rope types: default, linear, llama3, yarn, longrope")


def family_for(model: nn.Module) -> Family:
    check_config(model.config, type(model).__name__)
    for fam in FAMILIES:
        if model.config.model_type in fam.model_types:
            return fam(model)
    raise AssertionError("unreachable: check_config accepted an unregistered model type")
