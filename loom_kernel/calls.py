"""A request's calls on its model's thread: the ``Ticket`` that cancels them and each queued ``Call``."""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from loom_kernel.errors import LoomError
from loom_kernel.inputs import row_lengths
from loom_kernel.scheduler import BatchLimits
from loom_kernel.types import Batch, Capture, ForwardOutput, LoadedModel, SequenceOutput


class Cancelled(LoomError):
    """The request went away before its call ran (never sent: nobody is listening)."""

    status = 499
    title = "Client closed request"


# Who sent the request being handled: its API key's owner (set by the key check; "" on a server without keys).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("loom_caller", default="")


@attrs.define(eq=False)
class Ticket:
    """One request on its way through a model: cancelled when its client leaves or its time runs out; ``owner``:
    whose it is (the scheduler gives owners turns)."""

    cancelled: threading.Event = attrs.field(factory=threading.Event)
    owner: str = attrs.field(factory=CALLER.get)

    def cancel(self) -> None:
        self.cancelled.set()


@attrs.define(eq=False)
class Call:
    """One request's forward_with_states call, waiting for the model thread."""

    pm: pluggy.PluginManager
    model: LoadedModel
    batch: Batch
    capture: Capture
    ticket: Ticket
    then: Callable[[ForwardOutput], Any] | None = None
    cut: tuple[int, ...] = ()  # rows whose text was cut to what the model can read before it was queued
    future: concurrent.futures.Future = attrs.field(factory=concurrent.futures.Future)
    _widths: list[int] | None = None
    _key: tuple[Any, ...] | None = None

    def answer(self, out: ForwardOutput) -> None:
        for i in self.cut:  # cut by characters, a row is truncated even when its tokens fit the context
            if isinstance(out.rows[i], SequenceOutput):
                out.rows[i].truncated = True
        try:
            self.future.set_result(out if self.then is None else self.then(out))
        except BaseException as exc:  # its own request's error, not the batch's
            self.future.set_exception(exc)

    @property
    def cancelled(self) -> bool:
        return self.ticket.cancelled.is_set()

    @property
    def owner(self) -> str:
        return self.ticket.owner

    @property
    def done(self) -> bool:
        return self.future.done()

    @property
    def joins(self) -> bool:
        """A generation that joins the model's running batch (its loader steps generations)."""
        return self.batch.generation is not None and self.model.decoder is not None

    @property
    def rows(self) -> int:
        return self.batch.size

    @property
    def mode(self) -> tuple[bool, bool]:
        """How its passes run the model's attention: whether they keep attention weights (eager attention), and
        whether they read or edit a point inside the attention function (the loader's own attention)."""
        touched = {*self.capture.sites, *(e.site for row in self.batch.interventions for e in row)}
        return self.capture.attention, not self.model.attention_sites.isdisjoint(touched)

    def key(self) -> tuple[Any, ...]:
        """Calls with equal keys may be merged (computed once: the model thread compares it on every scan)."""
        if self._key is None and self.joins:
            # Tokenized before it was queued, and sampled by the kernel row by row: only the decoder it joins (one
            # per attention mode) sets a generation apart.
            self._key = (id(self.model), "joins", self.mode)
        if self._key is None:
            b, params = self.batch, self.batch.generation
            same_params = params is None or self.model.row_params
            self._key = (
                id(self.model),
                params is None,
                b.token_ids is None,
                b.add_special_tokens,
                b.truncate,
                self.mode,
                self.capture.gradient,  # a pass with gradients merges only with passes taking the same metric
                None if same_params else params,
                # A pass keeps states, attention and logits at its positions only: merged with a pass keeping them
                # at other positions (or none), every row would keep every position (a /patch run's last logits
                # [T, vocab], an extract of one position [T, D] per layer), which no request's bound counted.
                _kept_positions(self.capture) if params is None else None,
            )
        return self._key

    def width(self, limits: BatchLimits) -> int:
        """The longest row in tokens (plus what it may generate): the padded length it brings to a batch."""
        return max(self.widths(limits), default=0)

    def widths(self, limits: BatchLimits) -> list[int]:
        """Each row's tokens at most (plus what it may generate)."""
        if self._widths is None:
            b = self.batch
            widths = row_lengths(self.model, b)
            # Characters bound the tokens of any subword vocabulary: tokenize only when the bound could break the
            # token budget of a full batch.
            if b.token_ids is None and max(widths, default=0) * limits.max_batch_size > limits.max_batch_tokens:
                widths = _token_lengths(self.model, b)
                if self.model.max_context and b.truncate:
                    widths = [min(w, self.model.max_context) for w in widths]
            more = b.generation.max_tokens if b.generation is not None else 0
            self._widths = [w + more for w in widths]
        return self._widths


def _token_lengths(model: LoadedModel, batch: Batch) -> list[int]:
    try:
        ids = model.tokenizer(list(batch.texts), add_special_tokens=batch.add_special_tokens)["input_ids"]
        return [len(row) for row in ids]
    except Exception:  # a tokenizer of another shape: characters bound the tokens of any subword vocabulary
        return [len(text) + 2 for text in batch.texts]


def _kept_positions(capture: Capture) -> Any:
    """Where a forward pass keeps per-position tensors or logits (hashable), None when it keeps neither."""
    if not (capture.wanted or capture.logits):
        return None
    return tuple(capture.positions) if isinstance(capture.positions, list | tuple) else capture.positions
