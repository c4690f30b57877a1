"""The kernel's side of a running generation, on the model's thread: which rows the loader's ``Decoder`` feeds, the
token each row takes (``sampling.pick``, one device-to-host copy a step), and when each row is done.

A row is done at EOS, at its budget (``max_tokens``, or what the context still holds), at the first step boundary
after its request is cancelled (a client gone, a timeout), or when the output processor stops it (a stop string, a
stop rule: ``abort``, which takes effect at the next step boundary; tokens picked after the stopping one are dropped
there). A row whose last token's states or attention
are kept rides along with one more step that feeds that token, then leaves. Everything a pass gives goes to the
output processor as it comes (``output.Processor``), which turns it into text, events and answers off this thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from loom_kernel.errors import InvalidField, LoomError, Unsupported
from loom_kernel.metrics import ModelCounters
from loom_kernel.sampling import Choice, generator, pick
from loom_kernel.types import Capture, Decoder, GenerationParams, LoadedModel, RowInput, StepOutput


@attrs.define(eq=False)
class Row:
    id: int
    prompt: int  # its prompt's token count
    params: GenerationParams
    budget: int  # tokens it may generate
    choice: Choice
    keeps_last_token: bool  # whether its last token's states or attention are kept (a pass of its own)
    edits: bool
    gone: threading.Event | None = None  # set when its request is cancelled (a client gone, a timeout)
    generated: list[int] = attrs.field(factory=list)
    fed: int = 0  # generated tokens the model has been fed
    finish: str | None = None


@attrs.define(eq=False)
class Event:
    """One pass's news of one row, for the output processor: the states and attention of the tokens the pass fed
    (from position ``at`` of the row's sequence), the token picked after it, and whether the row is done."""

    row: int
    at: int = 0
    fed: int = 0  # tokens the pass fed the row (its prompt, or one)
    states: dict[int | str, Any] | None = None
    attentions: dict[int, Any] | None = None
    fills: dict[int | str, float] | None = None
    token: int | None = None
    logprob: dict[str, Any] | None = None
    logits: Any = None
    finish: str | None = None
    error: BaseException | None = None  # what ended the row alone (logits that are not finite), or a failed pass
    done: bool = False


class Engine:
    """One running batch: the loader's ``decoder`` and the kernel's rows; ``send(events)`` hands each pass's news to
    the output processor."""

    def __init__(
        self,
        model: LoadedModel,
        decoder: Decoder,
        send: Callable[[list[Event]], None],
        counters: ModelCounters | None = None,
    ) -> None:
        self.model, self.decoder, self.send = model, decoder, send
        self.counters = counters or ModelCounters()
        self.rows: dict[int, Row] = {}
        self._joining = 0  # rows whose prefill is running: not yet running rows to whoever reads ``running``
        self._aborts: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    @property
    def running(self) -> int:
        return len(self.rows) - self._joining

    @property
    def joinable(self) -> bool:
        return self.decoder.joinable

    def abort(self, row: int, through: int, reason: str) -> None:
        """From any thread: ``row`` ends with ``reason`` after its generated token ``through`` (its later ones are
        dropped), at the next step boundary."""
        with self._lock:
            self._aborts.append((row, through, reason))

    def join(self, rows: list[tuple[RowInput, GenerationParams]], gone: Sequence[threading.Event | None] = ()) -> None:
        """Prefill ``rows`` (tokenized and checked) into the running batch; ``gone[i]``: row i's request's
        cancellation."""
        for i, (spec, params) in enumerate(rows):
            self.rows[spec.id] = Row(
                id=spec.id,
                prompt=len(spec.prompt),
                params=params,
                budget=budget(self.model, len(spec.prompt), params),
                choice=Choice(
                    params, generator(params.seed), spec.capture.top_logprobs, keep_logits=spec.capture.logits
                ),
                keeps_last_token=keeps_last_token(spec.capture),
                edits=bool(spec.edits),
                gone=gone[i] if i < len(gone) else None,
            )
            if self.rows[spec.id].budget <= 0:  # nothing may be generated: max_tokens 0, or a full context
                self.rows[spec.id].finish = "length"
        self._joining = len(rows)
        try:
            out = self.decoder.prefill([spec for spec, _ in rows])
        finally:
            self._joining = 0
        self._update(out, prefill=True)

    def step(self) -> None:
        """One decoding step: the rows that are done leave, every other row is fed its newest token."""
        self._apply_aborts()
        for r in self.rows.values():
            if r.finish is None and r.gone is not None and r.gone.is_set():
                # Its request left: it stops here, not when the output processor gets to its news and aborts it.
                r.finish = "stop"
        self._release([r for r in self.rows.values() if self._done(r)])
        if self.rows:
            self._update(self.decoder.step({r.id: r.generated[-1] for r in self.rows.values()}), prefill=False)

    def fail(self, exc: BaseException) -> None:
        """A pass failed: every row fails with it, and the decoder is closed."""
        self.send([Event(row=i, error=exc, done=True) for i in self.rows])
        self.close()

    def close(self) -> None:
        self.rows.clear()
        self.decoder.close()

    # -- on the model's thread -----------------------------------------------------------------------------------

    def _update(self, out: StepOutput, prefill: bool) -> None:
        rows = [self.rows[i] for i in out.ids]
        events = []
        for row in rows:
            at, fed = (0, row.prompt) if prefill else (row.prompt + row.fed, 1)
            if not prefill:
                row.fed = len(row.generated)
            events.append(
                Event(
                    row=row.id,
                    at=at,
                    fed=fed,
                    states=out.states.get(row.id),
                    attentions=out.attentions.get(row.id),
                    fills=out.fills,
                )
            )
        choosing = [b for b, row in enumerate(rows) if row.finish is None]
        if choosing:
            import torch

            logits = out.logits if len(choosing) == len(rows) else out.logits[torch.tensor(choosing)]
            for b, chosen in zip(choosing, pick(logits, [rows[b].choice for b in choosing]), strict=True):
                row, event = rows[b], events[b]
                if chosen.token is None:
                    event.error, row.finish = not_finite(row, chosen.top), "error"
                    continue
                row.generated.append(chosen.token)
                event.token, event.logprob, event.logits = chosen.token, chosen.logprob, chosen.logits
                if chosen.token in self.model.stop_ids:
                    row.finish = "stop"
                elif len(row.generated) >= row.budget:
                    row.finish = "length"
                event.finish = row.finish
        self.send(events)
        self._release([r for r in rows if self._done(r)])

    def _done(self, row: Row) -> bool:
        """Finished, and its last token fed when its states are kept."""
        return row.finish is not None and (
            row.finish == "error" or not row.keeps_last_token or row.fed >= len(row.generated)
        )

    def _release(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.decoder.release([r.id for r in rows])
        self.counters.generated_tokens += sum(len(r.generated) for r in rows)
        self.send([Event(row=r.id, finish=r.finish, done=True) for r in rows])
        for r in rows:
            del self.rows[r.id]

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for i, through, reason in aborts:
            row = self.rows.get(i)
            if row is None or (row.finish is not None and len(row.generated) <= through + 1):
                continue
            del row.generated[through + 1 :]  # tokens picked after the stopping one are dropped
            row.fed = min(row.fed, len(row.generated))
            row.finish = reason


def budget(model: LoadedModel, prompt: int, params: GenerationParams) -> int:
    """How many tokens may be generated: ``max_tokens``, cut to what the model's context still holds."""
    return min(params.max_tokens, model.max_context - prompt) if model.max_context else params.max_tokens


def keeps_last_token(capture: Capture) -> bool:
    """Whether a row's last token needs a pass of its own: only when something of it is kept."""
    return capture.wants_states or bool(capture.attention_layers)


def not_finite(row: Row, top: float) -> LoomError:
    """The error a row whose logits are not finite fails with: its edits' fault when it has any."""
    where = f"the logits of generated token {len(row.generated)} are {top} (not finite)"
    if row.edits:
        return InvalidField(
            f"interventions: {where}: the edits push the model's activations out of floating-point range; "
            "use a smaller scale or vector",
            field="interventions",
            allowed="edits that keep the activations finite",
        )
    return Unsupported(
        f"model: {where}: the model's activations overflow in its dtype; load it as float32", field="model"
    )
