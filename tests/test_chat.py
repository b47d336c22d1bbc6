"""Chat on the device: templates rendered as transformers renders them, KV reuse across turns."""

import json
import shutil

import numpy as np
import pytest
from conftest import SMOLLM2_CHAT_TEMPLATE, char_tokenizer

from runtime import Runtime
from runtime.chat import ChatTemplate, ChatTemplateError
from runtime.prefix_cache import KeptSequence, common_prefix

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Tell me a story about \"quotes\" & <tags>."}],
]

# exercises what transformers adds to Jinja: tojson (no HTML escaping, indent), raise_exception,
# strftime_now, namespace, loop controls, special-token variables and extra kwargs
FEATURE_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tool first') }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "<{{ m['role'] }}>{{ m['content'] | tojson }}{{ eos_token }}\n{% endfor %}"
    "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "count={{ ns.n }} year={{ strftime_now('%Y') }} think={{ enable_thinking | default(true) }}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def hf_tokenizer(template: str):
    tok = char_tokenizer()
    tok.chat_template = template
    tok.bos_token, tok.eos_token = "^", "$"
    return tok


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_like_transformers(conversation, add_generation_prompt):
    template = SMOLLM2_CHAT_TEMPLATE.read_text()
    ref = hf_tokenizer(template).apply_chat_template(conversation, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
    ours = ChatTemplate(template, {"bos_token": "^", "eos_token": "$"}).render(
        conversation, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert "<|im_start|>" in ours  # the template really ran


def test_transformers_template_features(tmp_path):
    tools = [{"name": "add", "description": "a < b & c", "parameters": {"type": "object"}}]
    conv = CONVERSATIONS[2] + [{"role": "skip", "content": "x"}]
    tok = hf_tokenizer(FEATURE_TEMPLATE)
    for kwargs in ({}, {"enable_thinking": False}):
        ref = tok.apply_chat_template(conv, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
        # special tokens come from the saved tokenizer_config.json, as on a device
        tok.save_pretrained(tmp_path)
        ours = ChatTemplate.from_folder(tmp_path).render(conv, tools=tools, **kwargs)
        assert ours == ref
    assert '"a < b & c"' in ours and "count=3" in ours
    with pytest.raises(ChatTemplateError, match="no tool first"):
        ChatTemplate(FEATURE_TEMPLATE).render([{"role": "tool", "content": "x"}])


def test_template_sources_and_bad_input(tmp_path):
    assert ChatTemplate.from_folder(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "$", "special": True},
         "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}{{ eos_token }}"},
                           {"name": "tool_use", "template": "T"}]}))
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "a"}]) == "a$"
    assert ChatTemplate.from_folder(tmp_path, name="tool_use").render([{"role": "user"}]) == "T"
    with pytest.raises(ChatTemplateError, match="no chat template named 'x'"):
        ChatTemplate.from_folder(tmp_path, name="x")
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")  # preferred, as in transformers
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "a"}]) == "J1"
    t = ChatTemplate("{{ messages[0]['content'] }}")
    for bad in ([], "hello", [{"content": "no role"}]):
        with pytest.raises(ChatTemplateError):
            t.render(bad)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}").render([{"role": "user", "content": "a"}])
    with pytest.raises(Exception, match="unsafe|underscore|access"):  # the sandbox holds
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "a"}])


def test_template_travels_in_the_export(chat_export):
    folder, bb = chat_export
    rt = Runtime.load(folder)
    assert rt.manifest.tokenizer.chat_template == "chat_template.jinja"
    conv = CONVERSATIONS[1]
    ref = bb.tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert rt.chat_ids(conv).tolist() == list(ref)


def test_no_template_is_a_clear_error(chat_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(chat_export[0], dst)
    (dst / "chat_template.jinja").unlink()
    m = json.loads((dst / "manifest.json").read_text())
    m["tokenizer"]["chat_template"] = None
    m["tokenizer"]["files"] = [f for f in m["tokenizer"]["files"] if f["file"] != "chat_template.jinja"]
    (dst / "manifest.json").write_text(json.dumps(m))
    rt = Runtime.load(dst)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        rt.chat(CONVERSATIONS[0], 4)
    rt = Runtime.load(dst, chat_template=SMOLLM2_CHAT_TEMPLATE)  # supplied by the caller
    assert len(rt.chat(CONVERSATIONS[0], 4).tokens) == 4


class CountingBackend:
    """Counts the positions segment 0 is given: what a call really pre-fills."""

    def __init__(self, inner):
        self.inner, self.input_names, self.fed = inner, inner.input_names, 0

    def run(self, feeds):
        self.fed += feeds["input_ids"].shape[1]
        return self.inner.run(feeds)


@pytest.mark.parametrize("thresholds", ["never", [0.2, 0.2, 0.2]])
def test_second_turn_prefills_only_new_tokens(chat_export, thresholds):
    rt = Runtime.load(chat_export[0])
    counter = rt.backends[0] = CountingBackend(rt.backends[0])
    conv = [{"role": "user", "content": "Hello there"}]
    first = rt.chat(conv, 12, thresholds=thresholds)
    assert first.cached_tokens == 0 and counter.fed == len(first.prompt_tokens) + 11
    conv += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    counter.fed = 0
    second = rt.chat(conv, 12, thresholds=thresholds)
    held = len(first.prompt_tokens) + len(first.tokens) - 1  # the last reply token was never fed
    assert second.cached_tokens == held
    assert counter.fed == len(second.prompt_tokens) - held + 11  # new prompt tokens + 11 decode steps
    assert second.prefill_tokens == len(second.prompt_tokens) - held
    if thresholds != "never":
        assert any(r.segment < 3 for r in first.records + second.records)  # exits really happened
    fresh = Runtime.load(chat_export[0]).generate(second.prompt_tokens, 12, thresholds=thresholds)
    assert fresh.tokens == second.tokens and fresh.cached_tokens == 0


def test_edited_conversation_reprefills_from_the_first_difference(chat_export):
    rt = Runtime.load(chat_export[0])
    conv = [{"role": "user", "content": "Hello there, how are you?"}]
    a = rt.chat(conv, 6)
    edited = [{"role": "user", "content": "Hello there, who are you?"}]
    b = rt.chat(edited, 6)
    assert 0 < b.cached_tokens == common_prefix(a.prompt_tokens, b.prompt_tokens) < len(a.prompt_tokens)
    assert b.tokens == Runtime.load(chat_export[0]).chat(edited, 6).tokens
    same = rt.chat(edited, 6)  # the same prompt again: all but its last token come from the cache
    assert same.cached_tokens == len(same.prompt_tokens) - 1 and same.tokens == b.tokens
    rt.reset()
    assert rt.chat(edited, 6).cached_tokens == 0
    assert rt.generate(b.prompt_tokens, 6).cached_tokens == 0  # plain generate never reuses unless asked


def test_truncated_cache_equals_a_fresh_one(chat_export):
    """Cut after exits of every kind (pending deferred states included) == fed only the prefix."""
    rt = Runtime.load(chat_export[0])
    ids = rt.encode("It is a truth universally acknowledged").tolist()
    pattern = [3, 0, 1, 0, 2, 0, 0, 3, 1]
    cache = rt.new_cache()
    steps = [ids[:4]] + [[t] for t in ids[4:4 + len(pattern) - 1]]
    for x, j in zip(steps, pattern):
        rt.step(np.array(x), cache, [float("inf")] * j + [0.0] * (3 - j))
    p = 7
    ref = rt.new_cache()
    for x, j in zip([ids[:4]] + [[t] for t in ids[4:p]], pattern):
        rt.step(np.array(x), ref, [float("inf")] * j + [0.0] * (3 - j))
    cache.truncate(p)
    assert cache.position == ref.position == p
    # the cut cache may hold as computed KV what the fresh one still holds as deferred states;
    # fed the same tokens with every exit off, both must give the same tokens and, once caught
    # up, the same keys and values in every layer
    never = rt.resolve_thresholds("never")
    for t in ids[p:p + 4]:
        a, b = rt.step(np.array([t]), cache, never), rt.step(np.array([t]), ref, never)
        assert a[:2] == b[:2]
    for x, y in zip(cache.segments, ref.segments):
        assert x.length == y.length == p + 4 and x.pending is None and y.pending is None
        for u, v in zip(x.keys + x.values, y.keys + y.values):
            np.testing.assert_allclose(u, v, atol=1e-5)
    with pytest.raises(ValueError, match=r"cannot truncate to 99: the cache holds positions \[0, 11\)"):
        cache.truncate(99)
    kept = KeptSequence(ids, cache)
    assert kept.reuse_for(ids[:1]) is None  # nothing to reuse: the one token must be fed


def test_interleaved_streams_do_not_share_a_cache(chat_export):
    rt = Runtime.load(chat_export[0])
    conv = [{"role": "user", "content": "Hello there"}]
    ref = Runtime.load(chat_export[0])
    want_a, want_b = ref.chat(conv, 8).tokens, ref.chat(conv, 8).tokens
    a = rt.chat_stream(conv, 8)
    next(a)
    b = rt.chat(conv, 8)  # while `a` is suspended: must not reuse (and mutate) a's cache
    assert b.cached_tokens == 0 and b.tokens == want_a
    assert a.result().tokens == want_a
    again = rt.chat(conv, 8)  # now the kept cache is a's
    assert again.cached_tokens == len(again.prompt_tokens) - 1 and again.tokens == want_b == want_a
