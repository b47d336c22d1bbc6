"""Plain text in, fixed-length token windows out, split three ways without overlap.

Each file's token stream is cut into three contiguous regions (train | calibration |
held-out) before any window is drawn, so no window of one split shares text with
another. Heads train on the first, thresholds are fitted on the second, and every
figure we report comes from the third.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "calib", "heldout")
SPLIT_SHARE = (0.8, 0.1, 0.1)


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def text_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders into their *.txt files; fail clearly on anything missing or empty."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text path not found: {p}")
    if not files:
        raise ValueError(f"no .txt files in {[str(p) for p in paths]}")
    return files


@dataclass
class Windows:
    """(N, seq_len) token ids; row i came from text window i (its `sequence` id)."""

    ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)


def make_splits(texts: list[str], tokenizer, seq_len: int, tokens: dict[str, int], seed: int = 0) -> dict[str, Windows]:
    """Windows of `seq_len` tokens for each split, about `tokens[split]` tokens each."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("the text is empty: training and calibration need some real text")
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for text in texts:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        bounds = np.cumsum([0] + [int(len(ids) * f) for f in SPLIT_SHARE])
        for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            n = (hi - lo) // seq_len
            if n:
                pools[split].append(ids[lo:lo + n * seq_len].reshape(n, seq_len))
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        if not pools[split]:
            raise ValueError(f"not enough text for one {seq_len}-token window in the {split} split")
        allw = np.concatenate(pools[split])
        want = max(1, tokens.get(split, 0) // seq_len)
        pick = rng.permutation(len(allw))[:want]
        out[split] = Windows(allw[np.sort(pick)])
    return out


def read_texts(paths: list[str | Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in text_files(paths)]
