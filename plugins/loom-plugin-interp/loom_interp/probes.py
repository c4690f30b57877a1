"""Stored probes (``/probes``): linear probes and sparse autoencoders that requests name in ``probes`` and
``stop_when``, uploaded as JSON or (an SAE, megabytes) as a safetensors file, or fitted on the server
(``/probes/fit``: scikit-learn's LogisticRegression on states taken through the scheduler)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody

from loom_interp.interventions import read_vector
from loom_interp.readouts import check_probe
from loom_interp.stores import stores
from loom_kernel.admission import Session
from loom_kernel.api.deps import Manager
from loom_kernel.api.payloads import StateRequest, model_metadata
from loom_kernel.api.schemas import LoadFields, NonEmpty
from loom_kernel.api.streaming import client_gone
from loom_kernel.capture import check_site
from loom_kernel.errors import InvalidField
from loom_kernel.types import Batch

SAFETENSORS_TYPES = ("application/vnd.loom.safetensors", "application/octet-stream")
SAE_ROLES = ("W_enc", "b_enc", "b_dec", "threshold", "W_dec")
MAX_FIT_TEXTS = 4096
FIT_BATCH = 32
Tensor = list[Any] | dict[str, Any]  # numbers, rows of numbers, or a wire tensor


class ProbeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: NonEmpty
    site: int | str
    kind: Literal["linear", "sae"] = "linear"
    activation: str = "linear"
    weight: Tensor | None = None  # linear: [C, H]
    bias: Tensor | None = None  # linear: [C]
    labels: list[str] | None = None  # linear: C names (default "0".."C-1")
    W_enc: Tensor | None = None  # sae: [H, F], SAELens's names
    b_enc: Tensor | None = None
    b_dec: Tensor | None = None
    threshold: Tensor | None = None  # jumprelu: [F]
    W_dec: Tensor | None = None  # optional [F, H]: reconstruction error, feature steering
    k: int | None = None  # topk
    top_features: int | None = None  # features an answer lists per position (default 16)
    model: str | None = None
    description: str | None = None
    replace: bool = False


class FitRequest(LoadFields, kw_only=True):
    name: NonEmpty
    model: NonEmpty
    site: int | str
    texts: Annotated[list[NonEmpty], msgspec.Meta(min_length=2, max_length=MAX_FIT_TEXTS)]
    labels: Annotated[list[NonEmpty], msgspec.Meta(min_length=2, max_length=MAX_FIT_TEXTS)]
    positions: Literal["last", "mean"] = "last"
    description: str | None = None
    replace: bool = False


def meta_of(data: Any, kind: str, activation: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "kind": kind,
        "activation": activation,
        "site": str(data.site),
        "model": data.model,
        "description": data.description,
        "labels": getattr(data, "labels", None),
        "k": data.k,
    }
    if data.top_features is not None:
        meta["top_features"] = str(data.top_features)
    return meta


def store(manager: Any, name: str, tensors: dict[str, Any], meta: dict[str, Any], replace: bool) -> dict[str, Any]:
    check_probe(tensors, meta)
    meta = {k: v for k, v in meta.items() if v is not None and not isinstance(v, int | list)}
    return stores(manager).probes.put(name, tensors, meta, replace=replace).describe()


def read_safetensors(body: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, its tensors as float32; a broken file is a 422."""
    import safetensors.torch

    try:
        length = int.from_bytes(body[:8], "little")
        header = json.loads(body[8 : 8 + length])
        tensors = safetensors.torch.load(body)
    except Exception as exc:
        raise InvalidField(
            f"body: not a safetensors file: {type(exc).__name__}: {exc}", field="body", allowed="a safetensors file"
        ) from None
    return {k: v.float() for k, v in tensors.items()}, dict(header.get("__metadata__") or {})


async def bounded_body(request: Request, limit: int) -> bytes:
    """The body, read as it arrives and refused (413) once it passes ``limit``: the probe budget, not the server's
    max_body_mb, bounds an upload, and nothing past the budget is held in memory."""
    from litestar.exceptions import HTTPException

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=f"body: more than the probe budget of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def fit(session: Session, data: FitRequest, req: StateRequest) -> dict[str, Any]:
    """States of every text at the site (through the scheduler, ``FIT_BATCH`` texts a call), then the fit."""
    import asyncio

    model = session.model
    check_site(data.site, model, "site")
    capture = req.capture(model)
    chunks = [data.texts[i : i + FIT_BATCH] for i in range(0, len(data.texts), FIT_BATCH)]
    outputs = await asyncio.gather(*(session.forward(Batch(texts=tuple(c)), capture) for c in chunks))
    key = str(data.site)

    def train() -> dict[str, Any]:
        import numpy as np
        import torch
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        x = np.stack([r.states[key].double().mean(0).numpy() for out in outputs for r in out.rows])
        classes = sorted(set(data.labels))
        y = np.array([classes.index(label) for label in data.labels])
        folds = min(5, int(np.bincount(y).min()))
        if len(classes) < 2 or folds < 2:
            raise InvalidField(
                "labels: fitting needs two classes or more, each on at least two texts",
                field="labels",
                allowed="two or more class names, each given to two texts or more",
            )
        clf = LogisticRegression(max_iter=2000)
        cv = cross_val_score(
            LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0)
        )
        clf.fit(x, y)
        coef, intercept = torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)
        if len(classes) == 2:  # sklearn's binary model is one logit: softmax([0, z]) gives the same probabilities
            coef = torch.cat([torch.zeros_like(coef), coef])
            intercept = torch.cat([torch.zeros_like(intercept), intercept])
        return {
            "tensors": {"weight": coef.float(), "bias": intercept.float()},
            "labels": classes,
            "train_accuracy": float(clf.score(x, y)),
            "cv_accuracy": float(cv.mean()),
            "cv_folds": folds,
        }

    return await session.thread(train)


class ProbesController(Controller):
    path = "/probes"
    tags = ["readouts"]

    @post("/", status_code=201)
    async def put(self, data: JSONBody[ProbeRequest], manager: Manager) -> dict[str, Any]:
        """A linear probe (``weight`` [C, H], ``bias`` [C], ``labels``, ``activation``) or an SAE (``kind``
        "sae": ``W_enc``, ``b_enc``, ``b_dec``, ``activation`` relu, jumprelu with ``threshold``, or topk with
        ``k``; optional ``W_dec``), as JSON."""
        roles = ("weight", "bias") if data.kind == "linear" else SAE_ROLES
        tensors = {r: read_vector(getattr(data, r), None, r) for r in roles if getattr(data, r) is not None}
        return store(manager, data.name, tensors, meta_of(data, data.kind, data.activation), data.replace)

    @post("/{name:str}", status_code=201, request_max_body_size=None, opt={"raw_body": True})
    async def upload(
        self,
        name: FromPath[str],
        request: Request,
        manager: Manager,
        site: FromQuery[str | None] = None,
        activation: FromQuery[str | None] = None,
        k: FromQuery[int | None] = None,
        model: FromQuery[str | None] = None,
        description: FromQuery[str | None] = None,
        top_features: FromQuery[int | None] = None,
        replace: FromQuery[bool] = False,
    ) -> dict[str, Any]:
        """An SAE as a safetensors file (``W_enc``, ``b_enc``, ``b_dec``[, ``threshold``][, ``W_dec``], as
        SAELens saves them); ``site``, ``activation`` and ``k`` from the query or the file's metadata."""
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media not in SAFETENSORS_TYPES:
            raise InvalidField(
                f"content-type: {media!r}; send the file's bytes", field="content-type", allowed=list(SAFETENSORS_TYPES)
            )
        tensors, file_meta = read_safetensors(await bounded_body(request, stores(manager).probes.max_bytes + 2**20))
        unknown = sorted(set(tensors) - set(SAE_ROLES))
        if unknown:
            raise InvalidField(
                f"body: tensor {unknown[0]!r} is not part of an SAE", field="body", allowed=list(SAE_ROLES)
            )
        site = site or file_meta.get("site") or file_meta.get("hook_name")
        if site is None:
            raise InvalidField("site: required (in the query, or the file's metadata)", field="site", allowed=None)
        act = activation or file_meta.get("activation") or "relu"
        k = k if k is not None else int(file_meta["k"]) if "k" in file_meta else None
        fields = msgspec.structs.replace(
            ProbeRequest(name=name, site=site), k=k, model=model, description=description, top_features=top_features
        )
        if isinstance(fields.site, str) and fields.site.lstrip("-").isdigit():
            fields = msgspec.structs.replace(fields, site=int(fields.site))
        return store(manager, name, tensors, meta_of(fields, "sae", act), replace)

    @get("/", sync_to_thread=False)
    def list_probes(self, manager: Manager) -> dict[str, Any]:
        return stores(manager).probes.listing()

    @get("/{name:str}", sync_to_thread=False)
    def get_probe(self, name: FromPath[str], manager: Manager) -> dict[str, Any]:
        return stores(manager).probes.get(name).describe()

    @delete("/{name:str}", status_code=200)
    async def delete_probe(self, name: FromPath[str], manager: Manager) -> dict[str, Any]:
        stores(manager).probes.delete(name)
        return {"status": "deleted", "name": name}

    @post("/fit", status_code=201)
    async def fit(self, data: JSONBody[FitRequest], request: Request, manager: Manager) -> dict[str, Any]:
        """Fit scikit-learn's LogisticRegression on the texts' states at ``site`` (each text's last token or token
        mean), report training and 5-fold cross-validated accuracy, and store it as a softmax probe."""
        if len(data.labels) != len(data.texts):
            raise InvalidField(
                f"labels: {len(data.labels)} labels for {len(data.texts)} texts",
                field="labels",
                allowed=f"{len(data.texts)} labels, one per text",
            )
        req = StateRequest.from_fields(
            wanted=True,
            layers=[data.site],
            positions="last" if data.positions == "last" else "all",
            return_full_sequence=False,
            fmt="list",
            dtype="float32",
            default_layers=[],
        )
        entry = await manager.get(data.model, loader=data.loader, revision=data.revision, explicit=data.explicit())
        result = await manager.run(entry, lambda s: fit(s, data, req), until=client_gone(request))
        meta = {"kind": "linear", "activation": "softmax", "site": str(data.site), "model": data.model}
        meta |= {"description": data.description, "labels": result["labels"]}
        stored = store(manager, data.name, result.pop("tensors"), meta, data.replace)
        return {**result, "stored": stored, "metadata": model_metadata(entry.model())}
