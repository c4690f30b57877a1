"""The output processor: what a running generation's passes give, turned into text, stream events and answers on a
thread of its own, so that the model's thread only runs passes and picks tokens (vLLM's ``OutputProcessor``).

Per row it keeps the tokens, their text (``Detokenizer``: a constant cost a token), the states and attention the
passes captured, log-probabilities and logits. It checks stop strings as the text grows, holds back what may still
become one (and an incomplete UTF-8 character), calls the row's ``on_token`` (a stream's events, a stop rule, a
request that left), and when a row stops early it tells the engine (``abort``). Once the engine says a row is done
its ``SequenceOutput`` is made, and a call is answered when all its rows are.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

import attrs

from loom_kernel.detokenize import Detokenizer, decode
from loom_kernel.errors import LoomError
from loom_kernel.generating import keeps_last_token
from loom_kernel.merging import restrict
from loom_kernel.openmp import one_torch_thread
from loom_kernel.types import Capture, ForwardOutput, SequenceOutput

if TYPE_CHECKING:
    from loom_kernel.calls import Call
    from loom_kernel.generating import Engine, Event

log = logging.getLogger("loom.output")


@attrs.define(eq=False)
class Expected:
    """A row the processor will receive events for: its place in its call and what it asked for."""

    id: int
    call: Call
    slot: int  # the row's number in the merged batch it joined with (its on_token's row)
    on_token: Any  # the merged batch's: routes each row's events to its own call's
    prompt: list[int]
    capture: Capture  # the merged capture of its join
    stops: tuple[str, ...]
    engine: Engine


@attrs.define(eq=False)
class RowState:
    spec: Expected
    detok: Detokenizer
    tokens: list[int] = attrs.field(factory=list)
    text: str = ""
    emitted: str = ""
    stop_at: int | None = None  # the generated token at which a stop string (or on_token) ended the row
    stopped: str | None = None
    chunks: dict[int | str, dict[int, Any]] = attrs.field(factory=dict)  # key -> position -> [fed, ...]
    attn: dict[int, dict[int, Any]] = attrs.field(factory=dict)
    fills: dict[int | str, float] = attrs.field(factory=dict)
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    logits: list[Any] = attrs.field(factory=list)
    held: tuple[int, str, dict[str, Any]] | None = None  # a token whose event waits for its states
    result: SequenceOutput | BaseException | None = None


class Processor:
    """One per model thread. ``expect`` registers the rows of joining calls, ``put`` hands it a pass's events;
    both are queued, in order, for its thread."""

    def __init__(self, name: str, tokenizer: Any, thread: bool = True) -> None:
        """``thread``: False processes each item as it is handed over (a generation run whole, outside a server)."""
        self.tokenizer = tokenizer
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._rows: dict[int, RowState] = {}
        self._calls: dict[int, tuple[Call, list[int], Capture]] = {}
        self._threaded = thread
        if thread:
            threading.Thread(target=self._run, name=f"loom-output:{name}", daemon=True).start()

    def expect(self, call: Call, rows: dict[int, Expected], merged: Capture) -> None:
        self._hand(("expect", call, rows, merged))

    def put(self, events: list[Event]) -> None:
        self._hand(("events", events))

    def stop(self) -> None:
        if self._threaded:
            self._queue.put(None)

    def _hand(self, item: tuple[Any, ...]) -> None:
        if self._threaded:
            self._queue.put(item)
        else:
            self._process(item)

    # -- its thread ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        one_torch_thread()
        while (item := self._queue.get()) is not None:
            self._process(item)

    def _process(self, item: tuple[Any, ...]) -> None:
        try:
            if item[0] == "expect":
                self._expect(*item[1:])
                return
            for event in item[1]:
                try:
                    self._event(event)
                except Exception as exc:  # the row's own fault (its on_token, a stop rule): its answer alone
                    self._fail(event.row, exc)
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the output processor failed")
            for row in list(self._rows):
                self._fail(row, exc)

    def _fail(self, row: int, exc: BaseException) -> None:
        """``row`` answers ``exc`` and stops: the engine drops it at the next boundary."""
        state = self._rows.get(row)
        if state is None or state.result is not None:
            return
        state.result = exc
        if state.stopped is None:
            self._stop(state, len(state.tokens) - 1, "error")
        self._deliver()

    def _expect(self, call: Call, rows: dict[int, Expected], merged: Capture) -> None:
        for row_id, spec in rows.items():
            self._rows[row_id] = RowState(spec=spec, detok=Detokenizer(self.tokenizer))
        self._calls[id(call)] = (call, list(rows), merged)

    def _event(self, event: Event) -> None:
        state = self._rows.get(event.row)
        if state is None or state.result is not None:
            return
        if event.states:
            self._keep_states(state, event.at, event.fed, event.states, event.fills or {})
        if event.attentions:
            self._keep_attention(state, event.at, event.fed, event.attentions)
        if state.held is not None and event.states and event.at <= self._position(state) < event.at + event.fed:
            self._release_held(state)
        if event.error is not None:  # the row's answer, final: its later done event finds it answered
            state.result = event.error
            self._deliver()
            return
        if event.token is not None and state.stopped is None:
            self._token(state, event)
        if event.done:
            if state.result is None:
                state.result = self._output(state, event.finish)
            self._deliver()

    def _token(self, state: RowState, event: Event) -> None:
        spec = state.spec
        state.tokens.append(event.token)
        k = len(state.tokens) - 1
        if event.logprob is not None:
            state.logprobs.append(event.logprob)
        if event.logits is not None:
            state.logits.append(event.logits)
        piece = state.detok.push(event.token)
        before = len(state.text)
        state.text += piece
        if spec.stops and (cut := stop_hit(state.text, before, spec.stops)) is not None:
            state.text = state.text[:cut]
            self._stop(state, k, "stop")
        finished = state.stopped is not None or event.finish is not None
        if finished:  # once, at the end: what a piece still held (an incomplete character) is the text's too
            state.text = self._text(state)
        out = ""
        safe = state.text if finished else streamable(state.text, spec.stops, len(state.emitted))
        if len(safe) > len(state.emitted):
            out, state.emitted = safe[len(state.emitted) :], safe
        extras: dict[str, Any] = {}
        if event.logprob is not None:
            extras["logprob"] = event.logprob
        if spec.capture.stream_states and spec.capture.wants_states:
            state.held = (event.token, out, extras)  # its states come with the next pass
        else:
            self._emit(state, event.token, out, extras)

    def _release_held(self, state: RowState) -> None:
        token, piece, extras = state.held  # type: ignore[misc]
        state.held = None
        position = self._position(state)
        extras["states"] = {
            key: state.chunks[at][position] for key, at in _keys(state.spec.capture) if position in state.chunks[at]
        }
        self._emit(state, token, piece, extras)

    def _emit(self, state: RowState, token: int, piece: str, extras: dict[str, Any]) -> None:
        if state.spec.on_token is None:
            return
        result = state.spec.on_token(state.spec.slot, token, piece, extras)
        if state.stopped is None and (result is False or isinstance(result, str)):
            self._stop(state, len(state.tokens) - 1, result or "stop")

    def _stop(self, state: RowState, k: int, reason: str) -> None:
        """The row ends after its generated token ``k``: the engine drops what it picked after it."""
        state.stop_at, state.stopped = k, reason
        state.spec.engine.abort(state.spec.id, k, reason)

    def _position(self, state: RowState) -> int:
        """The sequence position of the held token."""
        return len(state.spec.prompt) + len(state.tokens) - 1

    # -- states ---------------------------------------------------------------------------------------------------

    def _keep_states(
        self, state: RowState, at: int, fed: int, states: dict[int | str, Any], fills: dict[int | str, float]
    ) -> None:
        """File a pass's rows by their sequence positions; a capture of "last" keeps only the positions that may
        still be the last (from the newest accepted token on)."""
        state.fills.update({k: v for k, v in fills.items() if k in states})
        for key, t in states.items():
            rows = t.shape[0]
            kept = state.chunks.setdefault(key, {})
            for j in range(rows):
                kept[at + fed - rows + j] = t[j : j + 1]
            if state.spec.capture.positions == "last":
                floor = len(state.spec.prompt) + max(0, len(state.tokens) - 1) - 1
                for p in [p for p in kept if p < floor]:
                    del kept[p]

    def _keep_attention(self, state: RowState, at: int, fed: int, attentions: dict[int, Any]) -> None:
        for index, a in attentions.items():
            rows = a.shape[1]
            kept = state.attn.setdefault(index, {})
            for j in range(rows):
                kept[at + fed - rows + j] = a[:, j : j + 1]

    def _output(self, state: RowState, finish: str | None) -> SequenceOutput:
        import torch

        spec = state.spec
        n = state.stop_at + 1 if state.stop_at is not None else len(state.tokens)
        generated = state.tokens[:n]
        total = len(spec.prompt) + len(generated)
        positions = spec.capture.kept_positions(total) if keeps_last_token(spec.capture) else []
        states = {}
        for key, at in _keys(spec.capture) if spec.capture.wants_states else ():
            chunks = [state.chunks[at][p] for p in positions]
            fill = state.fills.get(at)
            if fill is not None:  # scores, patterns: each row's keys so far, the later ones filled
                chunks = [_pad_keys(c, total, fill) for c in chunks]
            states[key] = torch.cat(chunks, dim=0) if chunks else torch.empty(0)
        attentions = {}
        for sel in spec.capture.attention_layers:
            kept = state.attn[sel.index]
            rows = [kept[p] for p in positions]
            full = torch.zeros((rows[0].shape[0], len(rows), total), dtype=rows[0].dtype)
            for j, r in enumerate(rows):  # a query sees the keys so far; later keys stay zero (causal)
                full[:, j : j + 1, : r.shape[2]] = r
            attentions[sel.key] = full
        return SequenceOutput(
            token_ids=[*spec.prompt, *generated],
            prompt_tokens=len(spec.prompt),
            text=self._text(state),
            finish_reason=state.stopped or finish,
            positions=positions,
            states=states,
            attentions=attentions,
            logprobs=state.logprobs[:n],
            logits=torch.stack(state.logits[:n]) if state.logits else None,
        )

    def _text(self, state: RowState) -> str:
        """The row's whole text, decoded once (what ``decode`` gives, cut before a stop string)."""
        n = state.stop_at + 1 if state.stop_at is not None else len(state.tokens)
        text = decode(self.tokenizer, state.tokens[:n])
        return cut_at_stop(text, state.spec.stops) if state.spec.stops else text

    def _deliver(self) -> None:
        """Answer every call whose rows are all done."""
        for key, (call, ids, merged) in list(self._calls.items()):
            results = [self._rows[i].result for i in ids]
            if any(r is None for r in results):
                continue
            del self._calls[key]
            for i in ids:
                del self._rows[i]
            failed = next((r for r in results if isinstance(r, BaseException) and not _own(r)), None)
            if failed is not None:
                call.future.set_exception(failed)
                continue
            rows = [r if isinstance(r, BaseException) else restrict(r, call.capture, merged) for r in results]
            call.answer(ForwardOutput(rows=rows))  # type: ignore[arg-type]


def _own(exc: BaseException) -> bool:
    """An error of one row alone (its answer), not of the batch."""
    return isinstance(exc, LoomError) and exc.status < 500


def _keys(capture: Capture) -> list[tuple[str, int | str]]:
    """(answer key, where the row keeps it) for every layer and site ``capture`` asks for."""
    return [(sel.key, sel.index) for sel in capture.layers] + [(name, name) for name in capture.sites]


def _pad_keys(t: Any, total: int, fill: float) -> Any:
    """A keyed point's rows [P, heads, keys so far] to ``total`` key positions; the later ones hold ``fill``."""
    import torch

    out = torch.full((*t.shape[:-1], total), fill, dtype=t.dtype)
    out[..., : t.shape[-1]] = t
    return out


def stop_hit(text: str, before: int, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string that the newest piece completed starts (only the text's tail is searched:
    a stop string that ended earlier would have stopped the row then)."""
    start = max(0, before - max(map(len, stops)) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


def streamable(text: str, stops: tuple[str, ...], start: int = 0) -> str:
    """The part of ``text`` safe to stream now. Held back: a trailing incomplete UTF-8 character (U+FFFD until its
    last byte arrives) and a suffix that may be the start of a stop string (it must never reach the client if the
    stop completes). ``start``: how much of it is streamed already; no held suffix starts before it (text that was
    no stop's start then never becomes one), so a token costs what its own piece and the held tail cost, not the
    whole text times a stop's length. Only the lengths whose last character is the text's are compared."""
    end = len(text)
    while end > start and text[end - 1] == "\ufffd":
        end -= 1
    if end <= start:
        return text[:end]
    last = text[end - 1]
    hold = 0
    for stop in stops:
        k = min(len(stop) - 1, end - start)
        while k > hold:  # the longest prefix of ``stop`` longer than ``hold`` that the text ends with
            j = stop.rfind(last, hold, k)
            if j < 0:
                break
            if text.endswith(stop[: j + 1], 0, end):
                hold = j + 1
                break
            k = j
    return text[: end - hold]
