"""The EAGLE-style drafter study's batched rollout (all start positions at once, draft keys
appended per start) must draft exactly what running the drafter step by step does."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.studies.eagle_study import Drafter, chain_accept, eagle_drafts  # noqa: E402


def _naive(dr, emb, short, ids, feats, t, K):
    fs = [torch.from_numpy(feats[i]) for i in range(t + 1)]
    xs = [int(ids[i + 1]) for i in range(t + 1)]
    out = []
    for _ in range(K):
        pred, logits, _ = dr(torch.stack(fs)[None], emb(torch.tensor(xs))[None], torch.arange(len(fs)))
        d = int(short[logits[0, -1].argmax()])
        out.append(d)
        fs.append(pred[0, -1])
        xs.append(d)
    return out


@torch.no_grad()
def test_batched_rollout_equals_step_by_step():
    torch.manual_seed(0)
    D, H, KV, FFN, N, V, L, K = 32, 4, 2, 48, 20, 50, 12, 3
    dr = Drafter(D, H, KV, FFN, 10000.0, torch.randn(N, D)).eval()
    for p in dr.parameters():
        p.data.normal_(0, 0.3)
    emb = torch.nn.Embedding(V, D)
    short = torch.randperm(V)[:N]
    rng = np.random.default_rng(0)
    ids, feats = rng.integers(0, V, L), rng.standard_normal((L, D)).astype(np.float32)
    starts = np.arange(2, L - K - 1)
    got = eagle_drafts(dr, emb, short, ids, feats, starts, K)
    want = [_naive(dr, emb, short, ids, feats, int(t), K) for t in starts]
    assert got.tolist() == want
    assert len({tuple(r) for r in want}) > 1  # not a constant drafter


def test_chain_acceptance_stops_at_first_miss():
    d = np.array([[1, 2, 3], [1, 9, 3], [7, 2, 3]])
    truth = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    assert chain_accept(d, truth).tolist() == [[True, True, True], [True, False, False], [False, False, False]]
