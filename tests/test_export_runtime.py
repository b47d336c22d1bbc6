"""The exported segment chain against the PyTorch model, KV-cache policies, and bad inputs."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAMILIES, HF_CACHE, make_checkpoint, requires_stories

from exporter import api
from runtime import BackendError, ManifestError, Runtime

PROMPT = "It is a truth universally acknowledged"
NEW = 32


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """One export per family (with logits, for the parity check), shared by the tests."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        ckpt, bb = make_checkpoint(d, fam)
        out[fam] = (api.export(ckpt, out=d / "onnx", with_logits=True, backbone=bb), bb)
    return out


def torch_greedy(model, ids: list[int], n: int):
    """Reference: greedy decoding with a full forward pass per token (no cache at all)."""
    ids = list(ids)
    logits = None
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_chain_matches_pytorch(exported, family):
    folder, bb = exported[family]
    rt = Runtime.load(folder)
    prompt = rt.encode(PROMPT).tolist()
    ref_ids, ref_last_logits = torch_greedy(bb.model, prompt, NEW)
    cache = rt.new_cache()
    th = rt.resolve_thresholds("never")
    x, tokens, logits = np.array(prompt), [], None
    for _ in range(NEW):
        tok, j, _, logits = rt.step(x, cache, th, want_logits=True)
        assert j == len(rt.manifest.segments) - 1  # nothing exits
        tokens.append(tok)
        x = np.array([tok])
    assert tokens == ref_ids[len(prompt):]
    # logits of the last step, decoded with a cache through every segment, vs. a full forward pass
    assert np.abs(logits[0] - ref_last_logits.numpy()).max() < 1e-3
    assert list(rt.generate(prompt, NEW, thresholds="never").tokens) == tokens


def force_exit(rt, j):
    """Thresholds that make the token leave at segment j (the last segment = full model)."""
    n = len(rt.manifest.exits)
    return [float("inf")] * j + [0.0] * (n - j)


def run_tokens(rt, tokens, exits_pattern=None):
    """Teacher-force `tokens` through the chain (4-token prefill, then one by one), leaving at
    the segment `exits_pattern[i]` for step i (None: never exit). Returns the cache."""
    cache = rt.new_cache()
    steps = [tokens[:4]] + [[t] for t in tokens[4:]]
    last = len(rt.manifest.segments) - 1
    for i, ids in enumerate(steps):
        j = last if exits_pattern is None else exits_pattern[i]
        _, got, _, _ = rt.step(np.array(ids), cache, force_exit(rt, j))
        assert got == j
    return cache


def assert_cache_close(cache, ref, full_length=None):
    for st, rs in zip(cache.segments, ref.segments):
        n = st.length if full_length is None else full_length
        assert st.length == n
        for a, b in zip(st.keys + st.values, rs.keys + rs.values):
            assert np.abs(a - b[:, :, :n]).max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_defer_cache_equals_full_model_cache(exported, family):
    folder, _ = exported[family]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 95, size=40).tolist()
    ref = run_tokens(Runtime.load(folder), tokens)
    rt = Runtime.load(folder, kv_policy="defer", max_pending=1000)  # no flush: what waits is checked below
    segs = len(rt.manifest.segments)
    pattern = rng.integers(0, segs, size=37).tolist()  # any sequence of exits
    pattern[-1] = 1  # end on an early exit, so positions are still waiting
    cache = run_tokens(rt, tokens, pattern)
    # every computed position equals the full model's; the rest is pending, not lost
    assert_cache_close(cache, ref)
    assert any(st.length < len(tokens) for st in cache.segments)
    assert all(st.pending_end == len(tokens) for st in cache.segments[1:2])
    # one token through the whole model computes every deferred position: caches complete and exact
    pattern2 = pattern[:-1] + [segs - 1]
    assert_cache_close(run_tokens(rt, tokens, pattern2), ref, full_length=len(tokens))


def test_defer_catches_up_exactly(exported):
    folder, _ = exported["llama"]
    rt = Runtime.load(folder, max_pending=1000)
    tokens = list(range(10, 40))
    full = run_tokens(rt, tokens)
    last = len(rt.manifest.segments) - 1
    pattern = [last] + [0] * (len(tokens) - 5)  # prefill, then every token leaves at the first exit
    cache = run_tokens(rt, tokens[:-1], pattern)
    assert cache.segments[-1].length == 4 and cache.segments[1].pending.shape[1] == len(tokens) - 5
    cache = run_tokens(rt, tokens, pattern + [last])  # one deep token runs all deferred positions
    assert all(st.pending is None for st in cache.segments)
    assert_cache_close(cache, full, full_length=len(tokens))


def test_threshold_zero_exits_first_and_never_is_full(exported):
    folder, _ = exported["gpt_neox"]
    rt = Runtime.load(folder)
    r0 = rt.generate(PROMPT, 8, thresholds=[0.0, 0.0, 0.0])
    assert {rec.segment for rec in r0.records} == {0}
    rf = rt.generate(PROMPT, 8, thresholds="never")
    assert {rec.segment for rec in rf.records} == {len(rt.manifest.segments) - 1}
    assert rf.mean_layers == rt.manifest.model.num_layers


TORCH_FREE = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):  # any import of these fails loudly, wherever it is made
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"the runtime imported {name}")

sys.meta_path.insert(0, Refuse())
from runtime import Runtime
from runtime.inspect_export import describe

folder, template = sys.argv[1], sys.argv[2]
rt = Runtime.load(folder, chat_template=template)
out = {"greedy": list(rt.generate("It is a truth", 6, thresholds=[0.1] * len(rt.manifest.exits)).tokens),
       "exact": list(rt.generate("It is a truth", 6, thresholds=[0.1] * len(rt.manifest.exits), exact=True).tokens),
       "sampled": list(rt.generate("It is a truth", 6, temperature=0.8, top_p=0.9, seed=1).tokens),
       "stream": [r.token for r in rt.stream("It is a truth", 6)],
       "chat": list(rt.chat([{"role": "user", "content": "Hello"}], 4).tokens),
       "fill": list(Runtime.load(folder, kv_policy="fill").generate("It is a truth", 6).tokens),
       "inspect": describe(folder)["model"]["layers"]}
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps(out))
"""


def test_runtime_runs_without_torch(exported):
    """In a fresh process: load an export and generate (greedy, exact, sampled, streamed, chat,
    fill policy, inspect) with torch and transformers made unimportable; neither gets loaded."""
    from conftest import SMOLLM2_CHAT_TEMPLATE

    folder, _ = exported["llama"]
    run = subprocess.run([sys.executable, "-c", TORCH_FREE, str(folder), str(SMOLLM2_CHAT_TEMPLATE)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert all(len(out[k]) == 6 for k in ("greedy", "exact", "sampled", "stream", "fill")) and len(out["chat"]) == 4
    rt = Runtime.load(folder)  # and the tokens are this process's
    assert out["greedy"] == list(rt.generate("It is a truth", 6, thresholds=[0.1] * len(rt.manifest.exits)).tokens)
    assert out["stream"] == list(rt.generate("It is a truth", 6).tokens)


def test_thread_pools_give_the_same_tokens(exported):
    """The shared (spinning, process-wide) pool and per-session pools are a speed choice only:
    each runs in a fresh process (onnxruntime fixes the kind per process) and gives the same
    tokens; a process whose sessions already share a pool keeps using it."""
    folder, _ = exported["llama"]
    code = ("import json, sys, warnings; from runtime import Runtime; "
            "rt = Runtime.load(sys.argv[1], threads=2, thread_pool=sys.argv[2]); "
            "r = rt.generate(sys.argv[3], 12, thresholds=[0.5] * len(rt.manifest.exits)); "
            "warnings.simplefilter('error'); "
            "again = Runtime.load(sys.argv[1], threads=2, thread_pool='session'); "
            "print(json.dumps([[b.thread_pool for b in rt.backends], [b.thread_pool for b in again.backends], "
            "list(r.tokens)]))")
    out = {}
    for pool in ("shared", "session"):
        run = subprocess.run([sys.executable, "-c", code, str(folder), pool, PROMPT], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        out[pool] = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(out["shared"][0]) == {"shared"} and set(out["session"][0]) == {"session"}
    assert set(out["shared"][1]) == {"shared"}  # the process's pool kind wins, quietly
    assert out["shared"][2] == out["session"][2] and len(out["shared"][2]) == 12


# -- bad inputs ---------------------------------------------------------------------------------

@pytest.fixture
def export_copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported["llama"][0], dst)
    return dst


def test_missing_segment_file(export_copy):
    (export_copy / "segment_02.onnx").unlink()
    with pytest.raises(ManifestError, match="segment 2 file segment_02.onnx is missing"):
        Runtime.load(export_copy)


def test_corrupted_onnx(export_copy):
    p = export_copy / "segment_01.onnx"
    p.write_bytes(b"not a graph" + p.read_bytes()[11:])
    with pytest.raises(ManifestError, match="does not match its sha256"):
        Runtime.load(export_copy)
    with pytest.raises(BackendError, match="onnxruntime cannot load this graph"):
        Runtime.load(export_copy, verify=False)


def test_other_schema_version(export_copy):
    m = json.loads((export_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (export_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"schema version 99 is not supported.*supported: \[1, 2, 3\]"):
        Runtime.load(export_copy)


def test_not_an_export(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        Runtime.load(tmp_path)


def test_prompt_too_long_and_empty(exported):
    rt = Runtime.load(exported["llama"][0])
    with pytest.raises(ValueError, match="context is 256"):
        rt.generate("x" * 300, 4)
    with pytest.raises(ValueError, match="prompt is empty"):
        rt.generate("", 4)
    with pytest.raises(ValueError, match="prompt is empty"):
        rt.generate([], 4)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    ckpt, bb = make_checkpoint(tmp_path, "gpt2")
    import exporter.onnx_export as ox

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ox, "_tokenizer_info", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        api.export(ckpt, out=tmp_path / "out", backbone=bb)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.fixture(scope="module")
def external_export(tmp_path_factory, monkeypatch_module):
    """A llama export whose segments keep their weights in `.onnx.data` side files, as a
    model over EXTERNAL_DATA_BYTES would (the threshold lowered so the tiny model does)."""
    import exporter.onnx_files as files

    monkeypatch_module.setattr(files, "EXTERNAL_DATA_BYTES", 0)
    d = tmp_path_factory.mktemp("external")
    ckpt, bb = make_checkpoint(d, "llama")
    return api.export(ckpt, out=d / "onnx", backbone=bb)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_external_data_is_listed_and_runs(external_export, exported):
    m = Runtime.load(external_export).manifest
    for seg in m.segments:
        assert [d.file for d in seg.data_files] == [seg.file + ".data"]
        assert seg.data_files[0].size == (external_export / seg.data_files[0].file).stat().st_size
    from runtime.inspect_export import describe

    on_disk = sum(p.stat().st_size for p in external_export.glob("*.onnx*"))
    assert describe(external_export)["total_size"] == on_disk  # graphs and their weights files
    a = Runtime.load(external_export).generate(PROMPT, 8, thresholds="never")
    b = Runtime.load(exported["llama"][0]).generate(PROMPT, 8, thresholds="never")
    assert a.tokens == b.tokens


def test_tampered_external_data_is_caught(external_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(external_export, dst)
    p = dst / "segment_01.onnx.data"
    raw = bytearray(p.read_bytes())
    raw[100] ^= 0xFF  # same size, one byte flipped: loads silently unless hashed
    p.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"segment_01.onnx.data does not match its sha256"):
        Runtime.load(dst)
    p.write_bytes(bytes(raw[:-8]))
    with pytest.raises(ManifestError, match=r"segment_01.onnx.data is \d+ bytes, the manifest says"):
        Runtime.load(dst, verify=False)  # sizes are checked even without checksums
    p.unlink()
    with pytest.raises(ManifestError, match=r"weights file segment_01.onnx.data is missing"):
        Runtime.load(dst)


# -- streaming and stopping -------------------------------------------------------------------
MULTIBYTE = "Café 😀 日本, crème brûlée 🍰"


@requires_stories
def test_stream_and_cli_print_complete_characters(exported, monkeypatch, capsys):
    """Runtime.stream and `lama generate` with a byte-fallback tokenizer (stories260K's):
    the model is scripted to emit the ids of MULTIBYTE, several of them lone UTF-8 bytes."""
    from tokenizers import Tokenizer

    from lama import cli

    stories = Tokenizer.from_file(str(next((HF_CACHE / "models--karpathy--stories260K").glob("snapshots/*/tokenizer.json"))))
    ids = stories.encode(MULTIBYTE, add_special_tokens=False).ids
    rt = Runtime.load(exported["llama"][0])
    rt.tokenizer = stories  # and its vocabulary, which the prompt's ids are checked against
    rt.manifest = dataclasses.replace(rt.manifest, model=dataclasses.replace(rt.manifest.model,
                                                                             vocab_size=stories.get_vocab_size()))

    def scripted(x, cache, thresholds, want_logits=False, stats=None):
        scripted.n += 1
        return ids[scripted.n - 1], 0, 1.0, None

    scripted.n = 0
    monkeypatch.setattr(rt, "step", scripted)
    pieces = [r.text for r in rt.stream([1, 2, 3], len(ids), stop_at_eos=False)]
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces), pieces
    # the CLI prints exactly those pieces
    scripted.n = 0
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    assert cli.main(["generate", str(exported["llama"][0]), "Once", "--max-new-tokens", str(len(ids))]) == 0
    assert capsys.readouterr().out == MULTIBYTE + "\n"


def test_the_cli_uses_the_shared_thread_pool_by_default(monkeypatch):
    """`lama generate`/`chat` run only the chain in their process: onnxruntime's shared spinning
    pool by default; $LAMA_THREAD_POOL (or --thread-pool) picks per-session pools."""
    from runtime.cli import build_parser

    monkeypatch.delenv("LAMA_THREAD_POOL", raising=False)
    assert build_parser().parse_args(["generate", "x", "hi"]).thread_pool == "shared"
    monkeypatch.setenv("LAMA_THREAD_POOL", "session")
    assert build_parser().parse_args(["generate", "x", "hi"]).thread_pool == "session"
    assert build_parser().parse_args(["generate", "x", "hi", "--thread-pool", "shared"]).thread_pool == "shared"
