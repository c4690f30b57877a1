"""One batched pass through a SentenceTransformer: the model's own pooled output, plus hook-captured states of the
underlying transformer.

Contract of ``run_batch`` (one ``SequenceOutput`` per input row):

- ``pooled`` is the pipeline's ``sentence_embedding`` (Pooling, Dense, Normalize as configured) as a CPU float32
  tensor [D]: what ``SentenceTransformer.encode`` returns for the row.
- ``states[key]`` holds the row's own tokens only (either padding side), rows selected as ``capture.positions``
  asks ("last" keeps the last real token, anything else every token), in the index space of transformers'
  ``output_hidden_states``: 0 the embedding output, N the last block's output.
- Inputs go through the model's own preprocessing (its default prompt, special tokens, a chat template where the
  tokenizer has one, and its ``max_seq_length``, which is ``LoadedModel.max_context``); a row whose preprocessed
  tokens are more than that is InvalidField unless ``batch.truncate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from loom_kernel import (
    Batch,
    Capture,
    ForwardOutput,
    InvalidField,
    LoadedModel,
    SequenceOutput,
    StateRecorder,
    Unsupported,
    check_edit_positions,
    find_blocks,
    row_edits,
)
from loom_kernel import Layout as EditLayout
from loom_sentence_transformers.packing import Layout, agrees, packable, run_packed, window

log = logging.getLogger("loom.sentence_transformers")


def run_batch(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    import torch

    if batch.generation is not None:
        raise Unsupported(
            f"model: {model.ref.id!r} is an embedding model and cannot generate; use /embed or /extract",
            field="model",
        )
    if capture.attention:
        raise Unsupported(
            "return_attention: the sentence-transformers loader does not capture attention weights; "
            'load the model with loader "transformers" for them',
            field="return_attention",
        )
    st = model.model
    features, truncated = _features(model, batch)
    edit = _edit(batch, features["attention_mask"]) if batch.interventions else None
    layout = _layout(model, features) if edit is None else None  # edits place their columns in the padded rows
    edited = {e.site for row in batch.interventions for e in row}
    rec = _recorder(model, capture, edit, edited)
    handles = []
    if model.num_layers in edited:
        # Index N is the transformer module's token_embeddings, which the pipeline's next modules read.
        def edit_last(module: Any, args: Any, out: dict[str, Any]) -> None:
            out["token_embeddings"] = edit(model.num_layers, out["token_embeddings"])

        handles.append(st[0].register_forward_hook(edit_last))
    try:
        with torch.inference_mode():
            out = st(dict(features)) if layout is None else run_packed(st, features, layout)
        taken = rec.taken() if rec is not None else {}
    finally:
        if rec is not None:
            rec.close()
        for handle in handles:
            handle.remove()
    if layout is not None:
        taken = {index: layout.unpack(states) for index, states in taken.items()}
    if model.num_layers in capture.indices:
        # sentence-transformers calls the transformer's forward() directly, so a hook on the model itself never
        # fires; index N is its last_hidden_state, which the pipeline hands on as token_embeddings.
        taken[model.num_layers] = out["token_embeddings"].detach().cpu()
    mask = features["attention_mask"].bool().cpu()
    ids = features["input_ids"].cpu()
    pooled = out["sentence_embedding"].detach().float().cpu()
    rows = []
    for i in range(len(truncated)):
        real = mask[i].nonzero().flatten()  # this row's own columns, whichever side the padding is on
        cols = real[-1:] if capture.positions == "last" else real
        rows.append(
            SequenceOutput(
                token_ids=ids[i, real].tolist(),
                prompt_tokens=len(real),
                positions=capture.kept_positions(len(real)),
                # A copy per row, so that no row keeps the whole padded batch alive.
                states={sel.key: taken[sel.index][i].index_select(0, cols) for sel in capture.layers},
                pooled=pooled[i].clone(),
                truncated=truncated[i],
            )
        )
    return ForwardOutput(rows=rows)


def _layout(model: LoadedModel, features: dict[str, Any]) -> Layout | None:
    """How to pack this batch, or None to run it padded (one row, little padding, or a model that cannot pack)."""
    import torch

    if "packing" not in model.extra and not packable(model.model):
        model.extra["packing"] = False  # decided once: the pipeline's modules do not change
    if model.extra.get("packing") is False:
        return None
    mask = features["attention_mask"].cpu()
    # Left padding shifts the rows' positions (BERT numbers padded columns too): packing, which counts every row
    # from 0, would change what such a batch computes, so only right-padded batches pack.
    if not bool((mask.cumprod(1).sum(1) == mask.sum(1)).all()):
        return None
    limit = window(getattr(model.model[0].model, "config", None))
    if limit is not None and int(mask.sum(1).max()) > limit:
        return None  # a text past the window of the model's local blocks: only its own mask keeps the window
    layout = Layout(mask)
    if not layout.worth_it:
        return None
    if "packing" not in model.extra:
        try:
            with torch.inference_mode():
                model.extra["packing"] = agrees(model.model, features, layout)
        except Exception:  # a model that rejects position_ids or a 4D mask
            model.extra["packing"] = False
        how = "packed" if model.extra["packing"] else "padded (packed rows did not match padded ones)"
        log.info("%s: merged batches of texts run %s", model.ref.id, how)
    return layout if model.extra["packing"] else None


def _edit(batch: Batch, mask: Any) -> Callable[[int, Any], Any]:
    """Each row's edits at the columns of its own tokens (either padding side); an edit's position outside its row
    is InvalidField (``check_edit_positions``), never an edit silently skipped."""
    check_edit_positions(batch, [[0] * int(n) for n in mask.sum(1).tolist()])
    places = []
    for row in mask.bool().cpu():
        real = row.nonzero().flatten()
        count = len(real)
        places.append(EditLayout(col=int(real[0]) if count else 0, tok=0, count=count, prompt=count))
    return row_edits([batch.edits(i) for i in range(len(places))], places)


def _recorder(
    model: LoadedModel, capture: Capture, edit: Callable[[int, Any], Any] | None, edited: set[int | str]
) -> StateRecorder | None:
    # Index N comes from (and is edited in) the pipeline's output.
    inner = [i for i in capture.indices if i != model.num_layers] if capture.wanted else []
    inner_edits = sorted(int(i) for i in edited if i != model.num_layers)
    if not inner and not inner_edits:
        return None
    if "blocks" not in model.extra:
        hf = model.model.transformers_model
        if hf is None or not model.num_layers:
            raise Unsupported(
                f"hidden_state_layers: {model.ref.id!r} has no transformer layers to capture",
                field="hidden_state_layers",
            )
        model.extra["base"], model.extra["blocks"] = find_blocks(hf, model.num_layers)
    rec = StateRecorder(model.extra["base"], model.extra["blocks"], inner, edit=edit, edited=inner_edits)
    rec.rows, rec.replace = None, False  # rows end at different columns: keep every column, slice per row
    return rec


def _too_long(field: str, n: int, limit: int, row: int, rows: int) -> InvalidField:
    return InvalidField(
        f"{field}: {n} tokens exceed the model's limit of {limit} tokens (its max_seq_length)",
        field=field,
        allowed=f"at most {limit} tokens",
        **({"row": row} if rows > 1 else {}),
    )


def _features(model: LoadedModel, batch: Batch) -> tuple[dict[str, Any], list[bool]]:
    """Model-ready tensors for the batch, on the model's device, and which rows were cut to the limit."""
    st, tok = model.model, model.tokenizer
    limit = model.max_context
    if batch.token_ids is None and batch.add_special_tokens:
        # The model's own preprocessing, as encode() does it: default prompt, special tokens, max_seq_length.
        resolve = getattr(st, "_resolve_prompt", None)
        prompt = resolve(None, None) if resolve is not None else None
        texts = list(batch.texts)
        features = dict(st.preprocess(texts, prompt=prompt) if prompt else st.preprocess(texts))
        lengths = features["attention_mask"].sum(1).tolist()
        truncated = [False] * len(texts)
        for i, n in enumerate(lengths):
            if limit and n >= limit:  # at the limit: only the uncut count says whether it was cut
                # Counted by the same preprocessing, uncut: a chat template may wrap the text (and make the prompt a
                # system message), so the tokenizer on prompt + text counts less than the model reads.
                uncut = {"text": {"truncation": False, "verbose": False}}
                full = int(st.preprocess([texts[i]], prompt=prompt, processing_kwargs=uncut)["input_ids"].shape[-1])
                truncated[i] = full > limit
                if truncated[i] and not batch.truncate:
                    raise _too_long("text", full, limit, i, len(texts))
    else:
        field = "token_ids" if batch.token_ids is not None else "text"
        if batch.token_ids is not None:
            inputs = [[int(t) for t in row] for row in batch.token_ids]
            vocab = len(tok)
            for row in inputs:
                if bad := [t for t in row if not 0 <= t < vocab]:
                    raise InvalidField(
                        f"{field}: ids {bad[:5]} are outside the vocabulary", field=field, allowed=f"0 to {vocab - 1}"
                    )
        else:
            inputs = [list(tok(text, add_special_tokens=False, verbose=False)["input_ids"]) for text in batch.texts]
        truncated = [bool(limit) and len(row) > limit for row in inputs]
        for i, row in enumerate(inputs):
            if truncated[i] and not batch.truncate:
                raise _too_long(field, len(row), limit or 0, i, len(inputs))
        inputs = [row[:limit] if cut else row for row, cut in zip(inputs, truncated, strict=True)]
        for i, row in enumerate(inputs):
            if not row:
                raise InvalidField(
                    f"{field}: tokenizes to no tokens", field=field, **({"row": i} if len(inputs) > 1 else {})
                )
        features = dict(tok.pad({"input_ids": inputs}, padding=True, return_tensors="pt"))
        if "token_type_ids" in getattr(tok, "model_input_names", ()) and "token_type_ids" not in features:
            import torch

            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
    device = model.model.device
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}, truncated
