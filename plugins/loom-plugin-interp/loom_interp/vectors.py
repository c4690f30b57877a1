"""Stored vectors (``/vectors``), which an intervention names instead of sending its numbers, and
``/vectors/contrast``: the difference of two sets of texts' mean states at a site (contrastive activation addition).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal

import attrs
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from loom_interp.interventions import read_vector
from loom_interp.state import interp
from loom_interp.stores import stored
from loom_kernel import (
    Batch,
    Capture,
    InvalidField,
    LoadedModel,
    Manager,
    ModelRequest,
    NonEmpty,
    Session,
    StateRequest,
    caller,
    check_site,
    client_gone,
    echo,
    encode_tensor,
    model_metadata,
)

MAX_CONTRAST_TEXTS = 256
CHUNK = 32  # texts per call of a contrast (a fit's are sent the same way)
ContrastTexts = Annotated[list[NonEmpty], msgspec.Meta(min_length=1, max_length=MAX_CONTRAST_TEXTS)]


class VectorRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: NonEmpty
    vector: list[Any] | dict[str, Any]  # numbers, rows of numbers, or a wire tensor as the server returns them
    model: str | None = None
    site: int | str | None = None
    description: str | None = None
    replace: bool = False


class ContrastRequest(ModelRequest, kw_only=True):
    site: int | str
    positive: ContrastTexts
    negative: ContrastTexts
    positions: Literal["last", "mean"] = "last"
    name: str | None = None  # store the vector under this name
    description: str | None = None
    replace: bool = False


def vector_site(site: Any, model: LoadedModel) -> int | str:
    """``site`` as the loader reads it, checked to hold one vector per token ([d]), as a mean of states, a
    direction and a probe need."""
    where, shape = check_site(site, model, "site")
    if len(shape) != 1:
        raise InvalidField(
            f"site: {echo(site)} holds {list(shape)} per token; this needs a site with one vector per token",
            field="site",
            allowed="hidden-state indices and hook points of shape [d] (GET /models/{id}/sites)",
        )
    return where


async def text_states(
    session: Session, texts: tuple[str, ...], capture: Capture, key: str, names: Callable[[int], str]
) -> Any:
    """Each text's state at ``key`` as a float64 row (the mean of the positions ``capture`` keeps), [len(texts), d].

    In calls of ``CHUNK`` texts, one batch past max_batch_size otherwise; each call's states (every token's, for a
    mean) are reduced to its rows as soon as it returns, so that only the passes in flight hold [tokens, d] states,
    not every text's at once (4096 texts of an 8K context at once are hundreds of GB). A text the loader refuses is
    named by ``names(i)``, its place in the request (``texts[40]``), not by its row in its call."""
    import torch

    async def chunk(start: int) -> Any:
        try:
            out = await session.forward(Batch(texts=texts[start : start + CHUNK]), capture)
        except InvalidField as exc:  # the loader names a row's "text": the request's field is names(its index)
            if exc.field != "text":
                raise
            name = names(start + int(exc.extra.get("row", 0)))
            detail = exc.detail.split(": ", 1)[-1]
            raise InvalidField(f"{name}: {detail}", field=name, allowed=exc.allowed) from None
        return await session.thread(lambda: torch.stack([r.states[key].double().mean(0) for r in out.rows]))

    return torch.cat(await asyncio.gather(*(chunk(i) for i in range(0, len(texts), CHUNK))))


async def contrast(session: Session, data: ContrastRequest, req: StateRequest) -> dict[str, Any]:
    """Every text's state at the site (``text_states``); the difference of the two sets' means."""
    model = session.model
    site = vector_site(data.site, model)
    texts = (*data.positive, *data.negative)
    capture = attrs.evolve(req, layers=[site]).capture(model)
    n = len(data.positive)

    def names(i: int) -> str:
        return f"positive[{i}]" if i < n else f"negative[{i - n}]"

    each = await text_states(session, texts, capture, str(site), names)

    def answer() -> dict[str, Any]:
        pos, neg = each[: len(data.positive)], each[len(data.positive) :]
        vector = pos.mean(0) - neg.mean(0)
        norm = float(vector.norm())
        unit = vector / norm if norm > 0 else vector
        return {
            "vector": vector.float(),
            "norm": norm,
            "separation": {
                "positive_mean_projection": float((pos @ unit).mean()),
                "negative_mean_projection": float((neg @ unit).mean()),
            },
        }

    return await session.thread(answer)


def _site_meta(data: Any) -> dict[str, str | None]:
    return {
        "model": data.model,
        "site": None if data.site is None else str(data.site),
        "description": data.description,
    }


class VectorsController(Controller):
    path = "/vectors"
    tags = ["interventions"]

    # Store operations run on request threads: a directory's writes are flushed to disk, and a shared directory's
    # reads may load what other replicas wrote.
    @post("/", status_code=201, sync_to_thread=True)
    def put(self, data: JSONBody[VectorRequest], request: Request, manager: Manager) -> Response:
        """Store a vector under ``name``: 201, or 200 when the same vector is stored under that name already (409
        for another one unless ``replace``; 507 past the byte budget or the entry limit)."""
        tensor = read_vector(data.vector, None, "vector")
        put = interp(manager.kernel).vectors.put
        return stored(*put(data.name, tensor, _site_meta(data), data.replace, caller(request)))

    @get("/", sync_to_thread=True)
    def list_vectors(self, request: Request, manager: Manager) -> dict[str, Any]:
        return interp(manager.kernel).vectors.listing(caller(request))

    @get("/{name:str}", sync_to_thread=True)
    def get_vector(self, name: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        item = interp(manager.kernel).vectors.get(name, caller(request))
        return {**item.describe(), "vector": encode_tensor(item.tensor, "float32", "list")}

    @delete("/{name:str}", status_code=200, sync_to_thread=True)
    def delete_vector(self, name: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        interp(manager.kernel).vectors.delete(name, caller(request))
        return {"status": "deleted", "name": name}

    @post("/contrast", status_code=200)
    async def contrast(self, data: JSONBody[ContrastRequest], request: Request, manager: Manager) -> dict[str, Any]:
        """The mean state of ``positive`` minus that of ``negative`` at ``site`` (each text's last token, or the mean
        of its tokens), its norm, and each set's mean projection on its direction; stored when ``name`` is given."""
        settings = manager.settings
        req = StateRequest.from_fields(
            wanted=True,
            layers=[data.site],
            positions="last" if data.positions == "last" else "all",
            return_full_sequence=False,
            fmt="list",
            dtype="float32",
            default_layers=settings.default_layers,
        )
        if data.name is not None:  # before the passes
            interp(manager.kernel).vectors.admissible(data.name, _site_meta(data))
        entry = await manager.get_for(data)
        result = await manager.run(entry, lambda s: contrast(s, data, req), until=client_gone(request))
        vector = result.pop("vector")
        stored = None
        if data.name is not None:
            put = interp(manager.kernel).vectors.put
            item, _ = await asyncio.to_thread(put, data.name, vector, _site_meta(data), data.replace, caller(request))
            stored = item.describe()
        return {
            **result,
            "vector": encode_tensor(vector, "float32", "list"),
            "stored": stored,
            "site": data.site,
            "counts": {"positive": len(data.positive), "negative": len(data.negative)},
            "metadata": model_metadata(entry.model()),
        }
