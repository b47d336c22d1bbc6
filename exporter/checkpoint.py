"""The early-exit checkpoint: trained heads + everything needed to rebuild and calibrate them.

A folder:
    lama.json                 format, version, base model source, exits, head kind, thresholds,
                              calibration reports, training report
    heads.safetensors         only the trained head weights (the backbone stays where it came from)
    gates.safetensors         exit gates, if trained
    ngram.npz                 the n-gram draft table for exact decoding (exporter/ngram.py)
    calibration_scores.npz    per-token exit confidences/agreement on calibration text
    heldout_scores.npz        the same on held-out text, for honest reports
    *_scores_gate.npz         the same with the gates' scores as confidence

Keeping the scores lets `lama calibrate` pick new thresholds (another target, a guarantee,
a budget) in a second, without loading the model again. Writes go to a temporary folder
that replaces the old one only when complete.

`Checkpoint` is a folder read once: `lama export` and `lama calibrate` open one and hand it
on, so lama.json is parsed once and each scores file is read once, whoever asks for it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from runtime.manifest import from_json_thresholds
from runtime.policy import Policy

from .folders import replacing_folder
from .recipes import ModelSource
from .scores import ExitScores

FORMAT = "lama-checkpoint"
VERSION = 1
CONFIG = "lama.json"
HEADS = "heads.safetensors"
GATES = "gates.safetensors"
NGRAM = "ngram.npz"  # the n-gram draft table (exporter/ngram.py), if `lama train` made one
SPLITS = ("calibration", "heldout")


def scores_file(split: str, kind: str = "head") -> str:
    """calibration_scores.npz (head confidence) / calibration_scores_gate.npz (gate score)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return f"{split}_scores.npz" if kind == "head" else f"{split}_scores_{kind}.npz"


@dataclass
class CheckpointConfig:
    source: ModelSource
    exits: list[int]
    num_layers: int
    head: str
    rank: int
    confidence: str = "top1"  # "top1" | "margin" | "gate": the score the thresholds apply to
    head_confidence: str = "top1"  # the head score stored in *_scores.npz
    gate_width: int | None = None  # gates trained (hidden width) or None
    gate_features: list[str] = field(default_factory=lambda: ["hidden"])  # what the gates see (gates.FEATURES)
    gate_shortlist: int = 0  # shortlist size for the 'shortlist' gate feature
    thresholds: list[float | None] = field(default_factory=list)  # None = never exit
    policy: Policy | None = None  # how thresholds were chosen (runtime/policy.py); None: not calibrated
    calibration: dict = field(default_factory=dict)  # CalibrationReport dicts by split
    train: dict = field(default_factory=dict)  # TrainConfig + TrainReport
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.policy, (Policy, type(None))):  # a stored dict ({} = none): decoded in one place
            self.policy = Policy.from_dict(self.policy, "lama.json policy") if self.policy else None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "policy": self.policy.to_dict() if self.policy else {}}, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "") -> "CheckpointConfig":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not a LAMA checkpoint (format={d.get('format')!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: checkpoint version {d.get('version')} is not supported "
                             f"(this exporter reads version {VERSION})")
        d["source"] = ModelSource(**d["source"])
        d["policy"] = Policy.from_dict(d["policy"], f"{where}: policy") if d.get("policy") else None
        return cls(**d)

    def threshold_values(self) -> list[float]:
        return from_json_thresholds(self.thresholds)


def owned(name: str) -> bool:
    """Whether a file name in a checkpoint folder is one this format writes (lama.json, weights,
    score files); anything else (reports/, notes) belongs to whoever put it there."""
    return (name in (CONFIG, CONFIG + ".tmp", HEADS, GATES, NGRAM)
            or any(name.startswith(f"{s}_scores") and name.endswith(".npz") for s in SPLITS))


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a LAMA checkpoint folder (any version): its lama.json says so."""
    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out: str | Path, overwrite: bool = False) -> None:
    """Refuse to replace `out` unless it is absent, an empty folder or a LAMA checkpoint, or
    `overwrite` says to: `lama train --out runs` must not delete everything under runs/."""
    out = Path(out)
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    what = ("a file" if not out.is_dir() else None if is_checkpoint(out) or not any(out.iterdir())
            else f"a folder with {sum(1 for _ in out.iterdir())} entries and no {CONFIG} of format {FORMAT!r}")
    if what:
        raise FileExistsError(f"{out} exists and is not a LAMA checkpoint ({what}); refusing to replace it, "
                              "which would delete what it holds: choose another --out, or pass --overwrite "
                              "(overwrite=True in Python) to replace it")


def save_checkpoint(out: str | Path, config: CheckpointConfig, heads, scores: dict[str, ExitScores] | None = None,
                    gates=None, *, overwrite: bool = False, keep_others: bool = False,
                    ngram: dict | None = None) -> Path:
    """Write heads (+ gates), score files ({file name from scores_file(): ExitScores}) and the
    n-gram draft table (exporter/ngram.py; a rewrite in place without one keeps the old table).

    An existing `out` is replaced only if it is a LAMA checkpoint or empty, unless `overwrite`
    (check_replaceable). keep_others: a rewrite of the checkpoint in place (pruning) carries
    over what the format does not own (e.g. reports/ written beside it by the benchmarks)."""
    from safetensors.torch import save_file

    out = Path(out)
    with replacing_folder(out, lambda old: check_replaceable(old, overwrite)) as tmp:
        save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, tmp / HEADS)
        if gates is not None:
            save_file({k: v.detach().contiguous() for k, v in gates.state_dict().items()}, tmp / GATES)
        for name, s in (scores or {}).items():
            s.save(tmp / name)
        if ngram is not None:
            from .ngram import save_table

            save_table(ngram, tmp / NGRAM)
        (tmp / CONFIG).write_text(config.to_json())
        if keep_others and out.is_dir():
            for old in out.iterdir():
                if (not owned(old.name) or old.name == NGRAM) and not (tmp / old.name).exists():
                    _copy(old, tmp / old.name)
    return out


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or folder, hard-linking files where the file system allows (the old
    folder is deleted right after, so a link costs nothing and keeps it intact until then)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


def read_config(path: str | Path) -> CheckpointConfig:
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a LAMA checkpoint: {CONFIG} is missing")
    return CheckpointConfig.from_json(cfg_file.read_text(), str(cfg_file))


def read_scores(path: str | Path, split: str = "calibration", kind: str = "head") -> ExitScores:
    f = Path(path) / scores_file(split, kind)
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: re-run `lama train`"
                                + (" with gates enabled" if kind == "gate" else "") + f" to compute {split} scores")
    return ExitScores.load(f)


def score_kind(confidence: str) -> str:
    return "gate" if confidence == "gate" else "head"


def load_heads(path: str | Path, backbone, config: CheckpointConfig | None = None):
    """Rebuild the ExitHeads of a checkpoint on a loaded backbone."""
    from safetensors.torch import load_file

    from .heads import ExitHeads

    path = Path(path)
    config = config or read_config(path)
    if backbone.shape.num_layers != config.num_layers:
        raise ValueError(f"checkpoint was trained on a {config.num_layers}-layer model, "
                         f"this backbone has {backbone.shape.num_layers}")
    heads = ExitHeads(config.head, config.exits, backbone.shape.hidden_size, backbone.family.final_norm,
                      backbone.family.lm_head, rank=config.rank)
    heads.load_state_dict(load_file(path / HEADS))
    heads.eval()
    for p in heads.parameters():
        p.requires_grad_(False)
    return heads


def load_gates(path: str | Path, backbone, config: CheckpointConfig | None = None):
    from safetensors.torch import load_file

    from .gates import ExitGates

    path = Path(path)
    config = config or read_config(path)
    if not config.gate_width or not (path / GATES).is_file():
        raise FileNotFoundError(f"{path} has no trained gates: train with gates enabled to use confidence 'gate'")
    gates = ExitGates(len(config.exits), backbone.shape.hidden_size, config.gate_width, config.gate_features,
                      config.gate_shortlist)
    gates.load_state_dict(load_file(path / GATES))
    gates.eval()
    return gates


@dataclass
class Checkpoint:
    """A checkpoint folder, read once: lama.json when opened; score files on first use, then
    kept; heads and gates built on the backbone a caller gives (they live on its LM head)."""

    path: Path
    config: CheckpointConfig
    _scores: dict = field(default_factory=dict, repr=False)  # (split, kind) -> ExitScores

    @classmethod
    def open(cls, path: "str | Path | Checkpoint") -> "Checkpoint":
        """The checkpoint at `path` (an open Checkpoint is handed back as it is)."""
        return path if isinstance(path, Checkpoint) else cls(Path(path), read_config(path))

    @property
    def score_kind(self) -> str:
        """Which stored scores the thresholds apply to: "gate" or "head"."""
        return score_kind(self.config.confidence)

    def scores(self, split: str = "calibration", kind: str | None = None) -> ExitScores:
        """The stored scores of `split` (default kind: the one the thresholds apply to)."""
        key = (split, kind or self.score_kind)
        if key not in self._scores:
            self._scores[key] = read_scores(self.path, *key)
        return self._scores[key]

    def heads(self, backbone):
        return load_heads(self.path, backbone, self.config)

    def gates(self, backbone):
        return load_gates(self.path, backbone, self.config)

    def splits(self, tokenizer, data: list | None = None) -> dict:
        """The text windows `lama train` drew for this checkpoint ({"train", "calib", "heldout"}:
        Windows), from its training record: the same text (`data`, else the recorded paths, else
        the default data folder), tokenizer, window length, token counts and seed. The windows
        are checked against the sha256 `lama train` recorded (ValueError if the text changed:
        thresholds fitted on other text, maybe training text, would hold nowhere); a checkpoint
        from before the hash was recorded gets a warning."""
        from .data import default_data_dir, make_splits, read_docs, window_hashes

        cfg = self.config.train.get("config") if self.config.train else None
        if not cfg:
            raise ValueError(f"{self.path} has no training record (seq_len, token counts, seed) to redraw its "
                             "text windows")
        paths = data or self.config.train.get("data") or [default_data_dir()]
        texts = read_docs(paths)
        counts = {s: cfg[f"{s}_tokens"] for s in ("train", "calib", "heldout")}
        splits = make_splits(texts, tokenizer, cfg["seq_len"], counts, seed=cfg["seed"])
        recorded = self.config.train.get("windows_sha256")
        where = ", ".join(map(str, paths))
        if not recorded:
            warnings.warn(f"{self.path}: no hash of the training windows recorded (trained before they were), so "
                          f"the windows redrawn from {where} cannot be checked to be the ones it was trained and "
                          "calibrated on", stacklevel=2)
            return splits
        changed = [s for s, h in window_hashes(splits).items() if recorded.get(s) != h]
        if changed:
            raise ValueError(f"{self.path}: the text in {where} does not give the windows `lama train` drew "
                             f"(the {', '.join(changed)} windows' sha256 differ from the recorded ones): the text "
                             "or the tokenizer changed. Pass the text it was trained on (--data / data=), or train "
                             "again")
        return splits

    def with_config(self, config: CheckpointConfig) -> "Checkpoint":
        """The same folder under another config (e.g. thresholds recalibrated on the way);
        the scores already read are shared."""
        return replace(self, config=config, _scores=self._scores)
