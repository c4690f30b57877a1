"""A batch's rows as token ids, checked before any forward pass: shared by loader plugins so that every loader
names the same field and row for the same mistake; and texts cut to what a model can read before any tokenizer
sees them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from loom_kernel.errors import InvalidField
from loom_kernel.types import Batch, LoadedModel

# The fewest characters a token is assumed to cover at most, when the vocabulary's longest entry is shorter: a
# WordPiece [UNK] stands for a whole word, and whitespace may cover no token at all.
MIN_CHARS_PER_TOKEN = 32


def char_limit(model: LoadedModel) -> int | None:
    """The most characters of a text that can matter to ``model``: its context times the longest token's length
    (at least MIN_CHARS_PER_TOKEN); None when the model states no context. Computed once per model."""
    if not model.max_context:
        return None
    if "char_limit" not in model.extra:
        model.extra["char_limit"] = model.max_context * max(MIN_CHARS_PER_TOKEN, _longest_token(model.tokenizer))
    return model.extra["char_limit"]


def _longest_token(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest entry: no fewer than the text characters the token covers (a
    byte-level entry has one character per byte; a SentencePiece one writes its space as one)."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=0)
    except Exception:  # not a transformers tokenizer (a loader's own): the floor applies
        return 0


def fit_texts(model: LoadedModel, batch: Batch) -> Batch:
    """``batch`` with every text cut to ``char_limit`` (with ``batch.truncate``), else InvalidField for a text past
    it: a many-megabyte text is never tokenized whole, on any thread."""
    limit = char_limit(model)
    if limit is None or batch.token_ids is not None or all(len(t) <= limit for t in batch.texts):
        return batch
    if batch.truncate:
        return attrs.evolve(batch, texts=tuple(t[:limit] for t in batch.texts))
    row = next(i for i, t in enumerate(batch.texts) if len(t) > limit)
    field = "prompt" if batch.generation is not None else "text"
    raise InvalidField(
        f"{field}: {len(batch.texts[row])} characters exceed what the model can read: its context is "
        f"{model.max_context} tokens, at most {limit} characters",
        field=field,
        allowed=f"at most {limit} characters",
        **({"row": row} if len(batch.texts) > 1 else {}),
    )


def batch_inputs(
    batch: Batch,
    *,
    tokenize: Callable[[str], list[int]],
    vocab_size: int | None,
    max_context: int | None,
    cut_text: Callable[[str, int], list[int]] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Token ids per row and which rows were cut to ``max_context``.

    Ids outside the vocabulary, an empty row, or a row longer than the context (unless ``batch.truncate``) are
    InvalidField naming ``token_ids``, ``prompt`` (generation) or ``text``, and the ``row`` of a batch of several.
    ``cut_text(text, limit)`` tokenizes a text cut to ``limit`` tokens (a tokenizer that keeps its closing special
    tokens); without it the ids are sliced.
    """
    if batch.token_ids is not None:
        field = "token_ids"
        inputs = [[int(t) for t in ids] for ids in batch.token_ids]
        for ids in inputs:
            bad = [t for t in ids if vocab_size is not None and not 0 <= t < vocab_size]
            if bad:
                raise InvalidField(
                    f"{field}: ids {bad[:5]} are outside the vocabulary",
                    field=field,
                    allowed=f"0 to {(vocab_size or 1) - 1}",
                )
    else:
        field = "prompt" if batch.generation is not None else "text"
        inputs = [[int(t) for t in tokenize(text)] for text in batch.texts]
    truncated = [False] * len(inputs)
    for i, ids in enumerate(inputs):
        where = {"row": i} if len(inputs) > 1 else {}
        if not ids:
            raise InvalidField(f"{field}: tokenizes to no tokens", field=field, **where)
        if max_context and len(ids) > max_context:
            if not batch.truncate:
                raise InvalidField(
                    f"{field}: {len(ids)} tokens exceed the model's context of {max_context}",
                    field=field,
                    allowed=f"at most {max_context} tokens",
                    **where,
                )
            truncated[i] = True
            if batch.token_ids is None and cut_text is not None:
                inputs[i] = [int(t) for t in cut_text(batch.texts[i], max_context)]
            else:
                inputs[i] = ids[:max_context]
    return inputs, truncated


def check_vocabulary(rows: list[list[int]], vocab: int | None, field: str, flat: bool = False) -> None:
    """Token ids are the model's own: one outside its vocabulary is InvalidField naming ``field[i][j]`` (``field[j]``
    for a flat list of ids)."""
    for i, row in enumerate(rows):
        for j, token in enumerate(row):
            if token < 0 or (vocab is not None and token >= vocab):
                where = f"{field}[{j}]" if flat else f"{field}[{i}][{j}]"
                raise InvalidField(
                    f"{where}: token id {token} is outside the model's vocabulary of {vocab} tokens",
                    field=where,
                    allowed=f"0 to {(vocab or 1) - 1}",
                )


def vocabulary_size(model: LoadedModel) -> int | None:
    """How many token ids the model reads: its config's ``vocab_size``, else its tokenizer's length."""
    size = (model.ref.config or {}).get("vocab_size")
    if isinstance(size, int) and size > 0:
        return size
    try:
        return len(model.tokenizer)
    except TypeError:
        return None
