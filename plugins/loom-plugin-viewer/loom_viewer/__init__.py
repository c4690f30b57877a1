"""The ``viewer`` routes: ``/viewer``, a page that draws what this server answers (logit lens, attention, steering
side by side, activation patching, probes and SAE features), and the static files it is made of."""

from __future__ import annotations

from typing import Any

from loom_kernel import hookimpl


@hookimpl
def routes() -> list[Any]:
    from loom_viewer.pages import ViewerController  # litestar is imported when the app is built, not when probed

    return [ViewerController]
