"""Text at its edges, on a real server: characters that byte-level BPE splits across tokens (an emoji, CJK, an
accented letter), streamed, cut by stop strings and placed by ``text_offset``; and prompts or ``max_tokens`` that
do not fit the model's context, refused by name before any stream starts.

The model is a one-block GPT-2 whose greedy tokens are written into its weights (``scripted``): the token it picks
after position p is the script's p-th, whatever the text, so a test chooses exactly which split characters it
generates. Its reference is transformers' own ``generate`` and ``tokenizer.decode``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow  # one real server process for the module

# What the model generates after PROMPT: a 4-byte emoji, three 3-byte CJK characters and a 2-byte letter, each
# spelled byte by byte by the tiny tokenizer (its vocabulary was trained on English text).
SCRIPT = "ok \U0001f600 x\u65e5\u672c\u8a9e caf\u00e9!"
PROMPT = "a b"  # three tokens: the script starts at the third position
CONTEXT = 64
SCRIPTED = 24  # the tokens that spell SCRIPT


def scripted(out: Path, script: str, prompt: str) -> list[int]:
    """Save a GPT-2 whose greedy choice after position p is a fixed token: ``script``'s tokens after ``prompt``,
    then "." to the end of its context; the script's token ids. Its block adds nothing (both projections are zero),
    its residual stream is the one-hot position, and the LM head maps each position to its token."""
    import torch
    import transformers
    from loom_transformers.testing import train_tokenizer

    tok = train_tokenizer("gpt2")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the chat's prompt is its text
    ids = tok(script, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt)["input_ids"]) - 1
    fill = tok(".", add_special_tokens=False)["input_ids"][0]
    plan = [fill] * start + ids
    plan += [fill] * (CONTEXT - len(plan))
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=CONTEXT, n_embd=CONTEXT, n_layer=1, n_head=2, tie_word_embeddings=False
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 3
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(CONTEXT) * 10)
        for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.lm_head.weight.zero_()
        for position, token in enumerate(plan):
            model.lm_head.weight[token, position] = 100.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return ids


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("scripted") / "gpt2"
    ids = scripted(path, SCRIPT, PROMPT)
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
    generated = net.generate(prompt, max_new_tokens=len(ids), do_sample=False)[0, prompt.shape[1] :].tolist()
    assert (
        len(ids) == SCRIPTED and generated == ids and tok.decode(generated) == SCRIPT
    )  # the reference: transformers' own generate
    assert all("\ufffd" in tok.decode([i]) for i in ids[3:7])  # the emoji's tokens hold one byte each
    return str(path)


@pytest.fixture(scope="module")
def base(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from serverutil import loom_server

    with loom_server(["--preload", model], tmp_path_factory.mktemp("text-home")) as (url, _, _):
        yield url


def events(base: str, path: str, body: dict[str, Any]) -> tuple[int, list[tuple[str | None, Any]]]:
    """A stream's status and its (event, data) pairs."""
    out: list[tuple[str | None, Any]] = []
    with httpx.stream("POST", base + path, json=body, timeout=120) as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data = line.removeprefix("data:").strip()
                out.append((kind, data if data == "[DONE]" else json.loads(data)))
        return r.status_code, out


def refused(r: httpx.Response, field: str) -> None:
    assert r.status_code in (400, 422) and r.headers["content-type"].startswith("application/"), r.text
    assert r.json()["field"] == field, r.text


LONG = "word " * 100  # 200 tokens: more than the context


@pytest.mark.parametrize(
    ("change", "field"), [({"prompt": LONG}, "prompt"), ({"max_tokens": CONTEXT - 2}, "max_tokens")]
)
def test_what_does_not_fit_the_context_is_refused_by_name_before_any_stream(
    base: str, model: str, change: dict[str, Any], field: str
) -> None:
    """A prompt past the context, or a ``max_tokens`` that with the prompt's 3 tokens passes it, is the field's 4xx
    on every generating endpoint, streams included: never a 200 whose events carry the error, never a generation
    silently cut short of its ``max_tokens``. A batch refuses such a prompt in its own slot."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **change}
    chat = {"model": model, "messages": [{"role": "user", "content": body["prompt"]}], "max_tokens": body["max_tokens"]}
    sent = [("/generate", body), ("/generate/stream", body)]
    sent += [("/v1/completions", {**body, "stream": s}) for s in (False, True)]
    sent += [("/v1/chat/completions", {**chat, "stream": s}) for s in (False, True)]
    for path, sending in sent:
        with httpx.stream("POST", base + path, json=sending, timeout=120) as r:
            r.read()
            refused(r, "messages" if path == "/v1/chat/completions" and field == "prompt" else field)
    batch = {k: v for k, v in body.items() if k != "prompt"}
    r = httpx.post(base + "/generate/batch", json={**batch, "prompts": ["a", body["prompt"]]}, timeout=120)
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]  # "a" is one token: room for 63
    assert first["token_count"] == body["max_tokens"] and second["error"]["field"] == field, r.text
    fits = httpx.post(base + "/generate", json={**body, "prompt": PROMPT, "max_tokens": CONTEXT - 3}, timeout=120)
    assert fits.json()["token_count"] == CONTEXT - 3 and fits.json()["finish_reason"] == "length", fits.text


def streamed(base: str, path: str, body: dict[str, Any]) -> list[str]:
    """The text pieces a stream sent, on any of the three generating streams."""
    status, got = events(base, path, body)
    assert status == 200 and not [e for e, d in got if e == "error"], got
    if path == "/generate/stream":
        return [d["text"] for e, d in got if e == "token"]
    chunks = [d["choices"][0] for _, d in got if d != "[DONE]" and d.get("choices")]
    return [c["delta"].get("content") or "" if "delta" in c else c["text"] for c in chunks]


# Stop strings: a split character alone, one spanning two characters' tokens, one ending in a split character,
# and none.
STOPS = [None, "\U0001f600", "\u672c", "\U0001f600 x", "\u8a9e c", "caf\u00e9", "k \U0001f600"]


@pytest.mark.parametrize("stop", STOPS)
def test_streams_of_split_characters_are_the_decoded_text_cut_at_its_stop(base: str, model: str, stop: str) -> None:
    """Each stream's pieces join to the answer's text, which is ``tokenizer.decode`` of transformers' tokens cut
    before the first stop string (matched on the decoded text, whichever tokens spell it), and no piece holds a
    U+FFFD that the text does not (a byte of a character waits for the rest of it)."""
    want = SCRIPT[: SCRIPT.index(stop)] if stop else SCRIPT
    common = {"model": model, "max_tokens": SCRIPTED, "temperature": 0, **({"stop": [stop]} if stop else {})}
    prompt = {**common, "prompt": PROMPT}
    chat = {**common, "messages": [{"role": "user", "content": PROMPT}]}
    whole = httpx.post(base + "/generate", json=prompt, timeout=120).json()
    assert whole["text"] == want and whole["finish_reason"] == ("stop" if stop else "length"), whole
    completion = httpx.post(base + "/v1/completions", json=prompt, timeout=120).json()["choices"][0]["text"]
    message = httpx.post(base + "/v1/chat/completions", json=chat, timeout=120).json()["choices"][0]["message"]
    assert completion == message["content"] == want
    for path, body in [("/generate/stream", prompt), ("/v1/completions", prompt), ("/v1/chat/completions", chat)]:
        pieces = streamed(base, path, {**body, "stream": True} if path.startswith("/v1") else body)
        assert "".join(pieces) == want and not any("\ufffd" in p for p in pieces), (path, pieces)


def test_text_offsets_place_each_token_at_the_character_its_first_byte_is_in(base: str, model: str) -> None:
    """The legacy ``text_offset`` of a token that holds part of a character is where that character starts (all
    four tokens of the emoji at its one place), so that ``text[offset:]`` begins with the character its bytes
    belong to; streamed, each chunk's offset is the same. The bytes come from GPT-2's own byte alphabet."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = AutoTokenizer.from_pretrained(model)
    byte = {c: b for b, c in bytes_to_unicode().items()}
    body = {"model": model, "prompt": PROMPT, "max_tokens": SCRIPTED, "temperature": 0, "logprobs": 0}
    choice = httpx.post(base + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    ids = tok(choice["text"], add_special_tokens=False)["input_ids"]
    data = b"".join(bytes(byte[c] for c in piece) for piece in tok.convert_ids_to_tokens(ids))
    starts = [
        len(b"".join(bytes(byte[c] for c in p) for p in tok.convert_ids_to_tokens(ids[:i]))) for i in range(SCRIPTED)
    ]
    want = [len(data[:b].decode("utf-8", errors="ignore")) for b in starts]
    assert choice["text"] == SCRIPT and choice["logprobs"]["text_offset"] == want, choice["logprobs"]["text_offset"]
    assert want[3:7] == [3, 3, 3, 3]  # the emoji's four tokens
    pieces = events(base, "/v1/completions", {**body, "stream": True})[1]
    offsets = [
        o
        for _, d in pieces
        if d != "[DONE]" and d["choices"][0]["logprobs"]
        for o in d["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == want


class CountingDecodes:
    """A tokenizer that counts the token ids its ``decode`` is given (every other attribute is the tokenizer's)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_text_offsets_cost_per_token_does_not_grow_with_the_text(tiny_models: dict[str, Path]) -> None:
    """The legacy ``text_offset`` of each of 400 tokens (split characters among them) is where decoding every
    token before it puts it, yet decoding them all takes a few ids a token, not every token before it."""
    from loom_openai.completions import decoded_length, text_offsets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    ids = tok("the cat sat on the mat 😀 猫 é, " * 40, add_special_tokens=False)["input_ids"][:400]
    text = tok.decode(ids, skip_special_tokens=True)
    want = [decoded_length(tok, ids[:i]) for i in range(len(ids))]
    counting = CountingDecodes(tok)
    assert text_offsets(counting, {"token_ids": ids, "text": text}) == want
    assert counting.decoded <= 8 * len(ids), counting.decoded  # every prefix decoded would be 80,000
