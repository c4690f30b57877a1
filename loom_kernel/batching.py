"""A model's thread: the loop that runs what its scheduler decides (``loom_kernel.scheduler``), one item at a time.

Loads and releases run in the order they came; a plain pass (/extract, /embed, /analyze) runs merged with the
compatible calls queued behind it, as one ``forward_with_states`` call whose rows are cut back per call; at a step
boundary the waiting generations join the running batch (one prefill pass) and every running row takes one
decoding step (``generating.Engine`` over the loader's ``Decoder``), the answers made by the output processor
(``output.Processor``) off this thread. A model whose loader runs only whole generations gets them through
``forward_with_states``, merged as passes are.

Each call gets what it would have alone: rows are padded so that padding changes nothing (the loader's contract),
every generated row keeps its own parameters and generator, and a merged capture is a superset (the union of
layers) that is cut back per call.

Compatible: plain passes of the same model with texts or token ids alike, the same ``add_special_tokens`` and
``truncate``, the same attention mode (``Call.mode``) and the same positions kept; generations joining the same
decoder (one per attention mode: attention weights switch the model to eager attention, a point inside attention to
the loader's own), tokenized before they are queued and sampled by the kernel
row by row with their own parameters. A loader that runs whole generations gets generations of different
parameters merged only when it honours ``Batch.row_generation`` (``LoadedModel.row_params``).

Failures stay with their request: a generated row refused or failing alone is its own result; in a merged plain
pass, a row the plugin refuses (InvalidField naming its ``row``) fails its own call and the rest run again without
it, and any other error reruns each call alone. A call whose request was cancelled (client gone, timeout) is
dropped while queued, and its generated rows stop at their next token.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pluggy

from loom_kernel.calls import Call, Cancelled, Ticket
from loom_kernel.errors import InvalidField, ModelNotFound, Unsupported
from loom_kernel.generating import Engine, Event
from loom_kernel.inputs import fit_texts, tokenize_rows
from loom_kernel.merging import merge, pick, restrict
from loom_kernel.metrics import ModelCounters
from loom_kernel.output import Expected, Processor
from loom_kernel.scheduler import STEP, BatchLimits, Scheduler, passes
from loom_kernel.types import Batch, Capture, ForwardOutput, LoadedModel, RowInput

log = logging.getLogger("loom.batching")
T = TypeVar("T")
# A model's thread ends after this long with nothing to do; the next call or load starts another. Its OpenMP team
# (torch's intra-op threads) ends with it: libgomp counts every team's threads, and once they outnumber the CPUs
# it stops letting any worker spin between parallel regions, which slowed the passes of the model in use by
# 6-14% while a second, idle model's team merely existed (docs/performance.md).
IDLE_S = 2.0


STOP = object()  # queued by ``stop``: the thread fails what is left and ends
STOPPED = object()  # what the model's thread takes when it has been idle for IDLE_S: its OS thread ends


class ModelThread:
    """The one thread that runs a model's torch work: loads, releases and (merged) forward calls, in order. The OS
    thread behind it ends when idle for ``IDLE_S`` and another starts with the next item, so at most one runs."""

    def __init__(self, name: str, limits: BatchLimits | None = None, counters: ModelCounters | None = None) -> None:
        self.scheduler = Scheduler(limits)
        self.limits = self.scheduler.limits
        self.counters = counters or ModelCounters()
        self._cv = threading.Condition()
        self._stopped = False
        self.seconds_per_batch = 0.0  # moving average, for Retry-After
        self.seconds_per_pass = 0.0  # moving average of plain passes: how long a pass may wait for company
        self._name = f"loom-model:{name}"
        self._thread: threading.Thread | None = None  # the OS thread, while it runs (under the lock)
        # Generations, on the model's thread only: one engine per attention mode, their output processor.
        self._engines: dict[tuple[bool, bool], Engine] = {}
        self._output: Processor | None = None  # made with the first generation, ended with the thread's model
        self._row_ids = itertools.count()
        self._interjecting = False  # a call runs between two passes of another (on the model's thread only)

    # -- submitting --------------------------------------------------------------------------------------

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the model thread after what is queued (loads and releases)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            self._append((fn, fut))
        return fut

    def enqueue(
        self,
        ticket: Ticket,
        pm: pluggy.PluginManager,
        model: LoadedModel,
        batch: Batch,
        capture: Capture,
        then: Callable[[ForwardOutput], Any] | None = None,
    ) -> concurrent.futures.Future:
        """One request's call queued (maybe merged): its future holds the rows, or ``then(rows)`` computed on this
        thread right after the pass. Cancel the ticket, never the future: the call then leaves the queue, or its
        rows stop."""
        batch, cut = fit_texts(model, batch)  # here, before the queue: the model's thread never sees a huge text
        call = Call(pm=pm, model=model, batch=batch, capture=capture, ticket=ticket, then=then, cut=cut)
        with self._cv:
            if self._stopped:
                raise ModelNotFound(f"model: {model.ref.id!r} was unloaded", field="model")
            self._append(call)
        return call.future

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._append(STOP)

    def _append(self, item: Any) -> None:
        """Under the lock: queue ``item`` and wake the thread, or start one."""
        self.scheduler.add(item, time.monotonic())
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        else:
            self._cv.notify()

    @property
    def queued(self) -> int:
        with self._cv:
            return self.scheduler.queued

    @property
    def running_rows(self) -> int:
        return sum(e.running for e in list(self._engines.values()))

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is STOPPED:
                return
            if item is STOP:
                with self._cv:
                    self._thread = None
                break
            try:
                if item is STEP:
                    self._generate()
                elif isinstance(item, Call):
                    self._call(item)
                else:
                    fn, fut = item
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # handed to whoever waits on it
                            fut.set_exception(exc)
            except BaseException as exc:  # a fault outside any call's own handling: an answer, never a hang
                log.error("the model's thread failed; the work in hand fails with it", exc_info=exc)
                for mode in list(self._engines):
                    self._fail_engine(mode, exc)
        self._fail_queued()

    def _next(self) -> Any:
        """What the scheduler says runs next; STOPPED after IDLE_S with nothing to do."""
        with self._cv:
            idle_until = time.monotonic() + IDLE_S
            while True:
                item = self.scheduler.next(any(e.busy for e in self._engines.values()))
                if item is not None:
                    return item
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._thread = None  # under the lock: the next _append starts another
                    return STOPPED
                self._cv.wait(left)

    def _call(self, first: Call) -> None:
        """``first`` and the compatible calls gathered with it, run; a fault outside their own handling fails them
        (and is raised on)."""
        group = [first]
        try:
            group = self._gather(first)
            self._count(len(group))  # before any answer: a client reading the counters next sees it
            start = time.perf_counter()
            self._execute(group)
            self._record(time.perf_counter() - start, first.batch.generation is None)
        except BaseException as exc:
            _fail(group, exc)
            raise
        finally:
            with self._cv:
                self.scheduler.ran()

    def _interject(self, calls: list[Call]) -> None:
        """Between two passes of ``calls``: another owner's queued call whose turn it is runs (once: not between
        its own passes), and the company the scheduler counts is ``calls`` again after it."""
        if self._interjecting:
            return
        with self._cv:
            item, running = self.scheduler.interject({call.owner for call in calls}), self.scheduler.running
        if item is None:
            return
        self._interjecting = True
        try:
            self._call(item)
        except BaseException as exc:  # its calls have their answer; the passes in hand go on
            log.error("a call run between two passes failed outside its own handling", exc_info=exc)
        finally:
            self._interjecting = False
            with self._cv:
                self.scheduler.running = running

    def _gather(self, first: Call) -> list[Call]:
        """``first`` and the compatible calls queued behind it, waiting for company as the scheduler says."""
        with self._cv:
            generating = bool(self.scheduler.waiting) or any(e.busy for e in self._engines.values())
            g = self.scheduler.gathering(first, time.monotonic(), self.seconds_per_pass, generating)
            while True:
                self.scheduler.gather(g)
                now = time.monotonic()
                if g.ready(now, self.limits):
                    return g.group
                self._cv.wait(g.deadline - now)

    # -- generations -------------------------------------------------------------------------------------------

    def _generate(self) -> None:
        """One step boundary: the waiting generations join, then every running row takes one decoding step."""
        with self._cv:
            joining, cancelled = self.scheduler.admit(self._room)
        for call in cancelled:
            call.future.set_exception(Cancelled("request: cancelled before it ran"))
        for calls in joining:
            try:
                self._join(self._engine(calls[0]), calls)
            except BaseException as exc:  # no decoder, or one that took the rows and could not let them go
                log.error("%d generation(s) could not join", len(calls), exc_info=exc)
                _fail(calls, exc)
                if calls[0].mode in self._engines:  # its state is no longer known
                    self._fail_engine(calls[0].mode, exc)
        for mode, engine in list(self._engines.items()):
            if not engine.busy:
                continue
            start = time.perf_counter()
            try:
                engine.step()
            except BaseException as exc:
                self._fail_engine(mode, exc)
                continue
            self.counters.decode_steps += 1
            self.seconds_per_batch = _average(self.seconds_per_batch, time.perf_counter() - start)

    def _room(self, call: Call) -> tuple[tuple[bool, bool], int, bool]:
        engine = self._engines.get(call.mode)
        return (call.mode, engine.running, engine.joinable) if engine is not None else (call.mode, 0, True)

    def _engine(self, call: Call) -> Engine:
        if call.mode not in self._engines:
            assert call.model.decoder is not None
            if self._output is None:
                self._output = Processor(self._name, call.model.tokenizer)
            decoder = call.model.decoder(call.capture.attention)
            self._engines[call.mode] = Engine(call.model, decoder, self._output.put, self.counters)
        return self._engines[call.mode]

    def _join(self, engine: Engine, calls: list[Call]) -> None:
        """``calls`` (their rows tokenized and checked before they were queued) prefilled as one batch."""
        assert self._output is not None
        self._count(len(calls))  # before the output processor answers any of them
        if engine.running:
            self.counters.joined_running += sum(call.rows for call in calls)
        join(engine, self._output, calls, self._row_ids, self.limits)

    def _fail_engine(self, mode: tuple[bool, bool], exc: BaseException) -> None:
        """A step failed: every row of that engine fails with it, and the next join starts afresh."""
        engine = self._engines.pop(mode)
        log.error("a decoding step failed; %d running row(s) fail with it", engine.running, exc_info=exc)
        engine.fail(exc)

    def _fail_queued(self) -> None:
        with self._cv:
            items, self.scheduler.items = list(self.scheduler.items), deque()
            waiting, self.scheduler.waiting = list(self.scheduler.waiting), deque()
        gone = ModelNotFound("model: the model was unloaded", field="model")
        for call in [item for item in items if isinstance(item, Call)] + waiting:
            if not call.future.done():
                call.future.set_exception(gone)
        for engine in self._engines.values():
            engine.fail(gone)
        self._engines.clear()
        if self._output is not None:
            self._output.stop()
            self._output = None

    def _count(self, calls: int) -> None:
        self.counters.batches += 1
        self.counters.batched_requests += calls

    def _record(self, seconds: float, plain: bool) -> None:
        log.debug("ran a batch in %.1f ms", seconds * 1000)
        self.seconds_per_batch = _average(self.seconds_per_batch, seconds)
        if plain:
            self.seconds_per_pass = _average(self.seconds_per_pass, seconds)

    def _execute(self, calls: list[Call]) -> None:
        live = []
        for call in calls:
            if call.ticket.cancelled.is_set():
                call.future.set_exception(Cancelled("request: cancelled before it ran"))
            else:
                live.append(call)
        while live:
            try:
                merged_batch, merged_capture, starts = merge(live)
                out = self._passes(live, merged_batch, merged_capture)
            except Cancelled as exc:
                _fail(live, exc)
                return
            except InvalidField as exc:
                if _fail_refused(live, starts, exc):
                    continue
                self._fail_alone(live, exc)
                return
            except BaseException as exc:
                self._fail_alone(live, exc)
                return
            self.counters.prompt_tokens += sum(row.prompt_tokens for row in out.rows)
            self.counters.generated_tokens += sum(len(row.token_ids) - row.prompt_tokens for row in out.rows)
            for call, start in zip(live, starts, strict=True):
                try:
                    rows = out.rows[start : start + call.rows]
                    if len(live) > 1:
                        rows = [restrict(row, call.capture, merged_capture) for row in rows]
                except BaseException as exc:  # this call's rows could not be cut out: its own answer
                    call.future.set_exception(exc)
                    continue
                call.answer(ForwardOutput(rows=rows))
            return

    def _passes(self, calls: list[Call], batch: Batch, capture: Capture) -> ForwardOutput:
        """``batch`` (``calls`` merged) run as the passes the limits allow (``scheduler.passes``), its rows answered
        in their order, the running generations taking a step and another owner's call running between two passes;
        Cancelled when every call was cancelled before its last pass. A row refused in a pass of several is
        renumbered as the whole batch's."""
        pm, model = calls[0].pm, calls[0].model
        parts = [list(range(batch.size))]
        if batch.generation is None:  # a whole generation's rows run as they were merged
            parts = passes([w for call in calls for w in call.widths(self.limits)], self.limits)
        if len(parts) == 1:
            return call_forward(pm, model, batch, capture)
        rows: list[Any] = [None] * batch.size
        for k, part in enumerate(parts):
            if all(call.cancelled for call in calls):
                raise Cancelled("request: cancelled between its passes")
            if k:  # between two passes: streams do not wait for a request's every pass, nor another owner's request
                if any(engine.busy for engine in self._engines.values()):
                    self._generate()
                self._interject(calls)
            try:
                out = call_forward(pm, model, pick(batch, part), capture)
            except InvalidField as exc:
                # A pass of one row names none: what it refuses is that row.
                row = exc.extra.get("row", 0 if len(part) == 1 else None)
                raise exc if row is None else _renumbered(exc, part[row]) from None
            for i, row_out in zip(part, out.rows, strict=True):
                rows[i] = row_out
        return ForwardOutput(rows=rows)

    def _fail_alone(self, live: list[Call], exc: BaseException) -> None:
        """One call: its error. Several: each runs again alone, so only the one at fault fails."""
        if len(live) == 1:
            live[0].future.set_exception(exc)
            return
        log.info("a merged call of %d requests failed (%s); running each alone", len(live), exc)
        for call in live:
            self._execute([call])


def join(
    engine: Engine, output: Processor, calls: list[Call], ids: Iterator[int], limits: BatchLimits | None = None
) -> None:
    """``calls`` merged into one batch and prefilled into ``engine``, each row registered with the output
    processor (which answers each call when its rows are done). Rows whose prompts pass ``max_batch_tokens`` padded
    tokens prefill in several passes (``scheduler.passes``), as a plain pass's do. A failed prefill of several
    calls' rows prefills each call's rows alone, as a failed merged pass runs each call alone; the rows of a prefill
    that fails alone fail, and the running ones run on."""
    batch, capture, starts = merge(calls)
    assert batch.token_ids is not None, "generations are tokenized before they are queued"
    per_call = []
    for call, start in zip(calls, starts, strict=True):
        expected, rows = {}, []
        for slot in range(start, start + call.rows):
            row = RowInput(next(ids), list(batch.token_ids[slot]), capture, batch.edits(slot))
            rows.append((row, batch.params(slot), call.ticket.cancelled))
            stops = batch.params(slot).stop
            expected[row.id] = Expected(row.id, call, slot, batch.on_token, row.prompt, capture, stops, engine)
        output.expect(call, expected, capture)
        per_call.append(rows)
    everyone = [row for rows in per_call for row in rows]
    owner = [c for c, rows in enumerate(per_call) for _ in rows]
    engine.counters.prompt_tokens += sum(len(r.prompt) for r, *_ in everyone)  # before any of them is answered
    for part in passes([len(r.prompt) for r, *_ in everyone], limits or BatchLimits()):
        owners = sorted({owner[i] for i in part})
        if not _prefill(engine, output, [everyone[i] for i in part], alone=len(owners) == 1):
            for c in owners:
                _prefill(engine, output, [everyone[i] for i in part if owner[i] == c], alone=True)


def _prefill(engine: Engine, output: Processor, rows: list[tuple[RowInput, Any, Any]], alone: bool) -> bool:
    """Prefill ``rows`` (each with its parameters and its request's cancellation); on failure they leave the engine
    and its decoder (which may have taken them before its pass) and, ``alone``, fail with the error."""
    try:
        engine.join([(r, params) for r, params, _ in rows], [gone for *_, gone in rows])
        return True
    except BaseException as exc:
        for r, *_ in rows:
            engine.rows.pop(r.id, None)
        engine.decoder.release([r.id for r, *_ in rows])
        if alone:
            output.put([Event(row=r.id, error=exc, done=True) for r, *_ in rows])
        else:
            log.info("a prefill of %d rows failed (%s); each request's rows join alone", len(rows), exc)
        return False


def generate_whole(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    """Every row of ``batch`` generated to its end through the model's decoder, here and now (a runner's
    ``forward`` of a generation outside the scheduler; tests): the scheduler's engine and output processor, on
    this thread. A refused row raises its error."""
    assert model.decoder is not None
    batch, refused = tokenize_rows(model, batch)
    if (error := next((r for r in refused if r is not None), None)) is not None:
        raise error
    output = Processor("whole", model.tokenizer, thread=False)
    engine = Engine(model, model.decoder(bool(capture.attention_layers)), output.put)
    call = Call(pm=None, model=model, batch=batch, capture=capture, ticket=Ticket())  # type: ignore[arg-type]
    try:
        join(engine, output, [call], itertools.count())
        while engine.busy:
            engine.step()
    finally:
        engine.close()
    out = call.future.result()
    failed = next((row for row in out.rows if isinstance(row, BaseException)), None)
    if failed is not None:
        raise failed
    return out


def _fail_refused(calls: list[Call], starts: list[int], exc: InvalidField) -> bool:
    """A row the plugin refused in a merged call: its own call (taken out of ``calls``) fails with the error, its
    row renumbered; False when the error names no row or there is only one call."""
    row = exc.extra.get("row")
    if len(calls) == 1 or row is None:
        return False
    i = max(j for j, s in enumerate(starts) if s <= row)
    calls.pop(i).future.set_exception(_renumbered(exc, row - starts[i]))
    return True


def _renumbered(exc: InvalidField, row: int) -> InvalidField:
    """``exc`` naming ``row`` (a row's number in another batch than the one that refused it)."""
    return InvalidField(exc.detail, field=exc.field, allowed=exc.allowed, **{**exc.extra, "row": row})


def _fail(calls: list[Call], exc: BaseException) -> None:
    """``exc`` for each of ``calls`` not yet answered (the output processor may answer one meanwhile)."""
    for call in calls:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            call.future.set_exception(exc)


def _average(previous: float, seconds: float) -> float:
    return seconds if not previous else 0.8 * previous + 0.2 * seconds


def call_forward(pm: pluggy.PluginManager, model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    """The forward_with_states hook, here on the model thread (or in-process, outside a server)."""
    out = pm.hook.forward_with_states(model=model, batch=batch, capture=capture)
    if out is None:
        raise Unsupported(f"loader: no plugin runs forward passes for loader {model.loader!r}", field="loader")
    return out
