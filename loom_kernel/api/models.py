"""Loading, listing and unloading models."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody

from loom_kernel.api.deps import Manager
from loom_kernel.api.schemas import LoadRequest
from loom_kernel.api.system import path_model_id
from loom_kernel.errors import ModelNotFound
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
        entry = await manager.get(data.model, loader=data.loader, revision=data.revision, explicit=data.explicit())
        return {"status": "loaded", "model": describe(entry, manager.auto_unload_seconds)}

    @get("/{model_id:path}", sync_to_thread=False)
    def sites(self, model_id: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        """``GET /models/{id}/sites``: a loaded model's hook points (hidden-state indices and TransformerLens
        names) with each one's per-token shape; a name the model lacks says why."""
        model_id = path_model_id(request, "/models/", model_id)
        if not model_id.endswith("/sites"):
            raise NotFoundException(f"no such path: GET /models/{model_id} (did you mean /models/{model_id}/sites?)")
        model_id = model_id.removesuffix("/sites")
        entry = manager.find(model_id)
        if entry is None:
            raise ModelNotFound(
                f"model_id: {model_id!r} is not loaded", field="model_id", allowed=sorted(manager.loaded_ids())
            )
        model = entry.model()
        named = model.sites or {}
        return {
            "model_id": model_id,
            "num_layers": model.num_layers,
            "hidden_state_indices": {"from": 0, "to": model.num_layers, "shape": [model.hidden_size]},
            "sites": {name: list(shape) for name, shape in named.items() if not isinstance(shape, str)},
            "unavailable": {name: why for name, why in named.items() if isinstance(why, str)},
            "interventions": model.sites is not None,
        }

    @delete("/{model_id:path}", status_code=200)
    async def unload(self, model_id: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        model_id = path_model_id(request, "/models/", model_id)
        await manager.unload(model_id)
        return {"status": "unloaded", "model_id": model_id}
