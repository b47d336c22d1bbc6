"""Domains (issue 12): windows drawn evenly across domains, labels kept, per-domain leave-one-out table."""

import importlib

import numpy as np
from conftest import SAMPLE_TEXT, char_tokenizer

from exporter.data import Doc, make_splits, read_docs
from exporter.scores import ExitScores


def _domains_module():
    return importlib.import_module("benchmarks.studies.domains")


def test_windows_are_drawn_evenly_across_domains(tmp_path):
    for name, size in (("big", 40), ("small", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text(SAMPLE_TEXT[: len(SAMPLE_TEXT) * size // 40])
    (tmp_path / "loose.txt").write_text(SAMPLE_TEXT[:4000])
    docs = read_docs([tmp_path])
    assert sorted(d.domain for d in docs) == ["big", "loose", "small"]
    w = make_splits(docs, char_tokenizer(), 32, {"train": 32 * 60, "calib": 320, "heldout": 320})["train"]
    counts = np.bincount(w.domain, minlength=3)
    assert w.domains == ("big", "loose", "small")
    # the big domain does not drown the others: each gets an even share until it runs out
    assert counts.sum() == 60 and counts.max() - counts.min() <= 1, counts
    # plain strings (old callers) are one domain, as before
    assert make_splits([SAMPLE_TEXT], char_tokenizer(), 32, {"train": 320})["train"].domains == ("text",)
    assert make_splits([Doc(SAMPLE_TEXT, "x")], char_tokenizer(), 32, {"train": 320})["train"].domains == ("x",)


def _scores(rng, n_per, domains, easy):
    """Gate-like scores where domain `easy[d]` controls how often a confident token agrees."""
    conf, agree, dom = [], [], []
    for i, d in enumerate(domains):
        c = rng.random((n_per, 2))
        a = rng.random((n_per, 2)) < np.clip(c * easy[d] + 0.2, 0, 1)
        conf.append(c), agree.append(a), dom.append(np.full(n_per, i))
    n = n_per * len(domains)
    return ExitScores(np.concatenate(conf), np.concatenate(agree), np.arange(n) // 16, [2, 4], 6, 0.0,
                      np.concatenate(dom), tuple(domains))


def test_leave_one_domain_out_table(tmp_path):
    mod = _domains_module()
    rng = np.random.default_rng(0)
    domains = ("code", "fiction", "wiki")
    easy = {"code": 0.5, "fiction": 1.0, "wiki": 1.0}  # code: confident tokens agree less often
    for split in ("calibration", "heldout"):
        _scores(rng, 3000, domains, easy).save(tmp_path / f"{split}_scores_gate.npz")
    res = mod.run(tmp_path, 0.9, "gate")
    runs = {r["left_out"]: r for r in res["runs"]}
    assert set(runs) == {"(none)", *domains}
    # leaving code out of calibration makes thresholds looser: code's held-out tokens then miss the target
    assert runs["code"]["thresholds"][0] < runs["(none)"]["thresholds"][0]
    code_any = runs["code"]["heldout"]["code"][-1]
    assert code_any["exited"] > 0 and code_any["high"] < 0.9 and not code_any["holds"]
    fiction_any = runs["code"]["heldout"]["fiction"][-1]
    assert fiction_any["holds"] and fiction_any["low"] <= fiction_any["agreement"] <= fiction_any["high"]
    assert "✗" in mod.markdown(res)
    lo, hi = mod.interval(95, 100)
    assert lo < 0.95 < hi and mod.interval(0, 0) == (None, None)
