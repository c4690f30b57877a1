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


def chars_per_token(model: LoadedModel) -> int:
    """The most characters one token of ``model`` can cover: its vocabulary's longest entry, at least
    MIN_CHARS_PER_TOKEN. Computed once per model."""
    if "chars_per_token" not in model.extra:
        model.extra["chars_per_token"] = max(MIN_CHARS_PER_TOKEN, _longest_token(model.tokenizer))
    return model.extra["chars_per_token"]


def char_limit(model: LoadedModel, tokens: int | None = None) -> int | None:
    """The most characters of a text that can matter to ``model`` when ``tokens`` tokens of it are read (default its
    context): that many tokens times ``chars_per_token``; None when the model states no context."""
    tokens = tokens or model.max_context
    return tokens * chars_per_token(model) if tokens else None


def _longest_token(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest entry: no fewer than the text characters the token covers (a
    byte-level entry has one character per byte; a SentencePiece one writes its space as one)."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=0)
    except Exception:  # not a transformers tokenizer (a loader's own): the floor applies
        return 0


def row_lengths(model: LoadedModel, batch: Batch) -> list[int]:
    """Each row's tokens at most, before any tokenizer runs (for the bounds a request is checked against before any
    work): its token ids' count, or its characters plus two special tokens (a subword vocabulary's tokens never
    outnumber the characters they cover), at most the model's context."""
    if batch.token_ids is not None:
        lengths = [len(ids) for ids in batch.token_ids]
    else:
        lengths = [len(text) + 2 for text in batch.texts]
    return [min(n, model.max_context) for n in lengths] if model.max_context else lengths


def fit_text(
    model: LoadedModel, text: str, field: str, *, truncate: bool = False, tokens: int | None = None, **where: Any
) -> str:
    """``text`` as a tokenizer may see it: every caller that tokenizes a request's text passes it through here first
    (the scheduler's batches through ``fit_texts``), so that a many-megabyte text is never tokenized whole, on any
    thread. Longer than ``tokens`` tokens (default the model's context) could cover, it is cut (``truncate``) or
    InvalidField naming ``field`` (and ``where``, such as the ``row``), which repeats none of it."""
    limit = char_limit(model, tokens)
    if limit is None or len(text) <= limit:
        return text
    if truncate:
        return text[:limit]
    if tokens == 1:
        what = "are longer than any one token of this model"
    elif tokens:
        what = f"exceed what {tokens} tokens of this model can hold"
    else:
        what = f"exceed what the model can read: its context is {model.max_context} tokens"
    raise InvalidField(
        f"{field}: {len(text)} characters {what}, at most {limit} characters",
        field=field,
        allowed=f"at most {limit} characters",
        **where,
    )


def fit_texts(model: LoadedModel, batch: Batch) -> tuple[Batch, tuple[int, ...]]:
    """``batch`` with every text through ``fit_text`` (cut with ``batch.truncate``), and the rows it cut."""
    limit = char_limit(model)
    if limit is None or batch.token_ids is not None:
        return batch, ()
    cut = tuple(i for i, t in enumerate(batch.texts) if len(t) > limit)
    if not cut:
        return batch, ()
    field = "prompt" if batch.generation is not None else "text"
    several = len(batch.texts) > 1
    texts = tuple(
        fit_text(model, t, field, truncate=batch.truncate, **({"row": i} if several else {}))
        for i, t in enumerate(batch.texts)
    )
    return attrs.evolve(batch, texts=texts), cut


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
    InvalidField naming ``token_ids``, ``prompt`` (generation) or ``text``, and the ``row`` of a batch of several;
    a generation whose named ``max_tokens`` would pass the context after its prompt, naming ``max_tokens``.
    ``cut_text(text, limit)`` tokenizes a text cut to ``limit`` tokens (a tokenizer that keeps its closing special
    tokens); without it the ids are sliced.
    """
    if batch.token_ids is not None:
        field = "token_ids"
        inputs = [[int(t) for t in ids] for ids in batch.token_ids]
        for i, ids in enumerate(inputs):
            bad = [t for t in ids if vocab_size is not None and not 0 <= t < vocab_size]
            if bad:
                raise InvalidField(
                    f"{field}: ids {bad[:5]} are outside the vocabulary",
                    field=field,
                    allowed=f"0 to {(vocab_size or 1) - 1}",
                    **({"row": i} if len(inputs) > 1 else {}),
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
        if max_context and batch.generation is not None and not batch.params(i).fit_context:
            asked, room = batch.params(i).max_tokens, max_context - len(inputs[i])
            if asked > room:  # vLLM's and OpenAI's refusal: never a generation cut short of what was named
                raise InvalidField(
                    f"max_tokens: {asked} after the prompt's {len(inputs[i])} tokens passes the model's context of "
                    f"{max_context}",
                    field="max_tokens",
                    allowed=f"0 to {max(room, 0)}",
                    **where,
                )
    check_edit_positions(batch, inputs)
    return inputs, truncated


def check_edit_positions(batch: Batch, inputs: list[list[int]]) -> None:
    """Every explicit position of a row's edits inside its final sequence (its prompt and what it may generate; a
    negative index counts from the end of the prompt): one outside is InvalidField naming
    ``interventions[k].positions`` (k the edit's place in the row's list), never an edit silently skipped."""
    for i, ids in enumerate(inputs):
        longest = len(ids) + (batch.params(i).max_tokens if batch.generation is not None else 0)
        for k, edit in enumerate(batch.edits(i)):
            if isinstance(edit.positions, str):
                continue
            outside = [p for p in edit.positions if not -len(ids) <= p < longest]
            resolved = [p if p >= 0 else len(ids) + p for p in edit.positions]
            rows = edit.vector is not None and edit.vector.ndim == 2 and edit.op != "ablate"
            if rows and not outside and len(set(resolved)) < len(resolved):  # 0 and -T: one token, two rows
                field = f"interventions[{k}].positions"
                raise InvalidField(
                    f"{field}: {list(edit.positions)} names one token twice in a prompt of {len(ids)} tokens, "
                    "each with its own row of the vector",
                    field=field,
                    allowed="distinct token positions (a negative index counts from the end of the prompt)",
                    **({"row": i} if len(inputs) > 1 else {}),
                )
            if outside:
                field = f"interventions[{k}].positions"
                raise InvalidField(
                    f"{field}: {outside[:3]} outside a sequence of {len(ids)} prompt tokens"
                    + (f" and up to {longest - len(ids)} generated" if longest > len(ids) else ""),
                    field=field,
                    allowed=f"integers from {-len(ids)} to {longest - 1}",
                    **({"row": i} if len(inputs) > 1 else {}),
                )


def check_vocabulary(rows: list[list[int]], vocab: int | None, field: str, flat: bool = False) -> None:
    """Token ids are the model's own: one outside its vocabulary is InvalidField naming ``field[i][j]`` (``field[j]``
    for a flat list of ids)."""
    for i, row in enumerate(rows):
        for j, token in enumerate(row):
            if token < 0 or (vocab is not None and token >= vocab):
                where = f"{field}[{j}]" if flat else f"{field}[{i}][{j}]"
                raise InvalidField(
                    f"{where}: token id {token} is outside the model's vocabulary"
                    + (f" of {vocab} tokens" if vocab is not None else ""),
                    field=where,
                    allowed=f"0 to {vocab - 1}" if vocab is not None else "non-negative token ids",
                )


def vocabulary_size(model: LoadedModel) -> int | None:
    """How many token ids the model reads: its config's ``vocab_size``, else its tokenizer's length, else the rows
    of its declared LM head (a loader's own tokenizer may have no length, and its config no ``vocab_size``)."""
    size = (model.ref.config or {}).get("vocab_size")
    if isinstance(size, int) and size > 0:
        return size
    try:
        return len(model.tokenizer)
    except TypeError:
        head = model.parts.lm_head if model.parts is not None else None
        rows = getattr(head, "out_features", None)
        return rows if isinstance(rows, int) and rows > 0 else None


def texts_or_ids(value: Any, field: str) -> tuple[list[str], list[list[int]] | None]:
    """OpenAI's shapes of ``input`` or ``prompt``: a string, strings, token ids, or lists of token ids. Returns
    (texts, None) or ([], token id rows); anything else is InvalidField naming ``field``. A flat list of ids is
    one row."""
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str) and value:
        return [value], None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value), None
    if isinstance(value, list) and value and all(_is_id(v) for v in value):
        return [], [list(value)]
    if isinstance(value, list) and value and all(isinstance(r, list) and r and all(map(_is_id, r)) for r in value):
        return [], [list(r) for r in value]
    raise InvalidField(f"{field}: must be {shapes}, none of them empty", field=field, allowed=shapes)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tokenize_rows(model: LoadedModel, batch: Batch) -> tuple[Batch, list[InvalidField | None]]:
    """``batch`` with token ids, each row tokenized and checked alone (off the event loop, before it is queued):
    the rows that pass, and per row of ``batch`` its refusal (the field at fault, as ``batch_inputs`` names it) or
    None. A refused row is its own result; the others run without it."""
    tok = model.tokenizer
    special = batch.add_special_tokens

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=special)["input_ids"]

    def cut(text: str, limit: int) -> list[int]:
        try:  # the tokenizer cuts, and keeps its closing special tokens ([SEP], ...) where it adds them
            return tok(text, add_special_tokens=special, truncation=True, max_length=limit)["input_ids"]
        except TypeError:  # a loader's own tokenizer without those arguments
            return tokenize(text)[:limit]

    batch, _ = fit_texts(model, batch)
    vocab = vocabulary_size(model)
    kept: list[int] = []
    ids: list[tuple[int, ...]] = []
    refused: list[InvalidField | None] = []
    for i in range(batch.size):
        one = _rows(batch, [i], None)
        try:
            inputs, _ = batch_inputs(
                one, tokenize=tokenize, vocab_size=vocab, max_context=model.max_context, cut_text=cut
            )
        except InvalidField as exc:
            refused.append(exc)
            continue
        refused.append(None)
        kept.append(i)
        ids.append(tuple(inputs[0]))
    return _rows(batch, kept, ids), refused


def _rows(batch: Batch, keep: list[int], ids: list[tuple[int, ...]] | None) -> Batch:
    """The rows ``keep`` of ``batch`` (with ``ids`` as their token ids when given)."""
    if ids is None:
        ids_of = [batch.token_ids[i] for i in keep] if batch.token_ids is not None else None
    else:
        ids_of = ids
    return attrs.evolve(
        batch,
        texts=() if ids_of is not None else tuple(batch.texts[i] for i in keep),
        token_ids=tuple(ids_of) if ids_of is not None else None,
        row_generation=tuple(batch.row_generation[i] for i in keep) if batch.row_generation else None,
        interventions=tuple(batch.edits(i) for i in keep) if batch.interventions else (),
    )
