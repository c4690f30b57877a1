"""Every endpoint once, as a `Call` (what to send, how to read the answer); the sync and async clients only differ
in how they send it."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from loom_client import decode


def json_body(response: httpx.Response) -> Any:
    return response.json()


def states_body(response: httpx.Response) -> dict[str, Any]:
    if response.headers.get("content-type", "").startswith(decode.SAFETENSORS_MEDIA_TYPE):
        return decode.safetensors(response.content)
    return decode.arrays(response.json())


def embeddings_body(response: httpx.Response) -> dict[str, Any]:
    return decode.embeddings(response.json())


def text_body(response: httpx.Response) -> str:
    return response.text


def jsonable(value: Any) -> Any:
    """``value`` with every numpy array (a steering vector, a wire tensor's worth of numbers) as a float32 wire
    tensor in base64, which the server reads exactly as it writes them."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value, dtype="<f4")
        return {
            "data": base64.b64encode(data.tobytes()).decode(),
            "shape": list(data.shape),
            "dtype": "float32",
            "encoding": "base64",
        }
    if isinstance(value, np.generic):  # a numpy scalar (np.float32(2), an element of np.arange): its Python value
        return value.item()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | None = None
    read: Callable[[httpx.Response], Any] = json_body
    stream: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None  # a raw body (a safetensors file) instead of ``body``


def request_args(call: Call) -> dict[str, Any]:
    """What httpx sends for ``call``: its JSON body (numpy arrays as wire tensors), or its raw bytes; its query."""
    args: dict[str, Any] = {"params": {k: v for k, v in call.params.items() if v is not None}}
    if call.content is not None:
        return {**args, "content": call.content, "headers": {"content-type": "application/octet-stream"}}
    return {**args, "json": jsonable(call.body)}


def model_path(prefix: str, model: str) -> str:
    # Slashes stay: the server routes /models/org/name and /models//abs/path (an absolute path's slash doubled).
    return prefix + quote(model, safe="/")


class Endpoints:
    """The Loom's API. On ``AsyncLoomClient`` every method returns an awaitable (streams: an async iterator).

    Keyword arguments are request fields as the README documents them (``hidden_state_layers=[0, -1]``,
    ``positions="all"``, ``max_tokens=20``, ...). Tensors come back as numpy arrays in the server's JSON
    structure: ``r["hidden_states"]["-1"]`` is ``[1, H]``, ``r["sequence_hidden_states"]["-1"]`` ``[T, H]``.
    """

    hidden_state_format: str = "base64"

    def _call(self, call: Call) -> Any:
        raise NotImplementedError

    def _stream(self, call: Call) -> Any:
        raise NotImplementedError

    def _states(self, fields: dict[str, Any], json_only: bool = False) -> dict[str, Any]:
        fmt = fields.get("hidden_state_format") or self.hidden_state_format
        if json_only and fmt == "safetensors":
            fmt = "base64"  # a stream or a batch answers in JSON; base64 carries the same values exactly
        return {**fields, "hidden_state_format": fmt}

    # -- hidden states and generation --------------------------------------------------------------------------
    def extract(self, model: str, text: str, **fields: Any) -> Any:
        """POST /extract: one forward pass; ``hidden_states`` (and ``sequence_hidden_states``) as arrays."""
        return self._call(Call("POST", "/extract", self._states({"model": model, "text": text, **fields}), states_body))

    def generate(self, model: str, prompt: str, **fields: Any) -> Any:
        """POST /generate: text, token ids and, when asked, states, attentions and logits as arrays."""
        body = self._states({"model": model, "prompt": prompt, **fields})
        return self._call(Call("POST", "/generate", body, states_body))

    def generate_batch(self, model: str, prompts: list[str], **fields: Any) -> Any:
        """POST /generate/batch: ``results`` in input order; a prompt refused alone has ``error`` (problem details)."""
        body = self._states({"model": model, "prompts": prompts, **fields}, json_only=True)
        return self._call(Call("POST", "/generate/batch", body, states_body))

    def stream(self, model: str, prompt: str, **fields: Any) -> Any:
        """POST /generate/stream: ``{"event": "token", index, token_id, text[, hidden_states][, logprob]}`` per
        token, then ``{"event": "done", ...the /generate body}``; an error event raises its LoomError."""
        body = self._states({"model": model, "prompt": prompt, **fields}, json_only=True)
        return self._stream(Call("POST", "/generate/stream", body, stream=True))

    def analyze(self, model: str, texts: list[str], **fields: Any) -> Any:
        """POST /analyze: D_eff (both forms), beta and norms per layer of the texts' states."""
        return self._call(Call("POST", "/analyze", {"model": model, "texts": texts, **fields}))

    # -- interventions -----------------------------------------------------------------------------------------------
    # ``interventions=[{"site": ..., "op": ..., "vector": ...}]`` goes with extract, generate, stream and the OpenAI
    # methods; a vector may be a numpy array, a list, a wire tensor or a stored vector's name.
    def sites(self, model: str) -> Any:
        """GET /models/{model}/sites: a loaded model's hook points with their per-token shapes."""
        return self._call(Call("GET", model_path("/models/", model) + "/sites"))

    def put_vector(self, name: str, vector: Any, **fields: Any) -> Any:
        """POST /vectors: store ``vector`` (``model``, ``site``, ``description``, ``replace``)."""
        return self._call(Call("POST", "/vectors", {"name": name, "vector": vector, **fields}))

    def vectors(self) -> Any:
        """GET /vectors: every stored vector's name, shape, norm and metadata, and the store's bytes."""
        return self._call(Call("GET", "/vectors"))

    def vector(self, name: str) -> Any:
        """GET /vectors/{name}: its metadata and ``vector`` as an array."""
        return self._call(Call("GET", "/vectors/" + quote(name, safe=""), read=states_body))

    def delete_vector(self, name: str) -> Any:
        """DELETE /vectors/{name}."""
        return self._call(Call("DELETE", "/vectors/" + quote(name, safe="")))

    def contrast(self, model: str, site: int | str, positive: list[str], negative: list[str], **fields: Any) -> Any:
        """POST /vectors/contrast: mean(positive) - mean(negative) at ``site`` as an array (``name=`` stores it)."""
        body = {"model": model, "site": site, "positive": positive, "negative": negative, **fields}
        return self._call(Call("POST", "/vectors/contrast", body, states_body))

    def patch(self, model: str, clean: str, corrupted: str, sites: Any, metric: dict[str, Any], **fields: Any) -> Any:
        """POST /patch: the metric for clean, corrupted, and each (site, position) patched, raw and normalized;
        ``method="attribution"``: every cell estimated from one forward and backward pass (``attribution``)."""
        body = {"model": model, "clean": clean, "corrupted": corrupted, "sites": sites, "metric": metric, **fields}
        return self._call(Call("POST", "/patch", body))

    def logit_attribution(self, model: str, target: dict[str, Any], **fields: Any) -> Any:
        """POST /logit_attribution: direct logit attribution (``text``, ``texts`` or ``token_ids``; ``target``
        ``{"tokens": [a, b]}`` and the like; ``components`` "layers" or "heads"; ``position``)."""
        return self._call(Call("POST", "/logit_attribution", {"model": model, "target": target, **fields}))

    def weights(self, model: str, names: list[str] | None = None, **params: Any) -> Any:
        """GET /models/{model}/weights: every name with its shape and dtype, or ``names``' tensors as arrays
        (``format``, ``dtype``)."""
        query = {"names": ",".join(names) if names else None, **params}
        return self._call(Call("GET", model_path("/models/", model) + "/weights", read=states_body, params=query))

    # -- readouts: logit lens, probes, sparse autoencoders -----------------------------------------------------------
    # ``logit_lens={"layers": "all", "top_k": 5, "tokens": [" Paris"], "tuned": "lens"}``, ``probes=["name"]`` and
    # (generation) ``stop_when=[{"probe", "label", "above"}]`` go with extract, generate, stream and the OpenAI methods.
    def put_probe(self, name: str, site: int | str, **fields: Any) -> Any:
        """POST /probes: a linear probe (``weight``, ``bias``, ``labels``, ``activation``) or, with ``kind="sae"``,
        a sparse autoencoder (``W_enc``, ``b_enc``, ``b_dec``, ...); tensors may be numpy arrays."""
        return self._call(Call("POST", "/probes", {"name": name, "site": site, **fields}))

    def upload_probe(self, name: str, safetensors: bytes, **params: Any) -> Any:
        """POST /probes/{name}: an SAE as a safetensors file's bytes (``site``, ``activation``, ``k`` as keywords,
        else from the file's metadata), or with ``kind="tuned_lens"`` a tuned lens's state dict."""
        call = Call("POST", "/probes/" + quote(name, safe=""), params=params, content=safetensors)
        return self._call(call)

    def fit_probe(self, name: str, model: str, site: int | str, texts: list[str], labels: list[str], **f: Any) -> Any:
        """POST /probes/fit: LogisticRegression on the texts' states at ``site``; training and CV accuracy."""
        body = {"name": name, "model": model, "site": site, "texts": texts, "labels": labels, **f}
        return self._call(Call("POST", "/probes/fit", body))

    def probes(self) -> Any:
        """GET /probes: every stored probe's kind, site, activation, shapes and metadata."""
        return self._call(Call("GET", "/probes"))

    def probe_info(self, name: str) -> Any:
        """GET /probes/{name}."""
        return self._call(Call("GET", "/probes/" + quote(name, safe="")))

    def delete_probe(self, name: str) -> Any:
        """DELETE /probes/{name}."""
        return self._call(Call("DELETE", "/probes/" + quote(name, safe="")))

    # -- embeddings ----------------------------------------------------------------------------------------------
    def embed(self, model: str, text: str, **fields: Any) -> Any:
        """POST /embed: ``embedding`` as a float32 array."""
        return self._call(Call("POST", "/embed", {"model": model, "text": text, **fields}, embeddings_body))

    def embed_batch(self, model: str, texts: list[str], **fields: Any) -> Any:
        """POST /embed/batch: ``embeddings`` as one [n, D] array (a list of [T_i, D] arrays for pooling none)."""
        return self._call(Call("POST", "/embed/batch", {"model": model, "texts": texts, **fields}, embeddings_body))

    # -- OpenAI-compatible -----------------------------------------------------------------------------------------
    def embeddings(self, model: str, input: str | list[str], **fields: Any) -> Any:
        """POST /v1/embeddings (OpenAI's schema): each ``data[i]["embedding"]`` as a float32 array."""
        return self._call(Call("POST", "/v1/embeddings", {"model": model, "input": input, **fields}, embeddings_body))

    def chat_completions(self, model: str, messages: list[dict[str, Any]], **fields: Any) -> Any:
        """POST /v1/chat/completions; ``stream=True`` gives an iterator of chunks."""
        return self._openai("/v1/chat/completions", {"model": model, "messages": messages, **fields})

    def completions(self, model: str, prompt: str, **fields: Any) -> Any:
        """POST /v1/completions; ``stream=True`` gives an iterator of chunks."""
        return self._openai("/v1/completions", {"model": model, "prompt": prompt, **fields})

    def _openai(self, path: str, body: dict[str, Any]) -> Any:
        if "hidden_state_format" in body:
            body = self._states(body, json_only=True)
        if body.get("stream"):
            return self._stream(Call("POST", path, body, stream=True))
        return self._call(Call("POST", path, body, states_body))

    def openai_models(self) -> Any:
        """GET /v1/models."""
        return self._call(Call("GET", "/v1/models"))

    def openai_model(self, model: str) -> Any:
        """GET /v1/models/{model}: OpenAI's ``Model`` object (what the SDK's ``models.retrieve`` reads)."""
        return self._call(Call("GET", model_path("/v1/models/", model)))

    # -- models, plugins, server ---------------------------------------------------------------------------------
    def models(self) -> Any:
        """GET /models: loaded (and loading) models with their state, loader, device, queue and batch counters."""
        return self._call(Call("GET", "/models"))

    def load_model(self, model: str, **options: Any) -> Any:
        """POST /models/load (``loader``, ``device``, ``dtype``, ``quantization``, ``device_map``, ...)."""
        return self._call(Call("POST", "/models/load", {"model": model, **options}))

    def unload_model(self, model: str) -> Any:
        """DELETE /models/{model}."""
        return self._call(Call("DELETE", model_path("/models/", model)))

    def loaders(self) -> Any:
        """GET /loaders."""
        return self._call(Call("GET", "/loaders"))

    def probe(self, model: str) -> Any:
        """GET /loaders/probe/{model}: every loader plugin's score and reason, best first."""
        return self._call(Call("GET", model_path("/loaders/probe/", model)))

    def plugins(self) -> Any:
        """GET /plugins."""
        return self._call(Call("GET", "/plugins"))

    def health(self) -> Any:
        """GET /health."""
        return self._call(Call("GET", "/health"))

    def metrics(self) -> Any:
        """GET /metrics: Prometheus text."""
        return self._call(Call("GET", "/metrics", read=text_body))

    def openapi(self) -> Any:
        """GET /schema/openapi.json."""
        return self._call(Call("GET", "/schema/openapi.json"))
