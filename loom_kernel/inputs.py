"""A batch's rows as token ids, checked before any forward pass: shared by loader plugins so that every loader
names the same field and row for the same mistake."""

from __future__ import annotations

from collections.abc import Callable

from loom_kernel.errors import InvalidField
from loom_kernel.types import Batch


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
