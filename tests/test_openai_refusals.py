"""/v1 refusals name the field the client sent and come before any stream starts: a chat template that raises, a
chat or token-id prompt past the context, ``max_completion_tokens`` past a limit, and message fields the server
would otherwise drop from the conversation. Each is OpenAI's 400 with ``param``, and the server goes on serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from test_models import app_with, concurrent_client

STRICT = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)


def strict_copy(source: Path, target: Path) -> Path:
    """The tiny llama with a chat template that refuses a system message, as Gemma's does."""
    shutil.copytree(source, target)
    config = target / "tokenizer_config.json"
    fields = json.loads(config.read_text())
    fields["chat_template"] = STRICT
    config.write_text(json.dumps(fields))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return target


def refused(r: Any, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.headers["content-type"].startswith("application/"), r.text


async def test_refusals_name_the_field_sent_before_any_stream(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    strict = str(strict_copy(tiny_models["llama"], tmp_path / "strict"))
    llama = str(tiny_models["llama"])
    async with concurrent_client(app_with()) as c:
        system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        for stream in (False, True):
            body = {"model": strict, "messages": system, "max_tokens": 3, "stream": stream}
            r = await c.post("/v1/chat/completions", json=body)
            refused(r, "messages")
            assert "System role not supported" in r.json()["error"]["message"]
        user = [{"role": "user", "content": "hi"}]
        ok = await c.post("/v1/chat/completions", json={"model": strict, "messages": user, "max_tokens": 3})
        assert ok.status_code == 200, ok.text

        context = (await c.post("/models/load", json={"model": llama})).json()["model"]["max_context"]
        long = [{"role": "user", "content": " ".join(["w"] * context)}]
        for stream in (False, True):
            body = {"model": llama, "messages": long, "max_tokens": 3, "stream": stream}
            refused(await c.post("/v1/chat/completions", json=body), "messages")
            body = {"model": llama, "prompt": [[1, 2], [1] * (context + 1)], "max_tokens": 3, "stream": stream}
            refused(await c.post("/v1/completions", json=body), "prompt[1]")

        body = {"model": llama, "messages": user, "stream_options": {"include_usage": True}}
        refused(await c.post("/v1/chat/completions", json=body), "stream_options")
        body = {"model": llama, "messages": user, "max_completion_tokens": 10**9}
        refused(await c.post("/v1/chat/completions", json=body), "max_completion_tokens")

        tool = [
            {"role": "user", "content": "add 2 and 2"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"},
        ]
        r = await c.post("/v1/chat/completions", json={"model": llama, "messages": tool, "max_tokens": 3})
        assert r.status_code == 400 and "tool_calls" in r.json()["error"]["message"], r.text
        empty = tmp_path / "empty"
        empty.mkdir()
        assert (await c.get(f"/v1/models/{empty}")).status_code == 404  # a directory no loader takes is no model
        assert (await c.get(f"/v1/models/{strict}")).json()["id"] == strict
        assert (await c.get("/health")).status_code == 200
