"""OpenAI log-probabilities on /v1/chat/completions and /v1/completions, through the official openai SDK over a
real socket, against log_softmax of the logits transformers computes for the same tiny model, from scratch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import torch

pytestmark = pytest.mark.slow  # one real server process for the module

MAX_TOKENS = 6
TOP = 3
TOL = 1e-4
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
PROMPT = "The quick brown fox"


@attrs.frozen
class Step:
    """One greedy step of the reference: the chosen id, its log-probability and the top (id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@attrs.frozen
class Reference:
    tokenizer: Any
    model: Any
    eos: frozenset[int]

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def greedy(self, prompt: list[int]) -> list[Step]:
        """Greedy decoding with no KV cache: every step is one full forward pass over the whole sequence."""
        ids, steps = list(prompt), []
        for _ in range(MAX_TOKENS):
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), dim=-1)
            chosen = int(torch.argmax(lp))
            values, top = torch.topk(lp, TOP)
            steps.append(Step(chosen, float(lp[chosen]), list(zip(top.tolist(), values.tolist(), strict=True))))
            ids.append(chosen)
            if chosen in self.eos:
                break
        return steps


@pytest.fixture(scope="module")
def model_path(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["llama"])  # the tiny model with a chat template


@pytest.fixture(scope="module")
def reference(model_path: str) -> Reference:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos: set[int] = set()
    for source in (model.generation_config, model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        eos.update(value if isinstance(value, list) else [] if value is None else [value])
    return Reference(tokenizer, model, frozenset(eos))


@pytest.fixture(scope="module")
def base_url(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from serverutil import loom_server

    with loom_server(["--preload", model_path], tmp_path_factory.mktemp("logprobs-home")) as (base, _, _):
        yield base


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x")


def chat_prompt(reference: Reference) -> list[int]:
    ids = reference.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def check_chat_content(content: list[Any], steps: list[Step], reference: Reference) -> None:
    assert len(content) == len(steps)
    for got, want in zip(content, steps, strict=True):
        assert got.token == reference.text(want.token_id)
        assert got.logprob == pytest.approx(want.logprob, abs=TOL)
        assert [t.token for t in got.top_logprobs] == [reference.text(i) for i, _ in want.top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([v for _, v in want.top], abs=TOL)
        for entry in [got, *got.top_logprobs]:  # a token's own bytes, read as its text
            assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    # Joined, the tokens' bytes are the text transformers decodes from their ids.
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined == reference.tokenizer.decode([s.token_id for s in steps])


def byte_fallback_tokenizer() -> Any:
    """A SentencePiece-style BPE (Llama 2, Gemma): a character outside the vocabulary is spelled in byte pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256))]
    tok.train_from_iterator(["the cat sat on the mat"], trainers.BpeTrainer(vocab_size=300, special_tokens=pieces))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback"])
def test_a_character_split_across_tokens_is_rebuilt_from_their_bytes(kind: str) -> None:
    """OpenAI's ``bytes`` "must be combined to generate the correct text representation" of a character that
    several tokens spell: each token's own bytes, not U+FFFD's (what its text alone decodes to)."""
    from loom_openai.token_bytes import token_bytes
    from loom_transformers.testing import train_tokenizer

    tokenizer = train_tokenizer("gpt2") if kind == "byte-level" else byte_fallback_tokenizer()
    for text in ("\u00e9", "na\u00efve", "\u65e5\u672c\u8a9e\U0001f600", "caf\u00e9\u2014ok"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        pieces = [tokenizer.decode([i]) for i in ids]
        assert "\ufffd" in pieces  # the text has characters no single token holds
        assert b"".join(bytes(token_bytes(tokenizer, i, p)) for i, p in zip(ids, pieces, strict=True)) == text.encode()


def test_chat_logprobs_match_log_softmax(client: Any, model_path: str, reference: Reference) -> None:
    steps = reference.greedy(chat_prompt(reference))
    common = {"model": model_path, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
    chat = client.chat.completions.create(**common, logprobs=True, top_logprobs=TOP)
    choice = chat.choices[0]
    assert chat.usage.completion_tokens == len(steps)
    check_chat_content(choice.logprobs.content, steps, reference)

    chunks = list(client.chat.completions.create(**common, logprobs=True, top_logprobs=TOP, stream=True))
    content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    check_chat_content(content, steps, reference)
    assert [e.model_dump() for e in content] == [e.model_dump() for e in choice.logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content

    only_chosen = client.chat.completions.create(**common, logprobs=True).choices[0].logprobs.content
    assert [e.token for e in only_chosen] == [e.token for e in choice.logprobs.content]
    assert all(e.top_logprobs == [] for e in only_chosen)
    assert client.chat.completions.create(**common).choices[0].logprobs is None
    plain = client.chat.completions.create(**common, stream=True)
    assert all(c.choices[0].logprobs is None for c in plain if c.choices)


def check_completion_logprobs(logprobs: Any, steps: list[Step], reference: Reference, text: str) -> None:
    assert logprobs.tokens == [reference.text(s.token_id) for s in steps]
    assert logprobs.token_logprobs == pytest.approx([s.logprob for s in steps], abs=TOL)
    for got, step in zip(logprobs.top_logprobs, steps, strict=True):
        # OpenAI's legacy format: the k most likely by text, plus the chosen token (up to k + 1 entries).
        want: dict[str, float] = {}
        for token_id, value in [*step.top, (step.token_id, step.logprob)]:
            want.setdefault(reference.text(token_id), value)
        assert got.keys() == want.keys()
        assert [got[k] for k in want] == pytest.approx(list(want.values()), abs=TOL)
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    for token, offset in zip(logprobs.tokens, offsets, strict=True):
        if "\ufffd" not in token:  # a lone byte of a split character decodes as U+FFFD, which the text lacks
            assert text[offset:].startswith(token)


def test_completion_logprobs_match_log_softmax(client: Any, model_path: str, reference: Reference) -> None:
    steps = reference.greedy(reference.tokenizer(PROMPT)["input_ids"])
    common = {"model": model_path, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    completion = client.completions.create(**common, logprobs=TOP)
    choice = completion.choices[0]
    assert completion.usage.completion_tokens == len(steps)
    check_completion_logprobs(choice.logprobs, steps, reference, choice.text)

    chunks = [c.choices[0] for c in client.completions.create(**common, logprobs=TOP, stream=True) if c.choices]
    with_logprobs = [c.logprobs for c in chunks if c.logprobs is not None]
    assert all(len(lp.tokens) == 1 for lp in with_logprobs)
    streamed = {
        field: [x for lp in with_logprobs for x in getattr(lp, field)]
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }
    assert streamed == choice.logprobs.model_dump()
    assert "".join(c.text for c in chunks) == choice.text

    only_chosen = client.completions.create(**common, logprobs=0).choices[0].logprobs
    assert [list(d) for d in only_chosen.top_logprobs] == [[t] for t in only_chosen.tokens]
    assert client.completions.create(**common).choices[0].logprobs is None


@pytest.mark.parametrize(
    ("path", "extra", "field", "allowed"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", None),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs", None),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "0 to 20"),
        ("/v1/completions", {"logprobs": 6}, "logprobs", "0 to 5"),
        ("/v1/completions", {"logprobs": -1}, "logprobs", "0 to 5"),
    ],
)
def test_out_of_range_logprobs_are_400(
    base_url: str, model_path: str, path: str, extra: dict[str, Any], field: str, allowed: str | None
) -> None:
    body: dict[str, Any] = {"model": model_path, "max_tokens": 2, **extra}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT})
    for stream in (False, True):  # refused before a stream starts, not as an error event after a 200
        r = httpx.post(f"{base_url}{path}", json={**body, "stream": stream}, timeout=30)
        assert r.status_code == 400, r.text  # OpenAI's status for a bad parameter
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["field"] == field and problem["detail"].startswith(f"{field}:")
        if allowed is not None:
            assert problem["allowed"] == allowed
