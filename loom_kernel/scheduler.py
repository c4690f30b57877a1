"""What a model's thread runs next: the scheduler, pure (no threads, no locks, no torch; the loop in
``batching.ModelThread`` holds the lock and runs what it decides), as vLLM v1's engine core asks its scheduler.

It holds what is queued for one model: calls (plain passes: /extract, /embed, /analyze; and generations) and tasks
(loads, releases). Each time round the loop asks ``next``: a step boundary (``STEP``) while rows generate, taking
turns with the queue, so that a pass never waits for a generation and a generation never waits for a stream of
passes; else the next queued item. Generations do not wait in the queue: they wait to join the running batch at
the next boundary (``admit``: in arrival order, up to ``max_batch_size`` rows, grouped by what may share a batch).
A plain pass is merged with the compatible passes queued behind it (``gathering``), up to ``max_batch_size`` rows
and ``max_batch_tokens`` padded tokens, and may wait, up to the time of one pass, for as many calls as were queued
or running at once in the last ``RECENT_S`` (a pass costs nearly as much for one row as for sixteen, and clients
that take turns would otherwise keep running half batches). A lone client never waits, nor does anything while
rows are generating.

Owners (a request's API key, ``Work.owner``; one owner "" on a server without keys) take turns: the next pass is
the first queued call of the owner served longest ago, and waiting generations join by their place among their
owner's calls not yet done (running or waiting), so that one member of a lab queuing a hundred requests delays
another's by one, not a hundred; a call that runs as several passes lets another owner's queued call run between
two of them (``interject``), so one request of a thousand texts delays another's by one pass, not all of its. With
one owner the order is arrival order.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import attrs

RECENT_S = 1.0  # how far back a plain pass looks for the most calls queued or running at once
STEP = "step"  # ``next``: one step boundary of the running generations


@attrs.define(frozen=True)
class BatchLimits:
    max_batch_size: int = 32  # rows per merged call
    max_batch_tokens: int = 16384  # rows x longest row (prompt + max_tokens for a generation)


class Work(Protocol):
    """A call as the scheduler sees it (``batching.Call``)."""

    rows: int
    joins: bool  # a generation that joins the running batch
    owner: str  # whose request it is (turns are taken between owners)

    @property
    def cancelled(self) -> bool: ...

    def key(self) -> tuple[Any, ...]: ...

    def width(self, limits: BatchLimits) -> int: ...


@attrs.define(eq=False)
class Gathering:
    """A plain pass's group in the making: the first call and the compatible ones that fit; ``deadline``: until when
    it may wait for company."""

    group: list[Any]
    rows: int
    width: int
    peak: int
    deadline: float
    full: bool = False

    def ready(self, now: float, limits: BatchLimits) -> bool:
        return self.full or self.rows >= limits.max_batch_size or len(self.group) >= self.peak or now >= self.deadline


class Scheduler:
    def __init__(self, limits: BatchLimits | None = None) -> None:
        self.limits = limits or BatchLimits()
        self.items: deque[Any] = deque()  # calls and tasks, in the order they came
        self.waiting: deque[Any] = deque()  # generations waiting to join the running batch
        self.running: list[Any] = []  # the calls of the plain pass running (company they keep)
        self.stepped = False  # whether the last thing run was a step boundary: passes and steps take turns
        self._peaks: dict[tuple[Any, ...], tuple[float, int]] = {}  # per key: (when, most calls at once)
        self._served: dict[str, int] = {}  # per owner: when (a count of passes started) it was last served
        self._turn = 0
        # Generations admitted and not yet done, their owners' share of the batch: weak, so that an answered call
        # (its future holds its answer) is not kept alive by this count once the model goes idle.
        self.joined: list[weakref.ref[Any]] = []

    @property
    def queued(self) -> int:
        return sum(_is_call(item) for item in self.items) + len(self.waiting)

    def add(self, item: Any, now: float) -> None:
        """Queue a call or a task (a plain pass notes the company it keeps: calls of its key queued or running)."""
        if _is_call(item) and not item.joins:
            for old in [k for k, (when, _) in self._peaks.items() if now - when > RECENT_S]:
                del self._peaks[old]  # past RECENT_S a peak no longer counts: keys come and go (seeds, metrics)
            key = item.key()
            queued = sum(_is_call(other) and other.key() == key for other in self.items)
            running = sum(other.key() == key and not other.done for other in self.running)
            company = 1 + queued + running
            when, peak = self._peaks.get(key, (0.0, 0))
            if company >= peak or now - when > RECENT_S:
                self._peaks[key] = (now, company)
        self.items.append(item)

    def next(self, generating: bool) -> Any:
        """``STEP`` while rows generate (or wait to join) and either nothing is queued or the last thing run was
        not a step; else the next queued item; None when there is nothing to do. Queued generations move to the
        waiting ones first, up to the first queued item that is not a call (what came after a load runs after it)."""
        for item in list(self.items):
            if not _is_call(item):
                break
            if item.joins:
                self.items.remove(item)
                self.waiting.append(item)
        if (generating or self.waiting) and not (self.stepped and self.items):
            self.stepped = True
            return STEP
        self.stepped = False
        if not self.items:
            return None
        if not _is_call(self.items[0]):
            return self.items.popleft()  # a task at the head runs first
        return self._turn_of(lambda item: True)

    def interject(self, owners: set[str]) -> Any:
        """Between two passes of one call (``owners``' requests): the queued plain call of another owner whose turn
        it is, taken from the queue to run there; None when no other owner's call waits."""
        return self._turn_of(lambda item: not item.joins and item.owner not in owners)

    def _turn_of(self, eligible: Callable[[Any], bool]) -> Any:
        """The owners' turns: the first ``eligible`` queued call of the owner served longest ago, among the calls
        before the first task (what came after a load runs after it), taken from the queue; None when there is none."""
        ahead = next((i for i, item in enumerate(self.items) if not _is_call(item)), len(self.items))
        first: dict[str, int] = {}
        for i in range(ahead):
            if eligible(self.items[i]):
                first.setdefault(self.items[i].owner, i)
        if not first:
            return None
        pick = min(first.values(), key=lambda i: (self._served.get(self.items[i].owner, -1), i))
        item = self.items[pick]
        del self.items[pick]
        self._turn += 1
        self._served[item.owner] = self._turn
        return item

    def admit(self, room: Callable[[Any], tuple[Hashable, int, bool]]) -> tuple[list[list[Any]], list[Any]]:
        """The waiting generations that join now, grouped by what may share a batch, in arrival order (the rest
        wait), and the cancelled ones (they leave). ``room(call)`` is (the running batch the call would join, the
        rows running in it, whether rows may join it now). One group joins a running batch a boundary: groups of
        other keys may still land in the same batch, and after a prefill its room and whether it takes more are
        the decoder's to say again."""
        pending, self.waiting = self._by_turns(list(self.waiting)), deque()
        cancelled = [call for call in pending if call.cancelled]
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for call in pending:
            if not call.cancelled:
                groups.setdefault(call.key(), []).append(call)
        joining = []
        taken: set[Hashable] = set()  # the batches a group joins this boundary
        for calls in groups.values():
            batch, rows, joinable = room(calls[0])
            admitted: list[Any] = []
            for i, call in enumerate(calls):
                fits = rows + call.rows <= self.limits.max_batch_size or not (rows or admitted)
                if not joinable or batch in taken or not fits:
                    self.waiting.extend(calls[i:])
                    break
                admitted.append(call)
                rows += call.rows
            if admitted:
                joining.append(admitted)
                taken.add(batch)
                self.joined.extend(weakref.ref(call) for call in admitted)
        if len(self.waiting) > 1:  # the owners' turns, whatever the groups
            order = {id(call): i for i, call in enumerate(pending)}
            self.waiting = deque(sorted(self.waiting, key=lambda call: order[id(call)]))
        return joining, cancelled

    def _by_turns(self, waiting: list[Any]) -> list[Any]:
        """The waiting generations by their place among their owner's calls not yet done (those admitted first),
        then by arrival: each owner's first waiting call before any owner's second."""
        running = [call for ref in self.joined if (call := ref()) is not None and not call.done]
        self.joined = [weakref.ref(call) for call in running]
        if len({call.owner for call in waiting}) < 2:
            return waiting
        place: dict[str, int] = {}
        for call in running:
            place[call.owner] = place.get(call.owner, 0) + 1
        ranked = []
        for i, call in enumerate(waiting):
            ranked.append((place.get(call.owner, 0), i, call))
            place[call.owner] = place.get(call.owner, 0) + 1
        return [call for *_, call in sorted(ranked, key=lambda r: (r[0], r[1]))]

    def gathering(self, first: Any, now: float, seconds_per_pass: float, generating: bool) -> Gathering:
        """``first``'s group, to be filled by ``gather``: a generation run whole, a pass while rows generate, or a
        pass whose key had no company lately does not wait."""
        when, peak = self._peaks.get(first.key(), (0.0, 1))
        if first.batch.generation is not None or generating or now - when > RECENT_S:
            peak = 1
        group = Gathering([first], first.rows, first.width(self.limits), peak, now + seconds_per_pass)
        if first.batch.generation is None:
            self.running = group.group
        return group

    def gather(self, g: Gathering) -> None:
        """Move the queued calls compatible with ``g``'s first into it, as long as they fit."""
        limits, key = self.limits, g.group[0].key()
        for item in list(self.items):
            if not _is_call(item):
                break  # what came after a load or a release runs after it
            if g.full or item.key() != key:
                continue
            wide = max(g.width, item.width(limits))
            if g.rows + item.rows > limits.max_batch_size or (g.rows + item.rows) * wide > limits.max_batch_tokens:
                g.full = True  # a companion waits that does not fit: more waiting cannot grow this batch
                continue
            self.items.remove(item)
            g.group.append(item)
            g.rows, g.width = g.rows + item.rows, wide
        g.full = g.full or g.rows >= limits.max_batch_size

    def ran(self) -> None:
        """The plain pass ended: its calls no longer count as company."""
        self.running = []


def passes(widths: list[int], limits: BatchLimits) -> list[list[int]]:
    """The rows of one plain pass (their widths in tokens) as the passes that run them: each at most
    ``max_batch_tokens`` padded tokens (a row wider than that alone), rows of like widths together (longest first, as
    sentence-transformers' ``encode`` sorts them), each pass's rows in their order. One request's rows are bounded
    as merged requests' are: 256 long texts are not one pass of every token's activations. (``max_batch_size``
    bounds what is merged: one request of more rows is not cut for it, one pass being faster than several.)"""
    tokens = limits.max_batch_tokens
    if len(widths) * max(widths, default=0) <= tokens:
        return [list(range(len(widths)))]
    out: list[list[int]] = []
    for i in sorted(range(len(widths)), key=lambda i: -widths[i]):
        if out and (len(out[-1]) + 1) * widths[out[-1][0]] <= tokens:
            out[-1].append(i)  # its first row is its widest
        else:
            out.append([i])
    return [sorted(part) for part in out]


def _is_call(item: Any) -> bool:
    return hasattr(item, "key")
