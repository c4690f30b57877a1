"""Loading, listing and unloading models."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody

from loom_kernel.api.deps import Manager
from loom_kernel.api.schemas import LoadRequest
from loom_kernel.api.system import path_model_id
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

    @delete("/{model_id:path}", status_code=200)
    async def unload(self, model_id: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        model_id = path_model_id(request, "/models/", model_id)
        await manager.unload(model_id)
        return {"status": "unloaded", "model_id": model_id}
