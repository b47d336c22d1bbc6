"""Streaming text pieces: complete characters only, equal to the full decode, linear work.

Uses the real byte-fallback sentencepiece tokenizer of karpathy/stories260K (../shared/hf-cache):
"😀" is four byte tokens <0xF0><0x9F><0x98><0x80>, whose prefixes decode to U+FFFD.
"""

import pytest
from conftest import HF_CACHE, requires_stories

from runtime.detokenize import IncrementalDecoder

pytestmark = requires_stories
TEXTS = ["Café 😀 日本", "Once upon a time, Zoë ate crème brûlée 🍰🍰 in 東京.\nThe end ✓",
         "ünïcödé everywhere: αβγ δ, 😀😀😀, 한국어"]


class CountingTokenizer:
    """The real tokenizer, counting how many token ids it is asked to decode in total."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    path = next((HF_CACHE / "models--karpathy--stories260K" / "snapshots").glob("*/tokenizer.json"))
    return Tokenizer.from_file(str(path))


def stream(tok, ids):
    dec = IncrementalDecoder(tok)
    return [dec.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_complete_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback really happens
    assert "\ufffd" in tokenizer.decode(ids[:ids.index(next(i for i in ids if tokenizer.id_to_token(i).startswith("<0x"))) + 1])
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), pieces


def test_work_is_linear(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False).ids
    counting = CountingTokenizer(tokenizer)
    pieces = stream(counting, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    # each token is decoded a bounded number of times (the old way: n^2 / 2 ids in all)
    assert counting.decoded <= 4 * 8 * len(ids), (counting.decoded, len(ids))


def test_final_flushes_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False).ids[:-1]  # cut inside the emoji
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.add(t) for t in ids[:-1]]
    assert "".join(pieces) == "ok "  # the partial emoji is held back...
    last = dec.add(ids[-1], final=True)  # ...until the stream ends: then nothing is lost
    assert "\ufffd" in last and "".join(pieces) + last == tokenizer.decode(ids)
