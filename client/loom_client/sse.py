"""Server-sent events, line by line: the one parser behind the sync and async streams."""

from __future__ import annotations

import json
from typing import Any

from loom_client.decode import arrays
from loom_client.errors import problem_error

DONE = object()  # OpenAI's `data: [DONE]`: the stream is over


class EventParser:
    """Feed lines; ``feed`` returns a finished event's decoded value, ``DONE``, or None while an event is open.

    The Loom's own stream yields ``{"event": "token" | "done", ...}`` with tensors as arrays; an ``error`` event is
    raised as the LoomError its problem details name. OpenAI streams (no event names) yield each chunk, and raise the
    one that holds an ``error``.
    """

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> Any:
        if line == "":
            return self.dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None

    def dispatch(self) -> Any:
        event, data = self.event, "\n".join(self.data)
        self.event, self.data = None, []
        if not data:
            return None
        if data == "[DONE]":
            return DONE
        value = json.loads(data)
        if event == "error":
            raise problem_error(value)
        if event is None and isinstance(value, dict) and isinstance(value.get("error"), dict):
            error = value["error"]  # OpenAI's stream reports a failure as a chunk holding only its error
            raise problem_error(
                {
                    "status": error.get("status", 500),
                    "title": error.get("code") or error.get("type"),
                    "detail": error.get("message"),
                    "field": error.get("param"),
                    "request_id": error.get("request_id"),
                }
            )
        if event is None:
            return arrays(value)
        return {"event": event, **arrays(value)}
