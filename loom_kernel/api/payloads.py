"""What a request asks of a loaded model, turned into one hook call and a response payload.

Shared by the HTTP endpoints; nothing here knows about Litestar. A request's work runs through its ``Session``
(``ModelManager.run``): forward calls on the model's thread, tensor encoding on a request thread.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from loom_kernel.admission import Session
from loom_kernel.capture import (
    check_positions,
    check_site,
    resolve_layers,
    resolve_positions,
    split_sites,
)
from loom_kernel.encoding import check_dtype, check_format, encode_states, encode_tensor, safetensors_body
from loom_kernel.errors import InvalidField, LoomError, Unsupported
from loom_kernel.inputs import row_lengths, tokenize_rows
from loom_kernel.types import Batch, Capture, GenerationParams, LayerSel, LoadedModel, Reading, SequenceOutput

# Bytes one number takes in an answer: JSON text of the float (with its comma), base64 of the binary, the binary.
# A list writes every dtype's numbers alike: a large tensor with nine significant digits (``encoding.json_floats``),
# where a float16 or bfloat16 value's exact decimal form fills them as often as a float32's (-1.31835938e-2); a small
# one through Python's float repr, up to 17 (-2.0639133283775946e-33, 24 bytes with its comma).
NUMBER_BYTES = {
    "list": {"float32": 24.0, "float16": 24.0, "bfloat16": 24.0},
    "base64": {"float32": 16 / 3, "float16": 8 / 3, "bfloat16": 8 / 3},
    "safetensors": {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0},
}
LOGPROB_BYTES = 80  # one {"token_id", "token", "logprob"} entry in JSON
TOKEN_BYTES = 16  # a token's id and text in the answer
ROW_BYTES = 2048  # what an answer's row carries besides: text, metadata, and an OpenAI answer's envelope


class AnswerTooLarge(InvalidField):
    title = "Answer too large"


@attrs.define(frozen=True)
class StateRequest:
    """The capture fields of a request, checked before any model work.

    ``wanted``: hidden states; ``attention``: attention weights of the same layers and positions; ``stream``:
    each generated token's states in its stream event; ``top_logprobs``: None, or how many alternatives to give
    with each generated token's log-probability; ``logits``: each generated step's raw logits.
    """

    wanted: bool
    layers: Any
    positions: Any
    fmt: str
    dtype: str
    attention: bool = False
    stream: bool = False
    top_logprobs: int | None = None
    logits: bool = False
    max_response_bytes: int | None = None
    # The request's interventions and readouts fields (those given), and what resolves them on a model (the
    # ``readouts`` hook, through ``ModelManager.reading``).
    asked: dict[str, Any] = attrs.field(factory=dict)
    reading_fields: tuple[str, ...] = ()  # those of ``asked`` that answer at the request's positions
    resolver: Callable[[LoadedModel, dict[str, Any]], Reading | None] | None = None
    streaming: bool = False  # the endpoint streams: readouts also go in each token's event
    _readings: dict[int, Reading] = attrs.field(factory=dict, eq=False, repr=False)
    _shown: dict[int, list[str]] = attrs.field(factory=dict, eq=False, repr=False)  # output_keys, by model

    @classmethod
    def from_fields(
        cls,
        *,
        wanted: bool,
        layers: Any,
        positions: Any,
        return_full_sequence: bool,
        fmt: str,
        dtype: str,
        default_layers: list[int],
        attention: bool = False,
        stream: bool = False,
        top_logprobs: int | None = None,
        logits: bool = False,
        max_response_bytes: int | None = None,
        asked: dict[str, Any] | None = None,
        reading_fields: tuple[str, ...] = (),
        resolver: Callable[[LoadedModel, dict[str, Any]], Reading | None] | None = None,
        streaming: bool = False,
    ) -> StateRequest:
        if positions is None:
            positions = "all" if return_full_sequence else "last"
        positions = check_positions(positions)
        return cls(
            wanted=wanted or stream or return_full_sequence or (positions != "last" and not attention),
            layers=default_layers if layers is None else layers,
            positions=positions,
            fmt=check_format(fmt),
            dtype=check_dtype(dtype),
            attention=attention,
            stream=stream,
            top_logprobs=top_logprobs,
            logits=logits,
            max_response_bytes=max_response_bytes,
            asked=asked or {},
            reading_fields=reading_fields,
            resolver=resolver,
            streaming=streaming,
        )

    def capture(self, model: LoadedModel, batch: Batch | None = None) -> Capture:
        """Resolve against the model; raises InvalidField for an out-of-range layer, and AnswerTooLarge when the
        answer ``batch`` would get is estimated over ``max_response_bytes``."""
        capture = self._resolve(model)
        if batch is not None and self.max_response_bytes is not None:
            self._check_size(model, batch, capture)
        return capture

    async def resolved(
        self, model: LoadedModel, batch: Batch | None = None, run: Callable[..., Awaitable[Any]] | None = None
    ) -> Capture:
        """``capture``, on a request thread (``run``, else asyncio's) when the request's interventions or readouts
        must be resolved: their vectors built, a lens's token texts tokenized. Never on the event loop."""
        if not self.asked:
            return self.capture(model, batch)
        return await (run or asyncio.to_thread)(self.capture, model, batch)

    def edited(self, model: LoadedModel, batch: Batch) -> Batch:
        """``batch`` with the request's interventions on every row."""
        reading = self.reading(model)
        return attrs.evolve(batch, interventions=(reading.edits,) * batch.size) if reading and reading.edits else batch

    def reading(self, model: LoadedModel) -> Reading | None:
        """The interventions and readouts resolved against ``model``, once: a stream reads them at every token."""
        if not self.asked:
            return None
        if id(model) not in self._readings:
            found = self.resolver(model, self.asked) if self.resolver is not None else None
            if found is None:
                field = next(iter(self.asked))
                raise Unsupported(f"{field}: no plugin on this server resolves it", field=field)
            self._readings[id(model)] = found
        return self._readings[id(model)]

    def output_keys(self, model: LoadedModel) -> list[str]:
        """The states the answer's ``hidden_states`` carry, in the order asked for (layer order for "all"): those
        asked for, not those only the readouts need (known once ``capture`` has resolved the request on ``model``)."""
        return self._shown.get(id(model), []) if self.wanted else []

    def _shown_keys(self, layers: tuple[LayerSel, ...], sites: tuple[str, ...]) -> list[str]:
        names = split_sites(self.layers)[1]
        keys = [sel.key for sel in layers] + [site for site in sites if site in names]
        spelled = [str(item) for item in self.layers] if isinstance(self.layers, list) else []
        return sorted(dict.fromkeys(keys), key=lambda k: spelled.index(k) if k in spelled else -1)

    def _resolve(self, model: LoadedModel) -> Capture:
        extras = {"top_logprobs": self.top_logprobs, "logits": self.logits}
        reading = self.reading(model)
        reads = reading is not None and bool(reading.keys)
        if not (self.wanted or self.attention or reads):
            return Capture(**extras)
        check_positions(self.positions, max_context=model.max_context)
        layers: tuple[LayerSel, ...] = ()
        sites: tuple[str, ...] = ()
        if self.wanted or self.attention:
            spec, names = split_sites(self.layers)
            layers = resolve_layers(spec, model.num_layers)
            sites = tuple(dict.fromkeys(str(check_site(name, model, "hidden_state_layers")[0]) for name in names))
        if self.attention and all(sel.index == 0 for sel in layers):
            why = {  # what was asked for (layer 0, hook points, both or nothing), not what was not
                (True, True): "layer 0 is the embedding output and hook points have no attention",
                (True, False): "layer 0 is the embedding output, which has no attention",
                (False, True): "hook points have no attention",
                (False, False): "no layer is named, and attention is returned for the layers named",
            }[bool(layers), bool(sites)]
            raise InvalidField(
                f"hidden_state_layers: {why}",
                field="hidden_state_layers",
                allowed=f"layers 1 to {model.num_layers} (or -1 to -{model.num_layers})",
            )
        self._shown[id(model)] = self._shown_keys(layers, sites)
        stream = self.stream
        if reading is not None and reads:  # a state both ask for is captured once, under one key
            layers += tuple(sel for sel in reading.layers if sel.key not in {s.key for s in layers})
            sites = tuple(dict.fromkeys([*sites, *reading.sites]))
            stream = stream or reading.stop is not None or (self.streaming and reading.read is not None)
        return Capture(
            layers=layers,
            sites=sites,
            positions=self.positions,
            states=self.wanted or reads,
            attention=self.attention,
            stream_states=stream,
            **extras,
        )

    def _check_size(self, model: LoadedModel, batch: Batch, capture: Capture) -> None:
        reading = self.reading(model)
        per = reading.bytes_per_position if reading is not None and reading.read is not None else 0
        streamed = self.streaming and per > 0
        parts = answer_bytes(model, batch, capture, self.positions, self.fmt, self.dtype, per, streamed)
        total = sum(parts.values())
        limit = self.max_response_bytes or 0
        if total <= limit:
            return
        fields = {
            "states": "hidden_state_layers",
            "attentions": "return_attention",
            "logits": "return_logits",
            "readouts": self.reading_fields[0] if self.reading_fields else "readouts",
        }
        largest = max(parts, key=parts.__getitem__)
        cheaper = "; base64 or safetensors answers are 3-10x smaller than list" if self.fmt == "list" else ""
        raise AnswerTooLarge(
            f"{fields.get(largest, 'max_tokens')}: the answer would be about {total / 2**20:.1f} MiB, over this "
            f"server's max_response_mb of {limit / 2**20:g}; ask for fewer layers, positions, rows or tokens{cheaper}",
            field=fields.get(largest, "max_tokens"),
            estimate_bytes=total,
            limit_bytes=limit,
            parts=parts,
        )


def answer_bytes(
    model: LoadedModel,
    batch: Batch,
    capture: Capture,
    positions: Any,
    fmt: str,
    dtype: str,
    readout_bytes: int = 0,
    streamed: bool = False,
) -> dict[str, int]:
    """An upper estimate of the answer's bytes by part, from shapes alone, before any work: a text counts as one
    token per character (plus two special tokens), at most the model's context. ``readout_bytes``: what the
    request's readouts (lens, probe scores, SAE features) add per position read, and per generated token when
    ``streamed`` (each token event carries them)."""
    per = NUMBER_BYTES[fmt][dtype]
    new = batch.generation.max_tokens if batch.generation is not None else 0
    config = model.ref.config or {}
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads") or max(1, model.hidden_size // 64)
    vocab = _config_int(config, "vocab_size") or _tokenizer_size(model.tokenizer)
    parts = {"states": 0.0, "attentions": 0.0, "logits": 0.0, "readouts": 0.0, "tokens": 0.0}
    for prompt in row_lengths(model, batch):
        total = prompt + new
        named = {"last": 0, "all": total, "prompt": prompt, "generated": new}
        selected = named[positions] if isinstance(positions, str) else len(positions)
        if capture.wants_states:
            rows = 1 + selected + (new if capture.stream_states else 0)
            # A hook point's values per token by its shape; -1 (a query's keys, hook_pattern) is the sequence.
            widths = [math.prod(total if d == -1 else d for d in (model.sites or {}).get(s, ())) for s in capture.sites]
            parts["states"] += (len(capture.layers) * model.hidden_size + sum(widths)) * rows * per
        if capture.attention_layers:
            parts["attentions"] += len(capture.attention_layers) * heads * max(1, selected) * total * per
        if capture.logits:  # a generation's steps, or a forward pass's positions
            parts["logits"] += (new if batch.generation is not None else max(1, selected)) * vocab * per
        parts["readouts"] += ((selected if positions != "last" else 1) + (new if streamed else 0)) * readout_bytes
        parts["tokens"] += ROW_BYTES + total * TOKEN_BYTES + new * (1 + (capture.top_logprobs or 0)) * LOGPROB_BYTES
    return {k: int(v) for k, v in parts.items()}


def _tokenizer_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:  # a loader's own tokenizer without a size (a byte tokenizer): its model says it in config
        return 256


def _config_int(config: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def split_states(row: SequenceOutput, positions: Any) -> tuple[dict[str, Any], dict[str, Any] | None, list[int]]:
    """(last-token states [1, H], selected rows [P, H] or None for "last", the selected positions)."""
    total = len(row.token_ids)
    if positions == "last":
        last = {k: t[-1:] for k, t in row.states.items()}
        return last, None, [total - 1]
    wanted, rows = _selected(row, positions)
    where = {p: i for i, p in enumerate(row.positions)}
    last = {k: t[where[total - 1]].unsqueeze(0) for k, t in row.states.items()}
    return last, {k: t.index_select(0, rows) for k, t in row.states.items()}, wanted


def _selected(row: SequenceOutput, positions: Any) -> tuple[list[int], Any]:
    """The positions a spec selects, and their row numbers in the plugin's tensors."""
    import torch

    wanted = resolve_positions(positions, len(row.token_ids), row.prompt_tokens)
    where = {p: i for i, p in enumerate(row.positions)}
    return wanted, torch.tensor([where[p] for p in wanted], dtype=torch.long)


def _attentions(row: SequenceOutput, positions: Any) -> dict[str, Any]:
    if positions == "last":
        return {k: t[:, -1:] for k, t in row.attentions.items()}
    _, rows = _selected(row, positions)
    return {k: t.index_select(1, rows) for k, t in row.attentions.items()}


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's own text (" file", not the vocabulary's raw piece "Ġfile"), as TransformerLens's
    ``to_str_tokens`` gives them: every answer that shows tokens shows these, with the ids beside them."""
    if tokenizer is None:
        return ["" for _ in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def logprob_entries(tokenizer: Any, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The plugin's per-step log-probabilities with each token's text."""

    def text(token: int) -> str:
        return token_texts(tokenizer, [token])[0]

    return [
        {
            "token_id": e["token_id"],
            "token": text(e["token_id"]),
            "logprob": e["logprob"],
            "top_logprobs": [{"token_id": t, "token": text(t), "logprob": lp} for t, lp in e["top"]],
        }
        for e in entries
    ]


def state_payload(
    row: SequenceOutput, req: StateRequest, capture: Capture, model: LoadedModel
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """JSON fields for the tensors of one row (and its readouts), and the raw tensors by group (for safetensors)."""
    groups: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    keys = req.output_keys(model)
    if capture.wanted and (keys or capture.attention_layers):
        indices = {sel.key: sel.index for sel in capture.layers} | {s: s for s in capture.sites}
        fields["layer_indices"] = {k: indices[k] for k in [*keys, *row.attentions] if k in indices}
    if keys:
        last, seq, positions = split_states(attrs.evolve(row, states={k: row.states[k] for k in keys}), req.positions)
        groups["hidden_states"] = last
        if seq is not None:
            groups["sequence_hidden_states"] = seq
            fields["positions"] = positions
    if capture.attention_layers:
        groups["attentions"] = _attentions(row, req.positions)
        if req.positions != "last":
            fields["positions"] = _selected(row, req.positions)[0]
    if capture.logits and row.logits is not None:
        groups["logits"] = row.logits
    if (reading := req.reading(model)) is not None and reading.read is not None and row.positions:
        read = {k: row.states[k] for k in reading.keys}
        last, seq, positions = split_states(attrs.evolve(row, states=read), req.positions)
        fields.update(reading.read(seq if seq is not None else last, positions))
    if req.fmt != "safetensors":
        for group, tensors in groups.items():
            if isinstance(tensors, dict):
                fields[group] = encode_states(tensors, req.dtype, req.fmt)
            else:
                fields[group] = encode_tensor(tensors, req.dtype, req.fmt)
    return fields, groups


def stream_extras(extras: dict[str, Any] | None, req: StateRequest, model: LoadedModel) -> dict[str, Any]:
    """What a stream's token event adds to its id and text: the token's states (those asked for), readouts and
    log-probability, as JSON."""
    out: dict[str, Any] = {}
    if extras and "states" in extras:
        states = extras["states"]
        if req.stream:
            shown = {k: states[k] for k in req.output_keys(model) if k in states}
            out["hidden_states"] = encode_states(shown, req.dtype, req.fmt)
        reading = req.reading(model) if req.streaming else None
        if reading is not None and reading.read is not None:
            out.update(reading.read({k: states[k] for k in reading.keys}, None))
    if extras and "logprob" in extras:
        out["logprob"] = logprob_entries(model.tokenizer, [extras["logprob"]])[0]
    return out


def finish(payload: dict[str, Any], groups: dict[str, dict[str, Any]], req: StateRequest) -> dict[str, Any] | bytes:
    if req.fmt == "safetensors":
        return safetensors_body(payload, groups, req.dtype)
    return payload


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    return {
        "model_id": model.ref.id,
        "loader": model.loader,
        "device": model.device,
        "dtype": model.dtype,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
    }


def timing(start: float, generated: int) -> dict[str, Any]:
    elapsed = time.perf_counter() - start
    return {
        "inference_time_ms": round(elapsed * 1000.0, 3),
        "tokens_per_second": round(generated / elapsed, 3) if elapsed > 0 and generated else 0.0,
    }


def check_generation(model: LoadedModel, params: GenerationParams) -> None:
    """Refuse what this model cannot generate before any work starts."""
    if not model.can_generate:
        raise Unsupported(
            f"model: {model.ref.id!r} is {_article(model.kind)} {model.kind} model and cannot generate; "
            "use /extract or /embed",
            field="model",
        )
    if model.max_context and params.max_tokens > model.max_context and not params.fit_context:
        raise InvalidField(
            f"max_tokens: {params.max_tokens} exceeds the model's context of {model.max_context} tokens",
            field="max_tokens",
            allowed=f"0 to {model.max_context}",
        )


def check_prompts(model: LoadedModel, batch: Batch, name: Callable[[int], str] | None = None) -> None:
    """Every prompt of ``batch`` tokenized and checked as the scheduler will check it (its length, its ids, the
    ``max_tokens`` after it), the first refusal raised: a stream calls it (off the event loop) before its 200, so
    that what would fail its generation is a 4xx, never an error event. ``name(i)``: how prompt ``i`` is named in
    a refusal of the prompt itself (``prompt[1]``)."""
    _, refused = tokenize_rows(model, batch)
    for i, error in enumerate(refused):
        if error is None:
            continue
        if name is None or error.field == "max_tokens":
            raise error
        field, (_, _, rest) = name(i), error.detail.partition(": ")
        raise InvalidField(f"{field}: {rest}", field=field, allowed=error.allowed) from None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


async def generate_rows(
    session: Session, batch: Batch, req: StateRequest
) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]], SequenceOutput] | LoomError]:
    """Every prompt of ``batch`` generated in one call: a /generate payload, its tensors and the raw row per prompt.

    A prompt refused on its own (too long, no tokens, ...), or a row that fails alone (its logits not finite), gets
    its error in its slot and the others run; any other error fails the whole call. The payloads (tensors encoded)
    are made on a request thread.
    """
    model = session.model
    assert batch.generation is not None
    check_generation(model, batch.generation)
    capture = await req.resolved(model, batch, session.thread)
    batch = req.edited(model, batch)
    stopped: dict[int, dict[str, Any]] = {}  # row -> the stop rule that ended it
    if (reading := req.reading(model)) is not None and reading.stop is not None:
        batch = attrs.evolve(batch, on_token=_stopping(batch.on_token, reading.stop, stopped))
    n = batch.size
    # Each prompt tokenized and checked alone, off the event loop, before anything is queued: a refused prompt
    # (too long, no tokens, ...) is its own result, and the others run without it.
    tokenized, refused = await session.thread(tokenize_rows, model, batch)
    todo = [i for i, error in enumerate(refused) if error is None]
    results: dict[int, Any] = {i: error for i, error in enumerate(refused) if error is not None}
    start = time.perf_counter()
    if todo:
        tokenized = attrs.evolve(tokenized, on_token=_renumbered(batch.on_token, todo))
        rows = (await session.forward(tokenized, capture)).rows
        results.update(zip(todo, rows, strict=True))
    timings = timing(start, sum(len(r.generated_ids) for r in results.values() if isinstance(r, SequenceOutput)))
    return await session.thread(
        lambda: [_row_result(model, results[i], req, capture, timings, stopped.get(i)) for i in range(n)]
    )


def _stopping(on_token: Any, stop: Callable[[dict[str, Any]], Any], stopped: dict[int, dict[str, Any]]) -> Any:
    """``on_token`` that ends a row, with finish reason "probe", at the first token whose states cross a stop
    rule (the loader passes each token's states with its event, one pass after the token)."""

    def wrapped(row: int, token: int, piece: str, extras: dict[str, Any] | None = None) -> Any:
        fired = stop(extras["states"]) if extras and "states" in extras else None
        if fired is not None:
            stopped.setdefault(row, fired)
        result = on_token(row, token, piece, extras) if on_token is not None else True
        return "probe" if fired is not None else result

    return wrapped


def _renumbered(on_token: Any, todo: list[int]) -> Any:
    """``on_token`` with the sub-batch's row numbers mapped back to the request's."""
    if on_token is None:
        return None
    return lambda row, token, piece, extras=None: on_token(todo[row], token, piece, extras or {})


def _row_result(
    model: LoadedModel,
    row: SequenceOutput | LoomError,
    req: StateRequest,
    capture: Capture,
    timings: dict[str, Any],
    stopped: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], SequenceOutput] | LoomError:
    if isinstance(row, LoomError):
        return row
    fields, groups = state_payload(row, req, capture, model)
    payload = {
        "text": row.text,
        "token_count": len(row.generated_ids),
        "prompt_tokens": row.prompt_tokens,
        "finish_reason": row.finish_reason,
        "token_ids": row.generated_ids,
        **fields,
    }
    if capture.top_logprobs is not None:
        payload["logprobs"] = logprob_entries(model.tokenizer, row.logprobs)
    if stopped is not None and row.finish_reason == "probe":
        payload["stopped_by"] = stopped
    payload["metadata"] = {**model_metadata(model), **timings, "prompt_tokens": row.prompt_tokens}
    return payload, groups, row


async def generate_choices(
    session: Session, batch: Batch, req: StateRequest, n: int
) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]], SequenceOutput]]:
    """``n`` choices of each of ``batch``'s prompts, as rows of one batch, prompt by prompt: prompt ``p``'s choice
    ``i`` is row ``p * n + i`` (OpenAI's order), and ``on_token`` gets that row. Each row has its own generator:
    with a seed ``s``, choice ``i`` uses seed ``s + i``, so every choice is what its prompt alone with that seed
    gets (choice 0 is what ``n`` = 1 gives). A loader that cannot give rows their own parameters gets one call per
    choice, each with every prompt (merged when it can). A prompt refused on its own fails the whole call."""
    assert batch.generation is not None
    params = tuple(choice_params(batch.generation, i) for i in range(n))
    if n == 1 or session.model.row_params:
        rows = attrs.evolve(
            batch,
            texts=tuple(text for text in batch.texts for _ in range(n)),
            token_ids=tuple(ids for ids in batch.token_ids for _ in range(n)) if batch.token_ids is not None else None,
            row_generation=params * batch.size if n > 1 else batch.row_generation,
        )
        return _raising(await generate_rows(session, rows, req))
    prompts = range(batch.size)
    per_choice = await asyncio.gather(
        *(
            generate_rows(
                session,
                attrs.evolve(batch, generation=p, on_token=_renumbered(batch.on_token, [k * n + i for k in prompts])),
                req,
            )
            for i, p in enumerate(params)
        )
    )
    return _raising([per_choice[i][k] for k in prompts for i in range(n)])


def _raising(results: list[Any]) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]], SequenceOutput]]:
    for result in results:
        if isinstance(result, LoomError):
            raise result
    return results


def choice_params(params: GenerationParams, i: int) -> GenerationParams:
    """Choice ``i``'s parameters: its own seed, derived from the request's, so that every choice is reproducible."""
    return params if params.seed is None else attrs.evolve(params, seed=(params.seed + i) % 2**63)


async def generate(
    session: Session, batch: Batch, req: StateRequest
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], SequenceOutput]:
    """One prompt generated with states: the /generate payload, its tensors by group, and the raw row."""
    (result,) = _raising(await generate_rows(session, batch, req))
    return result
