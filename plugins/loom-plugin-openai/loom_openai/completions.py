"""OpenAI-compatible chat completions, completions and model list, with The Loom's states as extra fields."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs
import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage

from loom_kernel import (
    Batch,
    Detokenizer,
    GenerationParams,
    InvalidField,
    Kernel,
    LoadedModel,
    Manager,
    MayStream,
    ModelEntry,
    ModelNotFound,
    Session,
    Settings,
    StateRequest,
    TokenBridge,
    Unsupported,
    asked_fields,
    caller,
    check_generation,
    check_prompts,
    check_vocabulary,
    checked_params,
    client_gone,
    echo,
    event_stream,
    fit_text,
    generate_choices,
    openai_error,
    path_model_id,
    reading_fields,
    request_id,
    stream_extras,
    texts_or_ids,
    vocabulary_size,
)
from loom_openai.schemas import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    MAX_PROMPTS,
    MAX_STOP,
    ROLES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIFields,
)
from loom_openai.token_bytes import token_bytes


def refuse_unsupported(data: OpenAIFields) -> None:
    """OpenAI's fields that would change the answer in a way this server does not implement: refused by name, never
    silently ignored. Their defaults (and null) are accepted, as clients send them unasked."""
    if data.stream_options is not None and not data.stream:  # OpenAI's 400 too: options of a stream not asked for
        raise InvalidField(
            "stream_options: only with stream: true", field="stream_options", allowed="stream: true, or no options"
        )
    checks: list[tuple[str, bool, Any]] = [
        ("presence_penalty", data.presence_penalty not in (None, 0), [0]),
        ("frequency_penalty", data.frequency_penalty not in (None, 0), [0]),
        ("logit_bias", bool(data.logit_bias), [{}]),
    ]
    if isinstance(data, ChatCompletionRequest):
        rf = data.response_format
        checks += [
            ("tools", bool(data.tools), [[]]),
            ("functions", bool(data.functions), [[]]),
            ("tool_choice", data.tool_choice not in (None, "none", "auto"), ["none", "auto"]),
            ("function_call", data.function_call not in (None, "none", "auto"), ["none", "auto"]),
            ("response_format", rf is not None and rf.get("type") != "text", [{"type": "text"}]),
            ("modalities", data.modalities not in (None, ["text"]), [["text"]]),
            ("audio", data.audio is not None, [None]),
            ("prediction", data.prediction is not None, [None]),
            ("store", bool(data.store), [False]),
            ("reasoning_effort", data.reasoning_effort is not None, [None]),
            ("verbosity", data.verbosity is not None, [None]),
            ("web_search_options", data.web_search_options is not None, [None]),
            ("moderation", data.moderation is not None, [None]),
        ]
    if isinstance(data, CompletionRequest):
        checks += [
            ("echo", bool(data.echo), [False]),
            ("suffix", data.suffix is not None, [None]),
            ("best_of", data.best_of not in (None, 1), [1]),
        ]
    for field, bad, allowed in checks:
        if bad:
            raise InvalidField(f"{field}: not supported by this server", field=field, allowed=allowed)


def refuse_unused(data: OpenAIFields, kernel: Kernel) -> None:
    """The Loom's capture fields shape what the answer carries; one that would change nothing is refused by name
    instead of being ignored: the layers without hidden states or attention, the positions without those or a
    readout that reads there, the wire format without any tensor in the answer."""
    tensors = data.return_hidden_states or data.return_attention
    reads = bool(reading_fields(data, kernel))
    unused = [
        ("hidden_state_layers", data.hidden_state_layers is not None and not tensors),
        ("positions", data.positions is not None and not (tensors or reads)),
        ("return_full_sequence", data.return_full_sequence and not (tensors or reads)),
        ("hidden_state_format", data.hidden_state_format is not None and not (tensors or data.return_logits)),
        ("hidden_state_dtype", data.hidden_state_dtype is not None and not (tensors or data.return_logits)),
    ]
    for field, bad in unused:
        if bad:
            raise InvalidField(
                f"{field}: changes nothing without return_hidden_states (or return_attention, return_logits, or a "
                "readout where it reads it)",
                field=field,
                allowed=["return_hidden_states: true"],
            )


@contextlib.contextmanager
def named_as_sent(data: OpenAIFields) -> Iterator[None]:
    """A ``max_tokens`` error named ``max_completion_tokens`` when that is the field the client sent."""
    try:
        yield
    except InvalidField as exc:
        if exc.field != "max_tokens" or data.max_completion_tokens is None:
            raise
        detail = "max_completion_tokens" + exc.detail.removeprefix("max_tokens")
        raise InvalidField(detail, field="max_completion_tokens", allowed=exc.allowed) from None


def params_for(data: OpenAIFields, settings: Settings) -> GenerationParams:
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    return checked_params(
        settings,
        max_tokens=max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        seed=data.seed,
        stop=data.stop,
        max_stop=MAX_STOP,
    )


def top_logprobs_for(data: OpenAIFields) -> int | None:
    """How many alternatives each generated token's log-probability comes with; None: no log-probabilities."""
    if isinstance(data, ChatCompletionRequest):
        if data.top_logprobs is not None and not data.logprobs:
            # OpenAI refuses this too rather than guess which of the two fields the client meant.
            raise InvalidField(
                "top_logprobs: only with logprobs: true", field="top_logprobs", allowed="logprobs: true first"
            )
        if data.top_logprobs is not None and not 0 <= data.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
            raise InvalidField(
                f"top_logprobs: {data.top_logprobs} is out of range",
                field="top_logprobs",
                allowed=f"0 to {MAX_CHAT_TOP_LOGPROBS}",
            )
        return (data.top_logprobs or 0) if data.logprobs else None
    if isinstance(data, CompletionRequest) and data.logprobs is not None:
        if not 0 <= data.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidField(
                f"logprobs: {data.logprobs} is out of range",
                field="logprobs",
                allowed=f"0 to {MAX_COMPLETION_LOGPROBS}",
            )
        return data.logprobs
    return None


def states_for(data: OpenAIFields, settings: Settings, manager: Any = None, caller: str = "") -> StateRequest:
    """The request's capture. Unlike /generate, positions alone do not ask for hidden states here: they place the
    readouts and attention, and the states come with ``return_hidden_states`` only."""
    req = StateRequest.from_fields(
        wanted=data.return_hidden_states,
        layers=data.hidden_state_layers,
        positions=data.positions,
        return_full_sequence=data.return_full_sequence,
        fmt=data.hidden_state_format or "list",
        dtype=data.hidden_state_dtype or settings.default_precision,
        default_layers=settings.default_layers,
        attention=data.return_attention,
        top_logprobs=top_logprobs_for(data),
        logits=data.return_logits,
        max_response_bytes=int(settings.max_response_mb * 2**20),
        asked=asked_fields(data, manager.kernel) if manager is not None else {},
        reading_fields=reading_fields(data, manager.kernel) if manager is not None else (),
        resolver=functools.partial(manager.reading, caller=caller) if manager is not None else None,
        streaming=bool(data.stream),
    )
    req = attrs.evolve(req, wanted=data.return_hidden_states)
    if req.fmt == "safetensors":
        raise InvalidField(
            "hidden_state_format: OpenAI endpoints answer in JSON",
            field="hidden_state_format",
            allowed=["list", "base64"],
        )
    return req


def message_text(message: ChatMessage, index: int) -> dict[str, str]:
    if message.role not in ROLES:
        raise InvalidField(
            f"messages[{index}].role: unknown role {message.role!r}",
            field=f"messages[{index}].role",
            allowed=list(ROLES),
        )
    content = message.content
    if isinstance(content, list):  # content parts: only text parts carry anything a text model can read
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidField(
                    f"messages[{index}].content: only text parts are supported",
                    field=f"messages[{index}].content",
                    allowed=[{"type": "text", "text": "..."}],
                )
            texts.append(part["text"])
        content = "".join(texts)
    return {"role": message.role, "content": content or ""}


def chat_token_ids(model: LoadedModel, messages: list[dict[str, str]]) -> tuple[int, ...]:
    """The chat template applied once, tokenized by it: nothing is added on top (no second BOS)."""
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise Unsupported(
            f"messages: {model.ref.id!r} has no chat template; use /v1/completions with a plain prompt",
            field="messages",
        )
    # Nothing may be cut from a chat: contents longer than the whole context could hold are refused untokenized.
    fit_text(model, "".join(m["content"] for m in messages), "messages")
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # a template's raise_exception ("roles must alternate"): the messages' fault
        from jinja2 import TemplateError

        if not isinstance(exc, TemplateError | ValueError):
            raise
        raise InvalidField(
            f"messages: the model's chat template refuses them: {echo(str(exc))}",
            field="messages",
            allowed="messages in the order and roles the model's chat template accepts",
        ) from None
    ids = tuple(int(i) for i in (out["input_ids"] if isinstance(out, Mapping) else out))
    if model.max_context and len(ids) > model.max_context:
        raise InvalidField(
            f"messages: {len(ids)} tokens with the chat template exceed the model's context of {model.max_context}",
            field="messages",
            allowed=f"at most {model.max_context} tokens",
        )
    return ids


def check_context(rows: list[list[int]], context: int | None, flat: bool) -> None:
    """Token-id prompts within the model's context (nothing is cut from ids a client chose), named as sent."""
    for i, row in enumerate(rows):
        if context and len(row) > context:
            where = "prompt" if flat else f"prompt[{i}]"
            raise InvalidField(
                f"{where}: {len(row)} tokens exceed the model's context of {context}",
                field=where,
                allowed=f"at most {context} tokens",
            )


def chat_logprob(tokenizer: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """One token of chat's ``logprobs.content``; ``bytes`` are the token's own, so that a character split across
    tokens is rebuilt by joining them, as OpenAI's are."""

    def one(e: dict[str, Any]) -> dict[str, Any]:
        own = token_bytes(tokenizer, e["token_id"], e["token"])
        return {"token": e["token"], "logprob": e["logprob"], "bytes": own}

    return {**one(entry), "top_logprobs": [one(t) for t in entry["top_logprobs"]]}


def chat_logprobs(tokenizer: Any, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's shape: the content's tokens, and a refusal's (a model here never refuses apart from its text)."""
    return None if entries is None else {"content": [chat_logprob(tokenizer, e) for e in entries], "refusal": None}


def top_by_text(entry: dict[str, Any]) -> dict[str, float]:
    """The legacy format's alternatives, keyed by text, with the chosen token as OpenAI adds it (up to k + 1).

    Two ids can decode to the same text; the more likely one keeps the key, as it comes first.
    """
    top: dict[str, float] = {}
    for alt in entry["top_logprobs"]:
        top.setdefault(alt["token"], alt["logprob"])
    top.setdefault(entry["token"], entry["logprob"])
    return top


def completion_logprobs(entries: list[dict[str, Any]] | None, offsets: list[int]) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [top_by_text(e) for e in entries],
        "text_offset": offsets,
    }


def text_offsets(tokenizer: Any, payload: dict[str, Any]) -> list[int]:
    """Where each generated token's text starts in the completion text; a stop string's cut can end the text
    before the token that completed it starts, so offsets never pass its end."""
    ids, text = payload["token_ids"], payload["text"]
    return [min(at, len(text)) for at in Offsets(tokenizer).of(ids)]


class Offsets:
    """Where each next token's text starts in the completion, at a cost per token that does not grow with the text:
    the kernel's incremental detokenizer's text so far, and the text of the few tokens it holds back (a split
    character's first bytes, which it gives only with the byte that completes them) as ``decoded_length`` counts
    it. Without a tokenizer every token's text is empty (see ``logprob_entries``), and so is every offset."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.at = 0  # characters the detokenizer has given
        self.held: list[int] = []  # the tokens since, whose text it holds back

    def push(self, token: int) -> int:
        """The token's offset; the text it completes counts from the next one on."""
        if self.detok is None:
            return 0
        at = self.at + decoded_length(self.tokenizer, self.held)
        if piece := self.detok.push(token):
            self.at, self.held = self.at + len(piece), []
        else:
            self.held.append(token)
        return at

    def of(self, ids: list[int]) -> list[int]:
        return [self.push(token) for token in ids]


def decoded_length(tokenizer: Any, token_ids: list[int]) -> int:
    """Characters of text ``token_ids`` decode to, as the plugin decodes its completion (special tokens skipped),
    not counting a character they end in the middle of: where the next token starts.

    A token's own decoded text is not its share of the completion (a byte of a split character decodes alone
    as U+FFFD), so offsets come from decoding the tokens before it; those that end with part of a character
    decode it as a U+FFFD that the completion does not have, and the next token continues that character, so its
    offset is the character's own.
    """
    if not token_ids:
        return 0
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return len(text) - 1 if text.endswith("\ufffd") and ends_mid_character(tokenizer, token_ids) else len(text)


def ends_mid_character(tokenizer: Any, token_ids: list[int]) -> bool:
    """Whether the tokens' bytes end with the first bytes of a character (not with bytes that no character has:
    those are the text's own U+FFFD). A character has at most four bytes, so the last four tokens hold its first."""
    import codecs

    tail = b"".join(bytes(token_bytes(tokenizer, i, tokenizer.decode([i]))) for i in token_ids[-4:])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(tail, final=False)
    return bool(decoder.getstate()[0])


def finish_reason(payload: dict[str, Any]) -> str:
    """OpenAI's finish reasons: a stop rule (``stop_when``) is a stop, the rule that fired is in ``stopped_by``."""
    reason = payload["finish_reason"]
    return "stop" if reason == "probe" else reason


# What The Loom adds to a choice: readouts, the stop rule that ended it, attention, logits, and where they are.
CHOICE_FIELDS = ("logit_lens", "probe_scores", "stopped_by", "attentions", "logits", "positions", "layer_indices")
STREAMED_FIELDS = ("logit_lens", "probe_scores")  # a stream's token chunks carry these, one token at a time
STATE_FIELDS = ("hidden_states", "sequence_hidden_states")


def choice_fields(payload: dict[str, Any], several: bool, streamed: bool = False) -> dict[str, Any]:
    """A choice's extra fields from its payload. With ``several`` choices each also carries its own hidden states
    (the original project's top-level fields are the first choice's); ``streamed``: those a stream's last chunk of
    the choice adds to what its token chunks carried."""
    keys = [k for k in CHOICE_FIELDS if not (streamed and k in STREAMED_FIELDS)] + (list(STATE_FIELDS) * several)
    return {key: payload[key] for key in keys if key in payload}


def with_readouts(chunk: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A token chunk whose choice carries that token's readouts."""
    chunk["choices"][0].update({key: event[key] for key in STREAMED_FIELDS if key in event})
    return chunk


def usage(payloads: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Every prompt once (its first choice's count), every choice's tokens."""
    prompt = sum(p["prompt_tokens"] for p in payloads[::n])
    completion = sum(p["token_count"] for p in payloads)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def seed_extras(payload: dict[str, Any], req: StateRequest, model_id: str) -> dict[str, Any]:
    """The original project's extra fields (text, hidden_state{final, shape, layer, dtype}, metadata), only with
    ``return_hidden_states`` as it documents them: OpenAI's SDK types ``metadata`` as strings only, and a plain
    answer must be OpenAI's schema alone."""
    if not req.wanted:
        return {}
    meta = payload["metadata"]
    extras: dict[str, Any] = {
        "text": payload["text"],
        "metadata": {
            "model": model_id,
            "latency_ms": meta["inference_time_ms"],
            "tokens_per_second": meta["tokens_per_second"],
        },
    }
    states = payload.get("hidden_states")
    if states:
        key, first = next(iter(states.items()))
        final = first["data"][0] if first.get("encoding") != "base64" else first["data"]
        extras["hidden_state"] = {"final": final, "shape": first["shape"], "layer": int(key), "dtype": first["dtype"]}
        if first.get("encoding"):
            extras["hidden_state"]["encoding"] = first["encoding"]
        extras["hidden_states"] = states
        for group in ("sequence_hidden_states", "positions", "layer_indices"):
            if group in payload:
                extras[group] = payload[group]
    return extras


def streamed_token(bridge: TokenBridge, req: StateRequest, model: LoadedModel, offsets: bool = False) -> Any:
    """The Batch's ``on_token``: the plugin's raw extras become JSON here, on the model's thread, not on the event
    loop; ``offsets`` adds where each token's text starts in the completion (the legacy format's text_offset).

    The stream cannot know where a stop string will cut the text, so unlike the full response a stream's last
    offset is not clipped to it.
    """
    placed: dict[int, Offsets] = {}  # per choice

    def on_token(row: int, token: int, piece: str, extras: dict[str, Any] | None = None) -> bool:
        out = stream_extras(extras, req, model)
        if offsets:
            at = placed.setdefault(row, Offsets(model.tokenizer)).push(token)
            if "logprob" in out:
                out["text_offset"] = at
        return bridge.on_token(row, token, piece, out)

    return on_token


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]

    async def _prepare(
        self, data: OpenAIFields, manager: Manager, settings: Settings, batch: Batch, caller: str
    ) -> tuple[GenerationParams, StateRequest, ModelEntry]:
        """Checks before any work or stream starts; ``batch`` holds the prompts (or the chat's texts) for the
        answer's size estimate."""
        refuse_unsupported(data)
        refuse_unused(data, manager.kernel)
        with named_as_sent(data):
            params = params_for(data, settings)
        req = states_for(data, settings, manager, caller)
        entry = await manager.get_for(data)
        if entry.loaded is not None:
            with named_as_sent(data):
                check_generation(entry.loaded, params)
            await req.resolved(entry.loaded, attrs.evolve(batch, generation=params))
        return params, req, entry

    @post("/chat/completions", status_code=200, operation_class=MayStream)
    async def chat(self, data: JSONBody[ChatCompletionRequest], request: Request, manager: Manager) -> Any:
        """OpenAI's chat completion (JSON), or with ``stream: true`` its chunks (server-sent events)."""
        settings = manager.settings
        messages = [message_text(m, i) for i, m in enumerate(data.messages)]
        text = "".join(m["role"] + m["content"] for m in messages)
        params, req, entry = await self._prepare(data, manager, settings, Batch(texts=(text,)), caller(request))
        ids = await asyncio.to_thread(chat_token_ids, entry.model(), messages)  # refused before a stream starts
        with named_as_sent(data):  # max_tokens after the chat's tokens
            check_prompts(entry.model(), Batch(token_ids=(ids,), generation=params), lambda i: "messages")
        tokenizer = entry.model().tokenizer
        bridge = TokenBridge() if data.stream else None
        n = data.n or 1

        async def work(s: Session) -> list[dict[str, Any]]:
            batch = Batch(
                token_ids=(ids,),
                generation=params,
                on_token=streamed_token(bridge, req, s.model) if bridge else None,
            )
            return [payload for payload, _, _ in await generate_choices(s, batch, req, n)]

        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": data.model}
        if bridge is None:
            payloads = await manager.run(entry, work, until=client_gone(request))
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": payload["text"], "refusal": None},
                    "finish_reason": finish_reason(payload),
                    "logprobs": chat_logprobs(tokenizer, payload.get("logprobs")),
                    **choice_fields(payload, n > 1),
                }
                for i, payload in enumerate(payloads)
            ]
            body = {**head, "object": "chat.completion", "choices": choices, "usage": usage(payloads, n)}
            return {**body, **seed_extras(payloads[0], req, data.model)}

        def chunk(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        def token_chunk(event: dict[str, Any]) -> dict[str, Any]:
            step = event.get("logprob")
            logprobs = chat_logprobs(tokenizer, None if step is None else [step])
            return with_readouts(chunk(event["row"], {"content": event["text"]}, None, logprobs), event)

        def last_chunk(i: int, payload: dict[str, Any]) -> dict[str, Any]:
            last = chunk(i, {}, finish_reason(payload))
            last["choices"][0].update(choice_fields(payload, n > 1, streamed=True))
            return last

        return stream(
            bridge,
            manager.run(entry, work),
            request,
            [chunk(i, {"role": "assistant", "content": ""}, None) for i in range(n)],
            token_chunk,
            last_chunk,
            {**head, "object": "chat.completion.chunk"},
            data,
            lambda p: seed_extras(p, req, data.model),
        )

    @post("/completions", status_code=200, operation_class=MayStream)
    async def completions(self, data: JSONBody[CompletionRequest], request: Request, manager: Manager) -> Any:
        """OpenAI's completion of each prompt (``n`` choices each, prompt by prompt, as rows of one batch), or with
        ``stream: true`` its chunks (server-sent events)."""
        settings = manager.settings
        texts, rows = texts_or_ids(data.prompt, "prompt")
        n = data.n or 1
        prompts = len(texts or rows or ())
        if prompts * n > MAX_PROMPTS:
            raise InvalidField(
                f"prompt: {prompts} prompts times n = {n} is {prompts * n} choices, more than {MAX_PROMPTS}",
                field="prompt",
                allowed=f"up to {MAX_PROMPTS} prompts times n",
            )
        # The size estimate counts a token id as one character.
        estimate = Batch(texts=tuple(texts) if rows is None else tuple(" " * len(r) for r in rows))
        params, req, entry = await self._prepare(data, manager, settings, estimate, caller(request))
        flat = isinstance(data.prompt, str) or not isinstance(data.prompt[0], str | list)  # one prompt
        if rows is not None:  # the model's own token ids, as they are: checked before a stream starts
            check_vocabulary(rows, vocabulary_size(entry.model()), "prompt", flat=flat)
            check_context(rows, entry.model().max_context, flat)
        if data.stream or rows is not None:  # what would fail a row is a 400 before the stream, named as sent
            if rows is None:
                prompts = Batch(texts=tuple(texts), generation=params)
            else:
                prompts = Batch(token_ids=tuple(tuple(r) for r in rows), generation=params)
            with named_as_sent(data):
                await asyncio.to_thread(
                    check_prompts, entry.model(), prompts, lambda i: "prompt" if flat else f"prompt[{i}]"
                )
        bridge = TokenBridge() if data.stream else None

        async def work(s: Session) -> list[dict[str, Any]]:
            on_token = streamed_token(bridge, req, s.model, offsets=True) if bridge else None
            if rows is None:
                batch = Batch(texts=tuple(texts), generation=params, on_token=on_token)
            else:
                batch = Batch(token_ids=tuple(tuple(r) for r in rows), generation=params, on_token=on_token)
            payloads = [payload for payload, _, _ in await generate_choices(s, batch, req, n)]
            for payload in payloads:
                if bridge is None and "logprobs" in payload:  # decoded on a request thread
                    payload["text_offset"] = await s.thread(text_offsets, s.model.tokenizer, payload)
            return payloads

        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": data.model, "object": "text_completion"}
        several = len(texts or rows or ()) * n > 1
        if bridge is None:
            payloads = await manager.run(entry, work, until=client_gone(request))
            choices = [
                {
                    "index": i,
                    "text": payload["text"],
                    "finish_reason": finish_reason(payload),
                    "logprobs": completion_logprobs(payload.get("logprobs"), payload.get("text_offset", [])),
                    **choice_fields(payload, several),
                }
                for i, payload in enumerate(payloads)
            ]
            return {
                **head,
                "choices": choices,
                "usage": usage(payloads, n),
                **seed_extras(payloads[0], req, data.model),
            }

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            return {**head, "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

        def token_chunk(event: dict[str, Any]) -> dict[str, Any]:
            entry = event.get("logprob")
            logprobs = None if entry is None else completion_logprobs([entry], [event["text_offset"]])
            return with_readouts(chunk(event["row"], event["text"], None, logprobs), event)

        def last_chunk(i: int, payload: dict[str, Any]) -> dict[str, Any]:
            last = chunk(i, "", finish_reason(payload))
            last["choices"][0].update(choice_fields(payload, several, streamed=True))
            return last

        return stream(
            bridge,
            manager.run(entry, work),
            request,
            [],
            token_chunk,
            last_chunk,
            head,
            data,
            lambda p: seed_extras(p, req, data.model),
        )

    @get("/models", sync_to_thread=False)
    def models(self, manager: Manager) -> dict[str, Any]:
        """OpenAI's model list: every name a request may give (the loaded models' names, the configured aliases
        and custom models, the embedded ones)."""
        return {"object": "list", "data": [model_object(name) for name in model_names(manager)]}

    @get("/models/{model_id:path}")
    async def model(self, model_id: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        """OpenAI's ``Model`` for a name the list gives, or any other a request could load (a directory, a hub id
        in the local cache); 404 otherwise."""
        name = path_model_id(request, "/v1/models/", model_id)
        if name not in model_names(manager):
            # ModelNotFound (404) or Forbidden (403) when it names no model; a 404 too for what no loader takes
            report = await asyncio.to_thread(manager.probe_report, name)
            if report["selected"] is None:
                raise ModelNotFound(f"model: no installed loader can load {name!r}", field="model")
        return model_object(name)


def model_names(manager: Any) -> list[str]:
    settings = manager.settings
    loaded = [name for entry in manager.ready() for name in entry.names]
    return list(dict.fromkeys([*loaded, *settings.aliases, *settings.custom_models, *manager.shipped]))


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "loom"}


def stream(
    bridge: TokenBridge,
    job: Any,
    request: Request,
    first: list[dict[str, Any]],
    token_chunk: Any,  # a token event (its row: the choice, its text, its "logprob" when asked) -> one chunk
    last_chunk: Any,  # (choice, its payload) -> the chunk with its finish_reason
    usage_head: dict[str, Any],
    data: OpenAIFields,
    extras: Any,  # the first choice's payload -> fields the last chunk also carries
) -> ServerSentEvent:
    """OpenAI's stream: ``data: {chunk}`` lines, an error as ``data: {"error": ...}``, then ``data: [DONE]``."""
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    n = data.n or 1

    def message(obj: Any) -> ServerSentEventMessage:
        return ServerSentEventMessage(data=obj if isinstance(obj, str) else msgspec.json.encode(obj).decode())

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        for opening in first:
            yield message(opening)
        async for kind, value in bridge.events(job, request_id(request)):
            if kind == "token":
                yield message(token_chunk(value))
            elif kind == "done":
                for i, payload in enumerate(value):
                    yield message({**last_chunk(i, payload), **(extras(value[0]) if i == len(value) - 1 else {})})
                if include_usage:
                    yield message({**usage_head, "choices": [], "usage": usage(value, n)})
            else:
                error = openai_error(value["status"], value["title"], value["detail"], value.get("field"))
                # The status beside OpenAI's fields: a client can tell a 429 from a 422 once the stream has begun.
                yield message({"error": {**error, "status": value["status"], "request_id": value.get("request_id")}})
        yield message("[DONE]")

    return event_stream(events())
