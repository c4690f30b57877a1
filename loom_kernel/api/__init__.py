"""The Litestar application: ``create_app(pm=None, settings=None)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pluggy
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from loom_kernel.admission import holding
from loom_kernel.api.deps import provide_kernel, provide_manager, provide_pm
from loom_kernel.api.inference import InferenceController, controller_with_fields
from loom_kernel.api.metrics import MetricsController, count_response
from loom_kernel.api.models import ModelsController
from loom_kernel.api.problems import EXCEPTION_HANDLERS, document_problems
from loom_kernel.api.schemas import strict_fields
from loom_kernel.api.security import Guard, api_key_middleware, guarded
from loom_kernel.api.system import SystemController
from loom_kernel.config import Settings
from loom_kernel.models import ModelManager
from loom_kernel.plugins import create_plugin_manager
from loom_kernel.version import __version__

log = logging.getLogger("loom")


def create_app(pm: pluggy.PluginManager | None = None, settings: Settings | None = None) -> Litestar:
    pm = pm or create_plugin_manager()
    settings = settings or Settings()
    manager = ModelManager(pm, settings)
    kernel = manager.kernel

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await manager.start()
        await asyncio.to_thread(lambda: pm.hook.startup(kernel=kernel))
        preload = asyncio.create_task(manager.preload(list(settings.preload))) if settings.preload else None
        try:
            yield
        finally:
            if preload is not None:
                preload.cancel()
            await manager.stop()
            await asyncio.to_thread(lambda: pm.hook.shutdown(kernel=kernel))

    middleware = [api_key_middleware(settings.api_key)] if settings.api_key else []
    inference = controller_with_fields(InferenceController, kernel)
    controllers = [SystemController, MetricsController, ModelsController, inference]
    added = [handler for handlers in pm.hook.routes(kernel=kernel) for handler in handlers or ()]
    app = Litestar(
        route_handlers=[*controllers, *added],
        dependencies={
            "manager": Provide(provide_manager, sync_to_thread=False),
            "pm": Provide(provide_pm, sync_to_thread=False),
            "kernel": Provide(provide_kernel, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        before_request=strict_fields,
        middleware=middleware,
        before_send=[count_response],
        cors_config=CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None,
        request_max_body_size=int(settings.max_body_mb * 2**20),
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(title="The Loom", version=__version__, path="/schema"),
        state=None,
        debug=False,
        logging_config=None,  # the CLI configures logging once (loom_kernel.logs); a second handler doubles lines
    )
    document_problems(app, api_key=bool(settings.api_key))
    # The guard sits outside the router: an ASGI wrapper of the app's handler, so that it sees every request.
    # Inside it, each request's hold on its models (loom_kernel.admission), let go of when the request has ended.
    app.asgi_handler = guarded(
        holding(app.asgi_handler), Guard.of(settings.host, settings.allowed_hosts, settings.cors_origins)
    )
    app.state.pm = pm
    app.state.settings = settings
    app.state.manager = manager
    kernel.app = app
    return app
