"""Generated text, token by token, at a cost per token that does not grow with the text.

``Detokenizer.push(token)`` returns the text the token adds. The concatenation equals ``tokenizer.decode(generated,
skip_special_tokens=True)``: with a fast tokenizer through its ``tokenizers`` ``DecodeStream`` (which keeps the few
tokens a piece depends on), with any other through two decodes of a short window, as vLLM's detokenizer does (the
difference of the window's text with and without the new token: the window's start is decoded alike both times,
so a SentencePiece-style leading space does not go missing). A piece that ends in an incomplete UTF-8 character
(U+FFFD) waits for the token that completes it.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._stream = _decode_stream(tokenizer)
        self._ids: list[int] = []
        self._prefix = 0  # the window: ids[prefix:read] were decoded into text already
        self._read = 0

    def push(self, token: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._fast, token) or ""
        self._ids.append(token)
        before = decode(self.tokenizer, self._ids[self._prefix : self._read])
        after = decode(self.tokenizer, self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    @property
    def _fast(self) -> Any:
        return self.tokenizer._tokenizer


def decode(tokenizer: Any, ids: list[int]) -> str:
    """``ids`` as text, special tokens left out (what a generation's ``text`` is)."""
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a loader's own tokenizer without that argument
        return tokenizer.decode(ids)


def _decode_stream(tokenizer: Any) -> Any:
    """The ``tokenizers`` library's incremental decoder, where the tokenizer is a fast one whose decode adds nothing
    of its own (no clean-up of spaces around punctuation); else None."""
    fast = getattr(tokenizer, "_tokenizer", None)
    if fast is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    return DecodeStream(skip_special_tokens=True)
