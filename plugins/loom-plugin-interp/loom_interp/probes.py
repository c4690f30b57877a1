"""Stored probes (``/probes``): linear probes and sparse autoencoders that requests name in ``probes`` and
``stop_when``, uploaded as JSON or (an SAE, megabytes) as a safetensors file, or fitted on the server
(``/probes/fit``: scikit-learn's LogisticRegression on states taken through the scheduler)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated, Any, Literal

import attrs
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody

from loom_interp.fitting import train
from loom_interp.interventions import read_vector
from loom_interp.readouts import check_probe, typed_meta
from loom_interp.state import interp
from loom_interp.stores import PROBES_MAX_MB, Stored, stored
from loom_interp.vectors import text_states, vector_site
from loom_kernel import (
    InsufficientStorage,
    InvalidField,
    Manager,
    ModelRequest,
    NonEmpty,
    Session,
    StateRequest,
    caller,
    client_gone,
    echo,
    model_metadata,
)

SAFETENSORS_TYPES = ("application/vnd.loom.safetensors", "application/octet-stream")
SAE_ROLES = ("W_enc", "b_enc", "b_dec", "threshold", "W_dec")
MAX_FIT_TEXTS = 4096
MAX_FIT_CLASSES = 256
# What a safetensors file's tensors may hold: numbers the store keeps as float32 (a BOOL or int tensor is no SAE,
# and would grow 4 to 8 times as float32).
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
Tensor = list[Any] | dict[str, Any]  # numbers, rows of numbers, or a wire tensor


MAX_HEADER_BYTES = 16 * 2**20  # a safetensors header's own limit (100 MB in the library) is far above any SAE's


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
    top_features: int | None = None  # features an answer lists per position (default 16, at most the SAE's width)
    model: str | None = None
    description: str | None = None
    replace: bool = False


class FitRequest(ModelRequest, kw_only=True):
    name: NonEmpty
    site: int | str
    texts: Annotated[list[NonEmpty], msgspec.Meta(min_length=2, max_length=MAX_FIT_TEXTS)]
    labels: Annotated[list[NonEmpty], msgspec.Meta(min_length=2, max_length=MAX_FIT_TEXTS)]
    positions: Literal["last", "mean"] = "last"
    description: str | None = None
    replace: bool = False


def meta_of(data: Any, kind: str, activation: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "activation": activation,
        "site": str(data.site),
        "model": data.model,
        "description": data.description,
        "labels": getattr(data, "labels", None),
        "k": data.k,
        "top_features": data.top_features,
    }


def store(
    manager: Any, name: str, tensors: dict[str, Any], meta: dict[str, Any], replace: bool, owner: str
) -> tuple[Stored, bool]:
    """Checked and stored under ``owner``'s ``name`` (on a request thread: a directory's write is flushed to disk);
    (the entry, whether it is new or changed)."""
    check_probe(tensors, meta)
    meta = {k: v for k, v in meta.items() if v is not None and not isinstance(v, int | list)}
    return interp(manager.kernel).probes.put(name, tensors, meta, replace, owner)


def header_of(head: bytes, limit: int) -> tuple[int, dict[str, Any]]:
    """(the whole file's length, its header) from a safetensors file's first bytes: refused (422) when its tensors
    are not floats, and (507) when as float32 they would pass ``limit`` bytes, before its tensors are read."""
    allowed = "a safetensors file of float tensors (F32, F16, BF16, F64)"
    try:
        length = int.from_bytes(head[:8], "little")
        header = json.loads(head[8 : 8 + length])
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        dtypes = {k: v["dtype"] for k, v in tensors.items()}
        numbers = sum(math.prod(int(d) for d in v["shape"]) for v in tensors.values())
    except Exception as exc:
        raise InvalidField(
            f"body: not a safetensors file: {type(exc).__name__}: {echo(str(exc))}", field="body", allowed=allowed
        ) from None
    bad = next((k for k, d in dtypes.items() if d not in FLOAT_DTYPES), None)
    if bad is not None:
        raise InvalidField(f"body: tensor {echo(bad)} holds {echo(dtypes[bad])}", field="body", allowed=allowed)
    if numbers * 4 > limit:
        raise InsufficientStorage(
            f"body: its tensors would take {numbers * 4} bytes as float32, more than the probe budget of {limit} "
            "bytes (probes.max_mb)",
            field="body",
        )
    return 8 + length + end, header


def read_safetensors(body: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, its tensors as float32; a broken file is a 422."""
    import safetensors.torch

    try:
        length = int.from_bytes(body[:8], "little")
        header = json.loads(body[8 : 8 + length])
        tensors = safetensors.torch.load(body)
    except Exception as exc:
        raise InvalidField(
            f"body: not a safetensors file: {type(exc).__name__}: {echo(str(exc))}",
            field="body",
            allowed="a safetensors file",
        ) from None
    tensors = {k: v.float() for k, v in tensors.items()}
    broken = next((k for k, v in tensors.items() if not bool(v.isfinite().all())), None)
    if broken is not None:  # a NaN weight would answer null scores for every text
        raise InvalidField(f"body: tensor {echo(broken)} holds NaN or infinity", field="body", allowed="finite numbers")
    return tensors, dict(header.get("__metadata__") or {})


def upload_limit(settings: Any) -> int:
    """The largest SAE file ``POST /probes/{name}`` reads: the probe budget's tensors and their header."""
    return int(PROBES_MAX_MB.of(settings) * 2**20) + MAX_HEADER_BYTES


async def safetensors_body(request: Request, limit: int) -> bytes:
    """An SAE file's bytes, read as they arrive: its header first (``header_of``: sized and typed before any tensor is
    read), then no more than it says the file holds, and never more than ``limit`` (the probe budget, not the
    server's max_body_mb) plus the header; refused (413) past either."""
    from litestar.exceptions import HTTPException

    chunks: list[bytes] = []
    size, expected = 0, None
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if expected is None and size >= 8:
            head = b"".join(chunks)
            length = int.from_bytes(head[:8], "little")
            if length > MAX_HEADER_BYTES:
                raise InvalidField(f"body: a header of {length} bytes", field="body", allowed="a safetensors file")
            if size >= 8 + length:
                expected, _ = header_of(head, limit)
                chunks = [head]
        if size > (expected if expected is not None else limit + MAX_HEADER_BYTES):
            raise HTTPException(status_code=413, detail=f"body: more than its header says, or than {limit} bytes")
    return b"".join(chunks)


def fit_classes(data: FitRequest) -> tuple[list[str], list[int], int]:
    """(the classes, sorted; each text's class index; the cross-validation folds), checked before any work."""
    if len(data.labels) != len(data.texts):
        raise InvalidField(
            f"labels: {len(data.labels)} labels for {len(data.texts)} texts",
            field="labels",
            allowed=f"{len(data.texts)} labels, one per text",
        )
    classes = sorted(set(data.labels))
    if len(classes) > MAX_FIT_CLASSES:
        raise InvalidField(
            f"labels: {len(classes)} classes", field="labels", allowed=f"at most {MAX_FIT_CLASSES} classes"
        )
    index = {label: i for i, label in enumerate(classes)}
    y = [index[label] for label in data.labels]
    folds = min(5, min(y.count(i) for i in range(len(classes))))
    if len(classes) < 2 or folds < 2:
        raise InvalidField(
            "labels: fitting needs two classes or more, each on at least two texts",
            field="labels",
            allowed="two or more class names, each given to two texts or more",
        )
    return classes, y, folds


async def fit(session: Session, data: FitRequest, req: StateRequest, manager: Any) -> dict[str, Any]:
    """States of every text at the site (``text_states``: through the scheduler, in calls), then the fit, in a
    worker process (``fitting``): stopped past ``probes.fit_seconds``, or when the client leaves."""

    classes, y, folds = fit_classes(data)
    model = session.model
    site = vector_site(data.site, model)
    capture = attrs.evolve(req, layers=[site]).capture(model)
    each = await text_states(session, tuple(data.texts), capture, str(site), lambda i: f"texts[{i}]")

    def states() -> Any:
        import numpy as np

        x = each.numpy()
        broken = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if broken.size:  # scikit-learn refuses NaN and infinity; say which text gave them
            i = int(broken[0])
            raise InvalidField(
                f"texts[{i}]: its state at site {echo(data.site)} is not finite (NaN or infinity): the model's "
                "activations leave floating-point range on this text; leave it out, or load the model as float32",
                field=f"texts[{i}]",
                allowed="texts whose states at the site are finite",
            )
        return x

    x = await session.thread(states)
    try:
        result = await interp(manager.kernel).fitter.run(train, x, y, classes, folds)
    except ValueError as exc:
        headline = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise InvalidField(
            f"labels: scikit-learn refused to fit these texts and labels: {headline}",
            field="labels",
            allowed="texts and labels scikit-learn's LogisticRegression can fit",
        ) from None
    import torch

    return {
        "tensors": {"weight": torch.from_numpy(result.pop("weight")), "bias": torch.from_numpy(result.pop("bias"))},
        "labels": classes,
        **result,
        "cv_folds": folds,
    }


class ProbesController(Controller):
    path = "/probes"
    tags = ["readouts"]

    @post("/", status_code=201)
    async def put(self, data: JSONBody[ProbeRequest], request: Request, manager: Manager) -> Response:
        """A linear probe (``weight`` [C, H], ``bias`` [C], ``labels``, ``activation``) or an SAE (``kind``
        "sae": ``W_enc``, ``b_enc``, ``b_dec``, ``activation`` relu, jumprelu with ``threshold``, or topk with
        ``k``; optional ``W_dec``), as JSON."""
        roles = ("weight", "bias") if data.kind == "linear" else SAE_ROLES

        def put() -> tuple[Stored, bool]:
            tensors = {r: read_vector(getattr(data, r), None, r) for r in roles if getattr(data, r) is not None}
            meta = meta_of(data, data.kind, data.activation)
            return store(manager, data.name, tensors, meta, data.replace, caller(request))

        return stored(*await asyncio.to_thread(put))

    @post("/{name:str}", status_code=201, request_max_body_size=None, opt={"raw_body": True, "max_body": upload_limit})
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
        kind: FromQuery[str | None] = None,
    ) -> Response:
        """An SAE as a safetensors file (``W_enc``, ``b_enc``, ``b_dec``[, ``threshold``][, ``W_dec``], as
        SAELens saves them); ``site``, ``activation`` and ``k`` from the query or the file's metadata. With ``kind``
        tuned_lens, a tuned lens (tuned-lens's ``TunedLens`` state dict: ``layer_translators.{i}.weight`` and
        ``.bias``; its copies of the model's final norm and head, ``unembed.*``, are not kept: the lens reads
        through the model's own)."""
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media not in SAFETENSORS_TYPES:
            raise InvalidField(
                f"content-type: {media!r}; send the file's bytes", field="content-type", allowed=list(SAFETENSORS_TYPES)
            )
        async with interp(manager.kernel).uploads():  # at most MAX_UPLOADS bodies read and parsed at once
            body = await safetensors_body(request, interp(manager.kernel).probes.max_bytes)

            def put() -> tuple[Stored, bool]:  # parsing and the flushed write, on a request thread
                tensors, file_meta = read_safetensors(body)
                what = kind or file_meta.get("kind") or "sae"
                if what == "tuned_lens":
                    tensors = {key: t for key, t in tensors.items() if not key.startswith("unembed.")}
                    meta = {"kind": what, "activation": "identity", "site": "all", "model": model}
                    meta |= {"description": description}
                    return store(manager, name, tensors, meta, replace, caller(request))
                if what != "sae":
                    raise InvalidField(
                        f"kind: {echo(what)} is not a kind of file this route takes",
                        field="kind",
                        allowed=["sae", "tuned_lens"],
                    )
                unknown = sorted(set(tensors) - set(SAE_ROLES))
                if unknown:
                    raise InvalidField(
                        f"body: tensor {echo(unknown[0])} is not part of an SAE", field="body", allowed=list(SAE_ROLES)
                    )
                typed = typed_meta({key: file_meta[key] for key in ("k", "top_features") if key in file_meta})
                where = site or file_meta.get("site") or file_meta.get("hook_name")
                if where is None:
                    raise InvalidField("site: required (in the query, or the file's metadata)", field="site")
                act = activation or file_meta.get("activation") or "relu"
                fields = msgspec.structs.replace(
                    ProbeRequest(name=name, site=where),
                    k=k if k is not None else typed.get("k"),
                    model=model,
                    description=description,
                    top_features=top_features if top_features is not None else typed.get("top_features"),
                )
                if isinstance(fields.site, str) and fields.site.lstrip("-").isdigit():
                    fields = msgspec.structs.replace(fields, site=int(fields.site))
                return store(manager, name, tensors, meta_of(fields, "sae", act), replace, caller(request))

            return stored(*await asyncio.to_thread(put))

    # A store over a shared directory may read what other replicas wrote: on a request thread.
    @get("/", sync_to_thread=True)
    def list_probes(self, request: Request, manager: Manager) -> dict[str, Any]:
        return interp(manager.kernel).probes.listing(caller(request))

    @get("/{name:str}", sync_to_thread=True)
    def get_probe(self, name: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        return interp(manager.kernel).probes.get(name, caller(request)).describe()

    @delete("/{name:str}", status_code=200, sync_to_thread=True)
    def delete_probe(self, name: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        interp(manager.kernel).probes.delete(name, caller(request))
        return {"status": "deleted", "name": name}

    @post("/fit", status_code=201)
    async def fit(self, data: JSONBody[FitRequest], request: Request, manager: Manager) -> Response:
        """Fit scikit-learn's LogisticRegression on the texts' states at ``site`` (each text's last token or token
        mean), report training and 5-fold cross-validated accuracy, and store it as a softmax probe."""
        fit_classes(data)
        req = StateRequest.from_fields(
            wanted=True,
            layers=[data.site],
            positions="last" if data.positions == "last" else "all",
            return_full_sequence=False,
            fmt="list",
            dtype="float32",
            default_layers=[],
        )
        meta = {"kind": "linear", "activation": "softmax", "site": str(data.site), "model": data.model}
        meta |= {"description": data.description}
        interp(manager.kernel).probes.admissible(data.name, meta)  # before the passes and the fit
        entry = await manager.get_for(data)
        result = await manager.run(entry, lambda s: fit(s, data, req, manager), until=client_gone(request))
        meta |= {"labels": result["labels"]}
        owner = caller(request)
        item, changed = await asyncio.to_thread(
            store, manager, data.name, result.pop("tensors"), meta, data.replace, owner
        )
        return stored(item, changed, **result, metadata=model_metadata(entry.model()))
