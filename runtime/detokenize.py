"""Turn a stream of token ids into text pieces that are always complete characters.

Why not `decode(ids)[len(previous):]` per token: a byte-fallback tokenizer (Llama,
SmolLM2's BPE over bytes) spells "é" or "😀" as several byte tokens, and a prefix that ends
inside a character decodes to U+FFFD, so the stream would show "Café ���" where the text
says "Café 😀"; and decoding the whole output at every token is quadratic in its length.

The decoder keeps a small window: the tokens of the last emitted piece (context, so
decoders that strip or merge at the start of a string behave as they do mid-text) and
the tokens not yet emitted. A piece is emitted when the window's text grew past the
context and does not end in U+FFFD, i.e. the last character is complete. Each token is
decoded O(1) times in a window of a few tokens, so the whole stream is linear. Same
approach as Hugging Face's TextStreamer / vLLM's incremental detokenizer.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
MAX_PENDING = 8  # a UTF-8 character is at most 4 byte tokens: past this, a U+FFFD is real


class Decodes(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDecoder:
    """Feed tokens one by one with `add`; concatenated pieces equal `decode(all tokens)`
    for tokenizers whose decoding of a prefix is a prefix of the whole (all real ones we ship)."""

    def __init__(self, tokenizer: Decodes):
        self._decode = tokenizer.decode
        self._ids: list[int] = []  # context tokens, then pending ones
        self._read = 0  # self._ids[:_read] is the context: already emitted
        self._done = ""  # decode(self._ids[:_read])

    def flush(self) -> str:
        """What is still pending (an incomplete character decodes to U+FFFD), e.g. at the end."""
        text = self._decode(self._ids)
        piece = text[len(self._done):]
        self._read, self._done = len(self._ids), text
        return piece

    def add(self, token: int, *, final: bool = False) -> str:
        """The new complete text after `token` ("" while a character is incomplete).
        `final=True` flushes everything, an incomplete character included (as U+FFFD)."""
        self._ids.append(int(token))
        text = self._decode(self._ids)
        pending = len(self._ids) - self._read
        complete = len(text) > len(self._done) and not text.endswith(REPLACEMENT)
        if not (complete or final or pending >= MAX_PENDING):
            return ""
        piece = text[len(self._done):]
        # the tokens just emitted become the next window's context; older ones are dropped
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._done = self._decode(self._ids)
        return piece
