"""Plain text in, fixed-length token windows out, split three ways without overlap.

Each file's token stream is cut into three contiguous regions (train | calibration |
held-out) before any window is drawn, so no window of one split shares text with
another. Heads train on the first, thresholds are fitted on the second, and every
figure we report comes from the third.

Text comes in domains (the first folder under a data root, e.g. ``gutenberg/`` or
``code/``; a file directly in the root is its own domain). Windows are drawn evenly
across domains, not in proportion to their size, so one large domain (5 MB of novels)
does not drown the others; every window keeps its domain label, so calibration can
leave a domain out and reports can be split by domain.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "calib", "heldout")
SPLIT_SHARE = (0.8, 0.1, 0.1)


DATA_ENV = "LAMA_DATA"  # the default training text's folder, when set
CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # beside an editable checkout


def default_data_dir() -> Path:
    """The text used when no --data is given: $LAMA_DATA if set, else ../shared/data from the
    current folder, else ../shared/data beside this source checkout (an editable install).
    Raises FileNotFoundError naming everything it tried."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"${DATA_ENV} is {env!r}, which does not exist: point it at a folder (or file) "
                                    "of .txt text, or pass --data")
        return path.resolve()
    tried = list(dict.fromkeys([(Path.cwd() / ".." / "shared" / "data").resolve(), CHECKOUT_DATA]))
    for path in tried:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no text given and no default found: tried ${DATA_ENV} (not set), "
                            + ", ".join(map(str, tried)) + f"; pass --data FILES_OR_FOLDERS or set {DATA_ENV}")


@dataclass(frozen=True)
class Doc:
    """One text file's content and the domain it belongs to."""

    text: str
    domain: str = "text"


def text_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders into their *.txt files; fail clearly on anything missing or empty."""
    return [f for f, _ in _labelled_files(paths)]


def _labelled_files(paths: list[str | Path]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*.txt")):
                rel = f.relative_to(p)
                files.append((f, rel.parts[0] if len(rel.parts) > 1 else f.stem))
        elif p.is_file():
            files.append((p, p.parent.name or p.stem))
        else:
            raise FileNotFoundError(f"text path not found: {p}")
    if not files:
        raise ValueError(f"no .txt files in {[str(p) for p in paths]}")
    return files


@dataclass
class Windows:
    """(N, seq_len) token ids; row i came from text window i (its `sequence` id).

    domain: (N,) index into `domains` of each window's domain.
    """

    ids: np.ndarray
    domain: np.ndarray | None = None
    domains: tuple[str, ...] = ("text",)

    def __post_init__(self) -> None:
        if self.domain is None:
            self.domain = np.zeros(len(self.ids), dtype=np.int16)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)

    def sha256(self) -> str:
        """Hash of the token ids (shape and values, in order): `lama train` records it per
        split so that the windows redrawn later (Checkpoint.splits) can be checked to match."""
        h = hashlib.sha256(repr(tuple(self.ids.shape)).encode())
        h.update(np.ascontiguousarray(self.ids, dtype="<i8").tobytes())
        return h.hexdigest()


def window_hashes(splits: dict[str, Windows]) -> dict[str, str]:
    """{split: Windows.sha256()}, as a checkpoint's training record keeps them."""
    return {name: w.sha256() for name, w in splits.items()}


def _even_shares(sizes: list[int], want: int) -> list[int]:
    """Split `want` windows as evenly as the domains' sizes allow (water-filling)."""
    take = [0] * len(sizes)
    left, open_ = want, [i for i, s in enumerate(sizes) if s > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            add = min(share, sizes[i] - take[i], left)
            take[i] += add
            left -= add
            if take[i] == sizes[i]:
                open_.remove(i)
            if left == 0:
                break
    return take


def make_splits(texts: list[str | Doc], tokenizer, seq_len: int, tokens: dict[str, int],
                seed: int = 0) -> dict[str, Windows]:
    """Windows of `seq_len` tokens for each split, about `tokens[split]` tokens each, drawn
    evenly across the texts' domains."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    docs = [d if isinstance(d, Doc) else Doc(d) for d in texts]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError("the text is empty: training and calibration need some real text")
    domains = tuple(sorted({d.domain for d in docs}))
    pools: dict[str, list[list[np.ndarray]]] = {s: [[] for _ in domains] for s in SPLITS}
    for doc in docs:
        ids = np.asarray(tokenizer(doc.text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        bounds = np.cumsum([0] + [int(len(ids) * f) for f in SPLIT_SHARE])
        for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            n = (hi - lo) // seq_len
            if n:
                pools[split][domains.index(doc.domain)].append(ids[lo:lo + n * seq_len].reshape(n, seq_len))
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        per_domain = [np.concatenate(p) if p else np.zeros((0, seq_len), np.int64) for p in pools[split]]
        if not any(len(p) for p in per_domain):
            raise ValueError(f"not enough text for one {seq_len}-token window in the {split} split")
        want = max(1, tokens.get(split, 0) // seq_len)
        take = _even_shares([len(p) for p in per_domain], want)
        rows, labels = [], []
        for d, (pool, n) in enumerate(zip(per_domain, take)):
            pick = np.sort(rng.permutation(len(pool))[:n])
            rows.append(pool[pick])
            labels.append(np.full(n, d, dtype=np.int16))
        out[split] = Windows(np.concatenate(rows), np.concatenate(labels), domains)
    return out


def read_texts(paths: list[str | Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in text_files(paths)]


def read_docs(paths: list[str | Path]) -> list[Doc]:
    """Texts with their domain labels (see the module docstring)."""
    return [Doc(f.read_text(encoding="utf-8", errors="replace"), dom) for f, dom in _labelled_files(paths)]


def heldout_prompts(export: str | Path, data: list[str | Path], per_domain: int, length: int) -> dict[str, list[list[int]]]:
    """{domain: prompts}: `per_domain` windows of `length` tokens from each domain's held-out text,
    tokenized with an export's own tokenizer.json (what the benchmarks and studies prompt with)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(export) / "tokenizer.json"))
    docs = read_docs(data)
    domains = sorted({d.domain for d in docs})
    splits = make_splits(docs, tok, length, {"train": 0, "calib": 0, "heldout": per_domain * length * len(domains)})
    w = splits["heldout"]
    return {name: w.ids[w.domain == i][:per_domain].tolist() for i, name in enumerate(w.domains)}
