"""The n-gram draft table: built from the model's own top-1 per context (exporter/ngram.py),
read and chained on the device (runtime/drafting.NgramTable), carried and checked in exports."""

import numpy as np
import pytest

from exporter.ngram import build_table, save_table
from runtime.drafting import NgramTable, make_drafters


def test_table_keeps_each_contexts_most_frequent_prediction_within_windows():
    # two windows; the model predicted 7 after "1 2" twice and 8 once; "2 3" -> 9 once only
    sequence = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    tokens = np.array([1, 2, 3, 4, 1, 2, 1, 2, 3])
    top1 = np.array([5, 7, 9, 6, 5, 7, 5, 8, 9])
    t = build_table(sequence, tokens, top1, orders=(2, 1), min_count=2)
    table = NgramTable.from_arrays(t)
    assert table.propose([1, 2], 1) == [7]  # 2 of 3
    assert table.propose([9, 1], 1) == [5]  # order 1: after "1" the model said 5 three times
    assert table.propose([2, 3], 1) == [9]  # "2 3" seen twice (-> 9 both times)
    assert table.propose([3, 4], 1) == []  # "4" once, "3 4" once: below min_count; no context crosses windows
    assert table.propose([1, 2], 3) == [7]  # chained: "2 7" and "7" are unknown, so it stops
    ties = build_table(np.zeros(4, int), np.array([1, 1, 1, 1]), np.array([4, 3, 4, 3]), orders=(1,), min_count=1)
    assert ties["tokens_1"].tolist() == [3]  # equal counts: the lower id
    with pytest.raises(ValueError, match="one entry per position"):
        build_table(np.zeros(3), np.zeros(2), np.zeros(3))


def test_table_file_roundtrip_and_refusals(tmp_path):
    t = build_table(np.zeros(6, int), np.array([1, 2, 1, 2, 1, 2]), np.array([2, 1, 2, 1, 2, 1]), min_count=1)
    save_table(t, tmp_path / "ngram.npz")
    table = NgramTable.load(tmp_path / "ngram.npz")
    assert list(table.tables) == [3, 2, 1]  # longest context first
    assert table.propose([1], 4) == [2, 1, 2, 1]  # each draft is context for the next
    assert [d.name for d in make_drafters(None, {"ngram": table})] == ["lookup", "ngram"]
    assert [d.name for d in make_drafters("ngram", {"ngram": table})] == ["ngram"]
    with pytest.raises(ValueError, match="holds none"):
        make_drafters("ngram")
    np.savez(tmp_path / "bad.npz", keys_2=np.array([5, 3]), tokens_2=np.array([1, 1]))
    with pytest.raises(ValueError, match="malformed"):
        NgramTable.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "big.npz", keys_1=np.array([1, 2]), tokens_1=np.array([3, 70]))
    with pytest.raises(ValueError, match="outside"):
        NgramTable.load(tmp_path / "big.npz", vocab_size=64)


def test_export_carries_and_checks_the_table(tmp_path):
    from conftest import make_checkpoint

    from exporter import api
    from exporter.checkpoint import NGRAM
    from runtime import Runtime
    from runtime.manifest import ManifestError

    ckpt, bb = make_checkpoint(tmp_path, "llama")
    none = api.export(ckpt, out=tmp_path / "none", backbone=bb)  # a checkpoint without a table: lookup only
    assert Runtime.load(none).manifest.ngram is None and Runtime.load(none).draft_sources == {}
    save_table(build_table(np.zeros(8, int), np.arange(8) % 3, (np.arange(8) + 1) % 3, min_count=1), ckpt / NGRAM)
    folder = api.export(ckpt, out=tmp_path / "onnx", backbone=bb)
    rt = Runtime.load(folder)
    assert rt.manifest.ngram.size == (folder / NGRAM).stat().st_size
    assert rt.draft_sources["ngram"].propose([0, 1], 2) == [2, 0]
    res = rt.generate("abc", 8, thresholds="never", stop_at_eos=False, exact=True, drafts="ngram")
    assert res.tokens == rt.generate("abc", 8, thresholds="never", stop_at_eos=False).tokens
    with np.load(folder / NGRAM) as z:
        arrays = dict(z)
    arrays["tokens_1"] = (arrays["tokens_1"] + 1) % 3
    np.savez(folder / NGRAM, **arrays)
    with pytest.raises(ManifestError, match="n-gram draft table"):
        Runtime.load(folder)
