"""The scheduler of one model: its thread runs loads, forward passes and generations, step by step.

Each step the model's thread decides what runs: every queued forward pass (/extract, /embed, /analyze) first,
merged with the compatible calls queued behind it (up to ``max_batch_size`` rows and ``max_batch_tokens`` padded
tokens) into one Batch and one Capture; then the generations that arrived join the running batch (a prefill pass);
then one decoding step of every running row. So a forward pass never waits for a generation, and a late generation
joins the running ones at the next step instead of waiting for them (continuous batching; the loader's
``LoadedModel.decoder``). A finished row leaves at once and frees its place. A model whose loader runs only whole
generations gets them through ``forward_with_states``, merged as forward passes are, while its other calls wait.

Each call gets what it would have alone: rows are padded so that padding changes nothing (the loader's contract),
every generated row keeps its own parameters and generator, and a merged capture is a superset (the union of
layers; every position when the specs differ) that is cut back per call.

Compatible: same model, both plain passes or both generations, texts or token ids alike, the same
``add_special_tokens`` and ``truncate``, and the same ``attention`` (attention weights switch the model to eager
attention: such generations run in a decoder of their own). Generations with different parameters merge only when
the loader honours ``Batch.row_generation`` (``LoadedModel.row_params``).

Failures stay with their request: a row the plugin refuses (InvalidField naming its ``row``) fails its own call
and the rest run again without it; any other error in a merged call reruns each call alone. A call whose request
was cancelled (client gone, timeout) is dropped while queued, and its generated rows stop at their next token.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import pluggy

from loom_kernel.errors import InvalidField, LoomError, ModelNotFound, Unsupported
from loom_kernel.inputs import fit_texts
from loom_kernel.metrics import ModelCounters
from loom_kernel.types import Batch, Capture, Decoder, ForwardOutput, LayerSel, LoadedModel, SequenceOutput

log = logging.getLogger("loom.batching")
T = TypeVar("T")
RECENT_S = 1.0  # how far back the batching window looks for the clients' concurrency
# A model's thread ends after this long with nothing to do; the next call or load starts another. Its OpenMP team
# (torch's intra-op threads) ends with it: libgomp counts every team's threads, and once they outnumber the CPUs
# it stops letting any worker spin between parallel regions, which slowed the passes of the model in use by
# 6-14% while a second, idle model's team merely existed (README, Performance).
IDLE_S = 2.0


class Cancelled(LoomError):
    """The request went away before its call ran (never sent: nobody is listening)."""

    status = 499
    title = "Client closed request"


@attrs.define(frozen=True)
class BatchLimits:
    max_batch_size: int = 32  # rows per merged call
    max_batch_tokens: int = 16384  # rows x longest row (prompt + max_tokens for a generation)
    window_s: float = 0.005  # how long to wait for more calls while requests are known to be on their way


@attrs.define(eq=False)
class Ticket:
    """One request on its way through a model: cancelled when its client leaves or its time runs out."""

    thread: ModelThread
    cancelled: threading.Event = attrs.field(factory=threading.Event)
    arrived: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    def arrive(self) -> None:
        """The request reached the model's queue (or finished without needing it)."""
        if not self.arrived:
            self.arrived = True
            self.thread.arriving_done()


_local = threading.local()


def run_with_ticket(ticket: Ticket, fn: Callable[[], T]) -> T:
    """Run ``fn`` on this (request) thread with its forward calls routed through ``ticket``'s model thread."""
    _local.ticket = ticket
    try:
        return fn()
    finally:
        _local.ticket = None
        ticket.arrive()


def current_ticket() -> Ticket | None:
    return getattr(_local, "ticket", None)


@attrs.define(eq=False)
class Call:
    """One request's forward_with_states call, waiting for the model thread."""

    pm: pluggy.PluginManager
    model: LoadedModel
    batch: Batch
    capture: Capture
    ticket: Ticket
    then: Callable[[ForwardOutput], Any] | None = None  # run on the model thread on its rows; its value is the result
    future: concurrent.futures.Future = attrs.field(factory=concurrent.futures.Future)
    _width: int | None = None
    _key: tuple[Any, ...] | None = None

    @property
    def rows(self) -> int:
        return len(self.batch.token_ids) if self.batch.token_ids is not None else len(self.batch.texts)

    def key(self) -> tuple[Any, ...]:
        """Calls with equal keys may be merged (computed once: the model thread compares it on every scan)."""
        if self._key is None:
            b, params = self.batch, self.batch.generation
            same_params = params is None or self.model.row_params
            self._key = (
                id(self.model),
                params is None,
                b.token_ids is None,
                b.add_special_tokens,
                b.truncate,
                self.capture.attention,
                None if same_params else params,
            )
        return self._key

    def width(self, limits: BatchLimits) -> int:
        """The longest row in tokens (plus what it may generate): the padded length it brings to a batch."""
        if self._width is None:
            b = self.batch
            if b.token_ids is not None:
                width = max(map(len, b.token_ids), default=0)
            else:
                # Characters (+2 special tokens) bound the tokens of any subword vocabulary: tokenize only when
                # the bound could break the token budget of a full batch.
                width = max(map(len, b.texts), default=0) + 2
                if width * limits.max_batch_size > limits.max_batch_tokens:
                    width = max(_token_lengths(self.model, b), default=0)
            if self.model.max_context and b.truncate:
                width = min(width, self.model.max_context)
            self._width = width + (b.generation.max_tokens if b.generation is not None else 0)
        return self._width


@attrs.define(eq=False)
class Joined:
    """Calls whose rows joined a decoder together, each waiting for all of its rows to finish."""

    decoder: Decoder
    calls: list[Call]
    ids: list[list[int]]  # per call, its rows' ids in the decoder
    merged: Capture

    def deliver(self, counters: ModelCounters) -> bool:
        """Answer every call whose rows are all done; whether every call is answered."""
        done = self.decoder.done
        for call, ids in zip(self.calls, self.ids, strict=True):
            if call.future.done() or not all(i in done for i in ids):
                continue
            rows = [done.pop(i) for i in ids]
            counters.prompt_tokens += sum(row.prompt_tokens for row in rows)
            counters.generated_tokens += sum(len(row.token_ids) - row.prompt_tokens for row in rows)
            call.future.set_result(ForwardOutput(rows=[restrict(row, call.capture, self.merged) for row in rows]))
        return all(call.future.done() for call in self.calls)


STEP = object()  # what the model's thread takes when nothing is queued but rows are generating
STOPPED = object()  # ... when it has been idle for IDLE_S: its OS thread ends


def _token_lengths(model: LoadedModel, batch: Batch) -> list[int]:
    try:
        ids = model.tokenizer(list(batch.texts), add_special_tokens=batch.add_special_tokens)["input_ids"]
        return [len(row) for row in ids]
    except Exception:  # a tokenizer of another shape: characters bound the tokens of any subword vocabulary
        return [len(text) + 2 for text in batch.texts]


class ModelThread:
    """The one thread that runs a model's torch work: loads, releases and (merged) forward calls, in order. The OS
    thread behind it ends when idle for ``IDLE_S`` and another starts with the next item, so at most one runs."""

    def __init__(self, name: str, limits: BatchLimits | None = None, counters: ModelCounters | None = None) -> None:
        self.limits = limits or BatchLimits()
        self.counters = counters or ModelCounters()
        self._cv = threading.Condition()
        self._items: deque[Call | tuple[Callable[[], Any], concurrent.futures.Future] | None] = deque()
        self._stopped = False
        self._arriving = 0  # admitted requests that have not reached the queue yet
        # Per key of plain passes: (when, most compatible calls queued or running at once); see _gather.
        self._peaks: dict[tuple[Any, ...], tuple[float, int]] = {}
        self._running: list[Call] = []  # the calls of the merged call running
        self.seconds_per_batch = 0.0  # moving average, for Retry-After
        self.seconds_per_pass = 0.0  # moving average of plain (not generating) passes
        self._name = f"loom-model:{name}"
        self._thread: threading.Thread | None = None  # the OS thread, while it runs (under the lock)
        # Generations, on the model's thread only: one decoder per attention mode, the calls waiting to join one,
        # and the calls whose rows are running.
        self._decoders: dict[bool, Decoder] = {}
        self._waiting: deque[Call] = deque()
        self._joined: list[Joined] = []

    # -- submitting --------------------------------------------------------------------------------------

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the model thread after what is queued (loads and releases)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            self._append((fn, fut))
        return fut

    def ticket(self) -> Ticket:
        with self._cv:
            self._arriving += 1
        return Ticket(self)

    def arriving_done(self) -> None:
        with self._cv:
            self._arriving -= 1
            self._cv.notify()

    def forward(
        self, ticket: Ticket, pm: pluggy.PluginManager, model: LoadedModel, batch: Batch, capture: Capture
    ) -> ForwardOutput:
        """One request's call, from its request thread: queued, maybe merged, and waited for."""
        return self.enqueue(ticket, pm, model, batch, capture).result()

    def enqueue(
        self,
        ticket: Ticket,
        pm: pluggy.PluginManager,
        model: LoadedModel,
        batch: Batch,
        capture: Capture,
        then: Callable[[ForwardOutput], T] | None = None,
    ) -> concurrent.futures.Future[T]:
        """One request's call queued (maybe merged); its future holds the rows, or ``then(rows)`` computed on the
        model's thread. Never cancel the future: cancel the ticket, and the call leaves the queue."""
        try:
            batch = fit_texts(model, batch)  # here, before the queue: the model's thread never sees a huge text
        except BaseException:
            ticket.arrive()
            raise
        call = Call(pm=pm, model=model, batch=batch, capture=capture, ticket=ticket, then=then)
        try:
            with self._cv:
                if self._stopped:
                    raise ModelNotFound(f"model: {model.ref.id!r} was unloaded", field="model")
                if batch.generation is None:
                    self._note_company(call.key())
                self._append(call)
        finally:
            ticket.arrive()
        return call.future

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._append(None)

    def _append(self, item: Call | tuple[Callable[[], Any], concurrent.futures.Future] | None) -> None:
        """Under the lock: queue ``item`` and wake the thread, or start one."""
        self._items.append(item)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        else:
            self._cv.notify()

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(isinstance(item, Call) for item in self._items) + len(self._waiting)

    @property
    def running_rows(self) -> int:
        return sum(d.running for d in list(self._decoders.values()))

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is STOPPED:
                return
            if item is None:
                with self._cv:
                    self._thread = None
                break
            if item is STEP:
                self._generate()
            elif isinstance(item, Call):
                if item.batch.generation is not None and item.model.decoder is not None:
                    self._waiting.append(item)  # joins at the next step boundary, after the queued passes
                    continue
                group = self._gather(item)
                start = time.perf_counter()
                self._execute(group)
                with self._cv:
                    self._running = []
                self._record(len(group), time.perf_counter() - start, item.batch.generation is None)
            else:
                fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to whoever waits on it
                        fut.set_exception(exc)
        self._fail_queued()

    def _next(self) -> Any:
        """The next queued item; STEP when none is queued and rows are generating or waiting to; None once
        stopped, or after IDLE_S with nothing to do (the OS thread then ends)."""
        with self._cv:
            idle_until = time.monotonic() + IDLE_S
            while not self._items:
                if self._waiting or any(d.busy for d in self._decoders.values()):
                    return STEP
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._thread = None  # under the lock: the next _append starts another
                    return STOPPED
                self._cv.wait(left)
            return self._items.popleft()

    # -- generations -------------------------------------------------------------------------------------------

    def _generate(self) -> None:
        """One step boundary: the waiting generations join, then every running row takes one decoding step."""
        self._join_waiting()
        for attention, decoder in list(self._decoders.items()):
            if not decoder.busy:
                continue
            start = time.perf_counter()
            try:
                decoder.step()
            except BaseException as exc:
                self._fail_decoder(attention, exc)
                continue
            self.counters.decode_steps += 1
            self.seconds_per_batch = _average(self.seconds_per_batch, time.perf_counter() - start)
            self._deliver()

    def _join_waiting(self) -> None:
        """Every waiting call that fits (``max_batch_size`` rows running) joins its decoder, in arrival order."""
        pending, self._waiting = list(self._waiting), deque()
        groups: dict[tuple[Any, ...], list[Call]] = {}
        for call in pending:
            if call.ticket.cancelled.is_set():
                call.future.set_exception(Cancelled("request: cancelled before it ran"))
            else:
                groups.setdefault(call.key(), []).append(call)
        for calls in groups.values():
            decoder = self._decoder(calls[0])
            rows, admitted = decoder.running, []
            for i, call in enumerate(calls):
                fits = rows + call.rows <= self.limits.max_batch_size or not (rows or admitted)
                if not decoder.joinable or not fits:
                    self._waiting.extend(calls[i:])
                    break
                admitted.append(call)
                rows += call.rows
            if admitted:
                self._join(decoder, admitted)

    def _decoder(self, call: Call) -> Decoder:
        attention = call.capture.attention
        if attention not in self._decoders:
            assert call.model.decoder is not None
            self._decoders[attention] = call.model.decoder(attention)
        return self._decoders[attention]

    def _join(self, decoder: Decoder, calls: list[Call]) -> None:
        """``calls`` prefilled into ``decoder`` as one batch; a prompt refused alone fails its own call."""
        while calls:
            batch, capture, starts = merge(calls)
            running = decoder.running
            try:
                ids = decoder.join(batch, capture)
            except InvalidField as exc:
                row = exc.extra.get("row")
                if len(calls) == 1 or row is None:
                    self._join_alone(decoder, calls, exc)
                    return
                i = max(j for j, s in enumerate(starts) if s <= row)
                extra = {**exc.extra, "row": row - starts[i]}
                calls.pop(i).future.set_exception(
                    InvalidField(exc.detail, field=exc.field, allowed=exc.allowed, **extra)
                )
                continue
            except BaseException as exc:
                self._join_alone(decoder, calls, exc)
                return
            if running:
                self.counters.joined_running += len(ids)
            self.counters.batches += 1
            self.counters.batched_requests += len(calls)
            per_call = [ids[s : s + c.rows] for c, s in zip(calls, starts, strict=True)]
            self._joined.append(Joined(decoder, calls, per_call, capture))
            self._deliver()
            return

    def _join_alone(self, decoder: Decoder, calls: list[Call], exc: BaseException) -> None:
        if len(calls) == 1:
            calls[0].future.set_exception(exc)
            return
        log.info("%d generations failed to join together (%s); joining each alone", len(calls), exc)
        for call in calls:
            self._join(decoder, [call])

    def _deliver(self) -> None:
        self._joined = [j for j in self._joined if not j.deliver(self.counters)]

    def _fail_decoder(self, attention: bool, exc: BaseException) -> None:
        """A step failed: every call with rows in that decoder fails with it, and the next join starts afresh."""
        decoder = self._decoders.pop(attention)
        log.error("a decoding step failed; %d running row(s) fail with it", decoder.running, exc_info=exc)
        for joined in [j for j in self._joined if j.decoder is decoder]:
            for call in joined.calls:
                if not call.future.done():
                    call.future.set_exception(exc)
        self._joined = [j for j in self._joined if j.decoder is not decoder]
        decoder.close()

    def _fail_queued(self) -> None:
        with self._cv:
            items, self._items = list(self._items), deque()
        calls = [item for item in items if isinstance(item, Call)] + list(self._waiting)
        calls += [call for joined in self._joined for call in joined.calls]
        for call in calls:
            if not call.future.done():
                call.future.set_exception(ModelNotFound("model: the model was unloaded", field="model"))
        self._waiting.clear()
        self._joined.clear()
        for decoder in self._decoders.values():
            decoder.close()
        self._decoders.clear()

    def _record(self, calls: int, seconds: float, plain: bool) -> None:
        log.debug("ran %d call(s) as one in %.1f ms", calls, seconds * 1000)
        self.counters.batches += 1
        self.counters.batched_requests += calls
        self.seconds_per_batch = _average(self.seconds_per_batch, seconds)
        if plain:
            self.seconds_per_pass = _average(self.seconds_per_pass, seconds)

    def _note_company(self, key: tuple[Any, ...]) -> None:
        """Under the lock, as a plain pass is queued: how many compatible calls are queued or running with it."""
        queued = sum(isinstance(item, Call) and item.key() == key for item in self._items)
        # A running call stops counting once it has its answer: its client may be sending again already.
        running = sum(call.key() == key and not call.future.done() for call in self._running)
        company = 1 + queued + running
        now = time.monotonic()
        when, peak = self._peaks.get(key, (0.0, 0))
        if company >= peak or now - when > RECENT_S:
            self._peaks[key] = (now, company)

    def _recent_peak(self, key: tuple[Any, ...], now: float) -> int:
        """The most compatible calls queued or running at once in the last second (1 when none)."""
        when, peak = self._peaks.get(key, (0.0, 1))
        return peak if now - when <= RECENT_S else 1

    def _gather(self, first: Call) -> list[Call]:
        """``first`` and the compatible calls queued behind it, waiting while more are known to be coming: up to
        the window after the last one joined (four windows in all), or up to one pass for as many calls as were
        recently queued or running at once."""
        limits = self.limits
        group, key = [first], first.key()
        rows, width = first.rows, first.width(limits)
        generation = first.batch.generation is not None
        start = time.monotonic()
        deadline = start + limits.window_s
        # A forward pass costs nearly as much for one row as for sixteen (the weights are read once either way), so
        # a batch that leaves without the clients that were recently queued or running beside these (they send
        # again) leaves them a pass of their own: waiting for them up to one pass never costs throughput. Counted
        # as calls queued or running at once, not as the last batch: clients split into two groups that take
        # turns (each sends while the other's pass runs) would otherwise keep running half batches, each pass
        # slowed by the other group's HTTP work. Generations (hundreds of milliseconds) wait only the window:
        # their companions may still be in the HTTP layer.
        peak = 1 if generation else self._recent_peak(key, start)
        patience = start + max(limits.window_s, self.seconds_per_pass)
        with self._cv:
            while True:
                joined, full = len(group), rows >= limits.max_batch_size
                for item in list(self._items):
                    if item is None or not isinstance(item, Call) or item.key() != key:
                        continue
                    wide = max(width, item.width(limits))
                    if rows + item.rows > limits.max_batch_size or (rows + item.rows) * wide > limits.max_batch_tokens:
                        full = True  # a companion waits that does not fit: more waiting cannot grow this batch
                        continue
                    self._items.remove(item)
                    group.append(item)
                    rows, width = rows + item.rows, wide
                if full or rows >= limits.max_batch_size:
                    break
                now = time.monotonic()
                if len(group) > joined:
                    deadline = min(start + 4 * limits.window_s, now + limits.window_s)
                # Known to be coming: admitted requests that have not reached the queue (a lone client's /embed
                # never waits), a generation's possible companions, the clients of the recent peak.
                until = deadline if generation or self._arriving > 0 else now
                if len(group) < peak:
                    until = max(until, patience)
                if now >= until:
                    break
                self._cv.wait(until - now)
            self._running = group
        return group

    def _execute(self, calls: list[Call]) -> None:
        live = []
        for call in calls:
            if call.ticket.cancelled.is_set():
                call.future.set_exception(Cancelled("request: cancelled before it ran"))
            else:
                live.append(call)
        while live:
            merged_batch, merged_capture, starts = merge(live)
            try:
                out = call_forward(live[0].pm, live[0].model, merged_batch, merged_capture)
            except InvalidField as exc:
                row = exc.extra.get("row")
                if len(live) == 1 or row is None:
                    self._fail_alone(live, exc)
                    return
                i = max(j for j, s in enumerate(starts) if s <= row)
                extra = {**exc.extra, "row": row - starts[i]}
                own = InvalidField(exc.detail, field=exc.field, allowed=exc.allowed, **extra)
                live.pop(i).future.set_exception(own)
                continue
            except BaseException as exc:
                self._fail_alone(live, exc)
                return
            self.counters.prompt_tokens += sum(row.prompt_tokens for row in out.rows)
            self.counters.generated_tokens += sum(len(row.token_ids) - row.prompt_tokens for row in out.rows)
            for call, start in zip(live, starts, strict=True):
                rows = out.rows[start : start + call.rows]
                if len(live) > 1:
                    rows = [restrict(row, call.capture, merged_capture) for row in rows]
                own = ForwardOutput(rows=rows)
                if call.then is None:
                    call.future.set_result(own)
                    continue
                try:
                    call.future.set_result(call.then(own))
                except BaseException as exc:  # its own request's error, not the batch's
                    call.future.set_exception(exc)
            return

    def _fail_alone(self, live: list[Call], exc: BaseException) -> None:
        """One call: its error. Several: each runs again alone, so only the one at fault fails."""
        if len(live) == 1:
            live[0].future.set_exception(exc)
            return
        log.info("a merged call of %d requests failed (%s); running each alone", len(live), exc)
        for call in live:
            self._execute([call])


def _average(previous: float, seconds: float) -> float:
    return seconds if not previous else 0.8 * previous + 0.2 * seconds


def call_forward(pm: pluggy.PluginManager, model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    """The forward_with_states hook, here on the model thread (or in-process, outside a server)."""
    out = pm.hook.forward_with_states(model=model, batch=batch, capture=capture)
    if out is None:
        raise Unsupported(f"loader: no plugin runs forward passes for loader {model.loader!r}", field="loader")
    return out


# -- merging and splitting ---------------------------------------------------------------------------------


def merge(calls: list[Call]) -> tuple[Batch, Capture, list[int]]:
    """One Batch and one Capture for ``calls`` (each call's first row number in it); a lone call as it is, with
    only a cancellation check added to its generation."""
    starts, at = [], 0
    for call in calls:
        starts.append(at)
        at += call.rows
    first = calls[0].batch
    capture = merge_captures([c.capture for c in calls])
    on_token = _merged_on_token(calls, capture) if first.generation is not None else first.on_token
    if len(calls) == 1:
        return attrs.evolve(first, on_token=on_token), capture, starts
    params = [c.batch.generation for c in calls for _ in range(c.rows)]
    texts = first.token_ids is None
    batch = attrs.evolve(
        first,
        texts=tuple(t for c in calls for t in c.batch.texts) if texts else (),
        token_ids=None if texts else tuple(ids for c in calls for ids in c.batch.token_ids or ()),
        row_generation=None if first.generation is None or len(set(params)) == 1 else tuple(params),
        on_token=on_token,
    )
    return batch, capture, starts


def merge_captures(captures: list[Capture]) -> Capture:
    """A capture that holds every one of ``captures``: the union of their layers (keyed by index), every position
    when their positions differ, the most alternatives any asks for."""
    if all(c == captures[0] for c in captures):
        return captures[0]
    indices = sorted({sel.index for c in captures if c.wanted for sel in c.layers})
    positions = captures[0].positions
    if any(c.positions != positions for c in captures if c.wanted):
        positions = "all"
    tops = [c.top_logprobs for c in captures if c.top_logprobs is not None]
    return Capture(
        layers=tuple(LayerSel(key=str(i), index=i) for i in indices),
        positions=positions,
        states=any(c.wants_states for c in captures),
        attention=any(c.attention for c in captures),
        top_logprobs=max(tops) if tops else None,
        logits=any(c.logits for c in captures),
        stream_states=any(c.stream_states for c in captures),
    )


def restrict(row: SequenceOutput, capture: Capture, merged: Capture) -> SequenceOutput:
    """``row`` of a merged call cut back to what ``capture`` asked for."""
    if capture == merged:
        return row
    keys = {sel.index: sel.key for sel in merged.layers}
    return attrs.evolve(
        row,
        states={s.key: row.states[keys[s.index]] for s in capture.layers} if capture.wants_states else {},
        attentions={s.key: row.attentions[keys[s.index]] for s in capture.attention_layers},
        logprobs=[_top(e, capture.top_logprobs) for e in row.logprobs] if capture.top_logprobs is not None else [],
        logits=row.logits if capture.logits else None,
    )


def _top(entry: dict[str, Any], k: int) -> dict[str, Any]:
    return {**entry, "top": entry["top"][:k]}


def _merged_on_token(calls: list[Call], merged: Capture) -> Callable[..., bool]:
    """Route each row's tokens to its own call's ``on_token`` (row renumbered, extras cut to what it asked for);
    a row whose request was cancelled stops."""
    owner = [(call, row) for call in calls for row in range(call.rows)]

    def on_token(row: int, token: int, piece: str, extras: dict[str, Any] | None = None) -> bool:
        call, local = owner[row]
        if call.ticket.cancelled.is_set():
            return False
        if call.batch.on_token is None:
            return True
        return call.batch.on_token(local, token, piece, _extras(extras or {}, call.capture, merged)) is not False

    return on_token


def _extras(extras: dict[str, Any], capture: Capture, merged: Capture) -> dict[str, Any]:
    if capture == merged:
        return extras
    out: dict[str, Any] = {}
    if capture.stream_states and "states" in extras:
        keys = {sel.index: sel.key for sel in merged.layers}
        out["states"] = {s.key: extras["states"][keys[s.index]] for s in capture.layers}
    if capture.top_logprobs is not None and "logprob" in extras:
        out["logprob"] = _top(extras["logprob"], capture.top_logprobs)
    return out
