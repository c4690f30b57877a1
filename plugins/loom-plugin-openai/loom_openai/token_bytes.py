"""A token's own UTF-8 bytes, for chat logprobs' ``bytes``: OpenAI's clients join them to rebuild a character that
is split across tokens, which the token's decoded text (U+FFFD for a part of a character) cannot give."""

from __future__ import annotations

import functools
import re
from typing import Any

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback (Llama 2, Gemma)


@functools.cache
def byte_of() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2, Llama 3, Qwen): the character that stands for each byte, reversed."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(shifted)}}


def token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """The bytes of token ``token_id``, whose decoded text is ``text``: that text's UTF-8, unless the token holds a
    part of a character (the text then has U+FFFD), where they are read off the token's vocabulary piece."""
    if "\ufffd" not in text:
        return list(text.encode("utf-8"))
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if isinstance(piece, str) and (m := BYTE_PIECE.fullmatch(piece)):
        return [int(m[1], 16)]
    table = byte_of()
    if isinstance(piece, str) and piece and all(c in table for c in piece):
        return [table[c] for c in piece]
    return list(text.encode("utf-8"))
