"""Bad input to the runtime API and in manifests (issue 26): refused where it enters, with a
message that names the argument (or manifest key) and what it allows; never a raw error from
onnxruntime, numpy, the tokenizer or the template, and never accepted silently."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime import ChatTemplateError, ManifestError, Runtime

PROMPT = "It is a truth"
NAN = float("nan")
VOCAB = 97  # the tiny models' character vocabulary


@pytest.fixture(scope="module")
def rt(chat_export):
    return Runtime.load(chat_export[0])


# -- generate / stream ----------------------------------------------------------------------------
GENERATE = [
    # token ids: >= the vocabulary reached onnxruntime's Gather; negative ones were read as another token
    (dict(prompt=[5, VOCAB, 7]), ValueError, rf"prompt\[1\] = {VOCAB} is not a token id of this model: ids must be "
                                             rf"in \[0, {VOCAB}\)"),
    (dict(prompt=[5, -1, 7]), ValueError, r"prompt\[1\] = -1 is not a token id"),
    (dict(prompt=np.array([5, 6, 1000])), ValueError, r"prompt\[2\] = 1000 is not a token id"),
    (dict(prompt=np.array([5.0, 6.0])), TypeError, r"prompt must hold integer token ids, got an array of float64"),
    (dict(prompt=np.array([[5, 6]])), ValueError, r"prompt must be one sequence of token ids \(1-D\)"),
    (dict(prompt=[5, 6.5]), TypeError, r"prompt\[1\] must be an integer token id, got 6.5"),
    (dict(prompt=[5, True]), TypeError, r"prompt\[1\] must be an integer token id, got True"),
    (dict(prompt=12345), TypeError, r"prompt must be a str or a sequence of token ids"),
    (dict(prompt=b"It is"), TypeError, r"prompt must be a str or a sequence of token ids.*got bytes"),
    (dict(prompt="It is \ud800 a truth"), ValueError, r"prompt is not valid Unicode: '\\ud800' at index 6 is a lone "
                                                      r"surrogate"),
    (dict(max_new_tokens=2.5), TypeError, r"max_new_tokens must be an integer >= 0, got 2.5"),
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens="8"), TypeError, r"max_new_tokens must be an integer >= 0"),
    (dict(thresholds=[NAN] * 3), ValueError, r"thresholds\[0\] must be a number \(not NaN\)"),
    (dict(thresholds=[0.5, "0.5", 0.5]), TypeError, r"thresholds\[1\] must be a number \(not NaN\)"),
    (dict(thresholds=[0.5, 0.5]), ValueError, r"2 thresholds given for 3 exits"),
    (dict(thresholds=NAN), ValueError, r"thresholds \(a target\) must be a finite number in \(0, 1\]"),
    (dict(thresholds=1.5), ValueError, r"thresholds \(a target\) must be a finite number in \(0, 1\]"),
    (dict(thresholds=True), TypeError, r"thresholds must be None \(the calibrated default\), 'never', a target"),
    (dict(thresholds="fast"), ValueError, r"thresholds must be None, 'never', a target or a list"),
    (dict(seed=1.5), TypeError, r"seed must be an integer >= 0 \(None = a fresh random seed\) or None, got 1.5"),
    (dict(seed="42"), TypeError, r"seed must be an integer"),
    (dict(seed=-3), ValueError, r"seed must be an integer >= 0"),
    (dict(temperature="hot"), TypeError, r"temperature must be a finite number >= 0"),
    (dict(temperature=NAN), ValueError, r"temperature must be a finite number >= 0"),
    (dict(top_k=2.5), TypeError, r"top_k must be an integer >= 0"),
    (dict(top_p=NAN), ValueError, r"top_p must be a finite number in \(0, 1\]"),
    (dict(stop=123), TypeError, r"stop must be a str, a list of str or None, got 123"),
    (dict(stop=["ok", 5]), TypeError, r"stop\[1\] must be a str"),
    (dict(stop=["ok", ""]), ValueError, r"stop\[1\] is empty"),
    (dict(stop="\udcff"), ValueError, r"stop\[0\] is not valid Unicode"),
    (dict(max_time="1"), TypeError, r"max_time must be a number \(not NaN\) > 0 \(seconds\)"),
    (dict(max_time=NAN), ValueError, r"max_time must be a number \(not NaN\) > 0"),
    (dict(cancel=True), TypeError, r"cancel must be a threading.Event"),
    (dict(exact="yes"), TypeError, r"exact must be True or False, got 'yes'"),
    (dict(reuse_cache="no"), TypeError, r"reuse_cache must be True or False, got 'no'"),
    (dict(stop_at_eos=0), TypeError, r"stop_at_eos must be True or False, got 0"),
]


@pytest.mark.parametrize("bad, error, message", GENERATE, ids=[f"{k}-{i}" for i, (d, _, _) in enumerate(GENERATE)
                                                                for k in d])
def test_generate_and_stream_name_the_bad_argument(rt, bad, error, message):
    args = {"prompt": PROMPT, "max_new_tokens": 4, **bad}
    prompt, n = args.pop("prompt"), args.pop("max_new_tokens")
    with pytest.raises(error, match=message):
        rt.generate(prompt, n, **args)
    with pytest.raises(error, match=message):  # at the call, not at the stream's first next()
        rt.stream(prompt, n, **args)


def test_good_inputs_of_every_kind_still_run(rt):
    ids = rt.encode(PROMPT)
    want = rt.generate(PROMPT, 4).tokens
    for prompt in (ids, ids.astype(np.int32), ids.tolist(), tuple(ids.tolist()), [np.int64(i) for i in ids]):
        assert rt.generate(prompt, 4).tokens == want
    assert rt.generate(PROMPT, np.int64(4), seed=np.int64(3), thresholds=[None, float("inf"), 1]).tokens
    assert rt.generate(PROMPT, 4, stop={"zz"}, stop_at_eos=np.bool_(True), max_time=float("inf")).tokens == want
    assert len(rt.generate(PROMPT, 0).tokens) == 0


def test_encode_checks_the_tokenizers_ids_too(rt, monkeypatch):
    """Ids the tokenizer gives that the model's embedding does not have (a tokenizer with added
    tokens beyond the export's vocabulary) are refused before onnxruntime sees them."""

    class Big:
        def encode(self, text, add_special_tokens=True):
            return type("E", (), {"ids": [3, VOCAB + 5]})()

    monkeypatch.setattr(rt, "tokenizer", Big())
    with pytest.raises(ValueError, match=rf"the tokenized prompt\[1\] = {VOCAB + 5} is not a token id"):
        rt.encode(PROMPT)
    with pytest.raises(TypeError, match="add_special_tokens must be True or False"):
        rt.encode([1, 2], add_special_tokens="no")


# -- chat -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str \(or a list of content parts\), "
                                       r"got 5 \(int\)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": {"text": "x"}}],
     r"messages\[1\]\['content'\] must be a str"),
    ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\['content'\] as a list must hold content parts"),
    ([{"role": 1, "content": "hi"}], r"messages\[0\]\['role'\] must be a str"),
    ([{"role": "user", "content": "caf\udce9"}], r"messages\[0\]\['content'\] is not valid Unicode"),
])
def test_chat_names_the_bad_message(rt, messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        rt.chat(messages, 4)
    with pytest.raises(ChatTemplateError, match=message):
        rt.chat_stream(messages, 4)


def test_chat_content_parts_the_template_cannot_take(rt):
    """A list of content parts is valid for templates that iterate it; SmolLM2's concatenates
    strings, and the error then names the template and what to check, not just Python's words."""
    with pytest.raises(ChatTemplateError, match=r"chat template \(.*\) cannot render these messages \(TypeError: "
                                                r".*\); check that each message's content"):
        rt.chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 4)


def test_chat_options_are_checked(rt):
    chat = [{"role": "user", "content": "Hello"}]
    with pytest.raises(TypeError, match="max_new_tokens must be an integer >= 0, got 2.5"):
        rt.chat(chat, 2.5)
    with pytest.raises(TypeError, match="add_generation_prompt must be True or False"):
        rt.chat_ids(chat, add_generation_prompt="yes")


# -- Runtime.load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, message", [
    (dict(threads=-2), ValueError, r"threads must be an integer >= 1 \(None = onnxruntime's default, one per core\), "
                                   r"got -2"),
    (dict(threads=0), ValueError, r"threads must be an integer >= 1"),
    (dict(threads=2.5), TypeError, r"threads must be an integer >= 1 .* or None, got 2.5"),
    (dict(max_pending=-1), ValueError, r"max_pending must be an integer >= 0"),
    (dict(max_pending=2.5), TypeError, r"max_pending must be an integer >= 0"),
    (dict(kv_policy="lazy"), ValueError, r"kv_policy must be one of \['defer', 'fill'\], got 'lazy'"),
    (dict(thread_pool="global"), ValueError, r"thread_pool must be one of \['shared', 'session'\], got 'global'"),
    (dict(verify="no"), TypeError, r"verify must be True or False, got 'no'"),
    (dict(providers=123), TypeError, r"providers must be None \(onnxruntime on the CPU\), 'tensorrt', or a non-empty "
                                     r"list"),
    (dict(providers=[]), TypeError, r"providers must be None"),
    (dict(chat_template=5), TypeError, r"chat_template must be a path \(str or pathlib.Path\) or None, got 5"),
])
def test_load_names_the_bad_argument(chat_export, bad, error, message):
    with pytest.raises(error, match=message):
        Runtime.load(chat_export[0], **bad)


def test_load_folder_must_be_a_path():
    with pytest.raises(TypeError, match=r"folder must be a path \(str or pathlib.Path\), got 42"):
        Runtime.load(42)


# -- manifests ------------------------------------------------------------------------------------
@pytest.fixture
def export_copy(chat_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(chat_export[0], dst)
    return dst


def _edit_manifest(folder, edit) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))  # json writes NaN as a bare literal, and reads it back


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["calibration"].update(thresholds=[NAN] * 3), r"calibration.thresholds\[0\] must be a number \(not NaN\)"),
    (lambda m: m["calibration"]["by_target"].update({"0.9": [0.5, NAN, 0.5]}),
     r"calibration.by_target\['0.9'\]\[1\] must be a number \(not NaN\)"),
    (lambda m: m["model"].update(vocab_size=-97), r"model.vocab_size must be an integer >= 1, got -97"),
    (lambda m: m["model"].update(max_context=0), r"model.max_context must be an integer >= 1, got 0"),
    (lambda m: m["tokenizer"].update(eos_ids=[VOCAB]), rf"tokenizer.eos_ids\[0\] must be an integer in \[0, {VOCAB - 1}\]"),
    (lambda m: m["segments"][0].update(file="../segment_00.onnx"), r"segments\[0\].file must name a file inside"),
])
def test_bad_manifest_values_are_refused_at_load(export_copy, edit, message):
    _edit_manifest(export_copy, edit)
    with pytest.raises(ManifestError, match=message):
        Runtime.load(export_copy)


def test_tokenizer_files_are_checksummed(export_copy):
    """Tokenizer files are listed with size and sha256 like the graphs, and checked the same way."""
    m = json.loads((export_copy / "manifest.json").read_text())
    files = {f["file"]: f for f in m["tokenizer"]["files"]}
    assert "tokenizer.json" in files and all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())
    path = export_copy / "tokenizer.json"
    text = path.read_text()
    path.write_text(text.replace('"<unk>"', '"<unK>"', 1))  # same size, one token renamed
    assert path.stat().st_size == files["tokenizer.json"]["size"]
    with pytest.raises(ManifestError, match=r"tokenizer file tokenizer.json does not match its sha256"):
        Runtime.load(export_copy)
    path.write_text(text + " ")
    with pytest.raises(ManifestError, match=r"tokenizer file tokenizer.json is \d+ bytes, the manifest says"):
        Runtime.load(export_copy, verify=False)
    path.write_text(text)
    Runtime.load(export_copy)  # as exported: loads
    (export_copy / "tokenizer_config.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer file tokenizer_config.json is missing"):
        Runtime.load(export_copy)


def test_old_manifest_without_tokenizer_checksums_loads(export_copy):
    """Schema 2: tokenizer files by name, a threshold copy in each exit, a kv_layout string."""
    def to_v2(m):
        m["schema_version"] = 2
        m["tokenizer"]["files"] = [f["file"] for f in m["tokenizer"]["files"]]
        m["kv_layout"] = "batch,kv_heads,position,head_dim"
        for s in m["segments"][:-1]:
            s["exit"]["threshold"] = 0.0  # would make every token exit at once, were it read
    _edit_manifest(export_copy, to_v2)
    rt = Runtime.load(export_copy)
    assert rt.manifest.calibration.thresholds == (None, None, None)  # the one copy the runtime reads
    assert [r.segment for r in rt.generate(PROMPT, 6).records] == [3] * 6  # not the exits' 0.0 copies
