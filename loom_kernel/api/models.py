"""Loading, listing and unloading models; a loaded model's hook points and weights."""

from __future__ import annotations

import math
from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody

from loom_kernel.admission import Session
from loom_kernel.api.deps import Manager
from loom_kernel.api.inference import respond
from loom_kernel.api.payloads import NUMBER_BYTES, AnswerTooLarge
from loom_kernel.api.schemas import LoadRequest
from loom_kernel.api.streaming import client_gone
from loom_kernel.api.system import path_model_id
from loom_kernel.encoding import check_dtype, check_format, encode_states, safetensors_body
from loom_kernel.errors import InvalidField, ModelNotFound, Unsupported
from loom_kernel.reports import describe


class ModelsController(Controller):
    path = "/models"
    tags = ["models"]

    @get("/", sync_to_thread=False)
    def list_models(self, manager: Manager) -> dict[str, Any]:
        return {
            "loaded_models": manager.describe(),
            "max_models": manager.settings.max_models,
            "auto_unload_minutes": manager.settings.auto_unload_minutes,
        }

    @post("/load", status_code=200)
    async def load(self, data: JSONBody[LoadRequest], manager: Manager) -> dict[str, Any]:
        entry = await manager.get_for(data, hold=False)  # it reports on the model, never runs on it
        return {"status": "loaded", "model": describe(entry, manager.auto_unload_seconds)}

    @get("/{model_id:path}")
    async def about(self, model_id: FromPath[str], request: Request, manager: Manager) -> Any:
        """``GET /models/{id}/sites``: a loaded model's hook points (hidden-state indices and TransformerLens
        names) with each one's per-token shape; a name the model lacks says why. ``GET /models/{id}/weights``: its
        parameters' names, shapes and dtypes, or with ``names`` (comma-separated: the model's own parameter names,
        TransformerLens's where the mapping is exact) the tensors, in ``format`` list, base64 or safetensors (the
        default when the answer is over 1 MiB, else base64) and ``dtype``."""
        model_id = path_model_id(request, "/models/", model_id)
        what = next((w for w in ("/sites", "/weights") if model_id.endswith(w)), None)
        if what is None:
            raise NotFoundException(
                f"no such path: GET /models/{model_id} (did you mean /models/{model_id}/sites or /weights?)"
            )
        model_id = model_id.removesuffix(what)
        entry = manager.find(model_id)
        if entry is None:
            raise ModelNotFound(
                f"model_id: {model_id!r} is not loaded", field="model_id", allowed=sorted(manager.loaded_ids())
            )
        if what == "/weights":
            # Through the manager's run, as every request that works on a model: held while its tensors are read
            # and encoded, so that no unload, eviction or reload takes the model from under them.
            limit = int(manager.settings.max_response_mb * 2**20)
            # Every value of a repeated key: HTTP clients send a list as one (``params={"names": [a, b]}`` is
            # ``names=a&names=b``), and a plain dict of the query kept the first and dropped the rest unsaid.
            query = {key: request.query_params.getall(key) for key in request.query_params}

            async def work(session: Session) -> dict[str, Any] | bytes:
                return await session.thread(weights_answer, session.model, model_id, query, limit)

            return respond(await manager.run(entry, work, until=client_gone(request)))
        model = entry.model()
        named = model.sites or {}
        return {
            "model_id": model_id,
            "num_layers": model.num_layers,
            "hidden_state_indices": {
                "from": 0,
                "to": model.num_layers,
                "shape": [model.hidden_size],
                **({"last_shape": [model.final_width]} if model.final_width else {}),
            },
            "sites": {name: list(shape) for name, shape in named.items() if not isinstance(shape, str)},
            "unavailable": {name: why for name, why in named.items() if isinstance(why, str)},
            "interventions": model.sites is not None,
        }

    @delete("/{model_id:path}", status_code=200)
    async def unload(self, model_id: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        model_id = path_model_id(request, "/models/", model_id)
        await manager.unload(model_id)
        return {"status": "unloaded", "model_id": model_id}


def weights_answer(model: Any, model_id: str, values: dict[str, list[str]], limit: int) -> dict[str, Any] | bytes:
    """GET /models/{id}/weights, off the event loop: the listing, or the named tensors under ``limit`` bytes.
    ``values``: every value of each query key; ``names`` may be repeated (their lists join), the others not."""
    if model.weights is None:
        raise Unsupported(f"model_id: the {model.loader} loader offers no weights", field="model_id")
    unknown = sorted(set(values) - {"names", "format", "dtype"})
    if unknown:
        raise InvalidField(
            f"{unknown[0]}: not a query parameter of /weights", field=unknown[0], allowed=["names", "format", "dtype"]
        )
    for key in ("format", "dtype"):
        if len(set(values.get(key, ()))) > 1:
            raise InvalidField(f"{key}: given more than once ({values[key]})", field=key, allowed="one value")
    query = {key: ",".join(v) if key == "names" else v[0] for key, v in values.items()}
    listing = model.weights(None)
    if not query.get("names"):
        return {
            "model_id": model_id,
            "weights": {
                name: {"shape": list(entry[0]), "dtype": entry[1]}
                for name, entry in listing.items()
                if not isinstance(entry, str)
            },
            "unavailable": {name: why for name, why in listing.items() if isinstance(why, str)},
        }
    names = list(dict.fromkeys(n.strip() for n in query["names"].split(",") if n.strip()))
    dtype = check_dtype(query.get("dtype", "float32"), "dtype")
    for name in names:
        if name not in listing or isinstance(listing[name], str):
            why = (
                f"is not served for this model: {listing[name]}" if name in listing else "is not a weight of this model"
            )
            raise InvalidField(
                f"names: {name!r} {why}", field="names", allowed="the names GET /models/{id}/weights lists"
            )
    per = 2 if dtype in ("float16", "bfloat16") else 4
    numbers = sum(math.prod(listing[n][0]) for n in names)
    fmt = check_format(query.get("format") or ("safetensors" if numbers * per > 2**20 else "base64"), "format")
    estimate = numbers * NUMBER_BYTES[fmt][dtype]
    if estimate > limit:
        raise AnswerTooLarge(
            f"names: the answer would be about {estimate / 2**20:.1f} MiB, over this server's max_response_mb of "
            f"{limit / 2**20:g}; ask for fewer weights at once"
            + ("" if fmt == "safetensors" else ", or in safetensors"),
            field="names",
            estimate_bytes=int(estimate),
            limit_bytes=limit,
        )
    tensors = {name: t.float() if not t.is_floating_point() else t for name, t in model.weights(names).items()}
    payload: dict[str, Any] = {"model_id": model_id}
    if fmt == "safetensors":
        return safetensors_body(payload, {"weights": tensors}, dtype)
    return {**payload, "weights": encode_states(tensors, dtype, fmt)}
