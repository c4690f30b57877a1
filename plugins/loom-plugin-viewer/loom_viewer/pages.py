"""The viewer's files, served from the package with their content types and a Content-Security-Policy that lets
the page load and fetch from this origin only.

The files hold no data (every number on the page comes from the API the page then calls with the user's key), so
they are served without the API key, as /health is: otherwise a browser, which sends no key when it opens a URL,
could never load the page that asks for the key.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html",  # Litestar adds "; charset=utf-8" to text types
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# 'self' only: no inline script or style, no other origin for scripts, styles, images, fonts or fetches; no
# framing by another origin, no <base> or plugin objects.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded plugin's page is seen at once
}


# Fetch Metadata of a navigation that another site's page started (a link, or its script setting location): the
# guard lets it open the page, but the page must then not run what that site's URL describes (see ``page``).
OTHER_SITES = frozenset({"cross-site", "same-site"})
FROM_ANOTHER_SITE = b'<body data-opened-from="another-site">'


def files() -> dict[str, Path]:
    """Every file the viewer serves, by its path under static/: a fixed list, so no request names anything else."""
    return {p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*")) if p.suffix in MEDIA_TYPES}


FILES = files()


def serve(name: str) -> Response[bytes]:
    path = FILES.get(name)
    if path is None:
        raise NotFoundException(f"/viewer/static/{name} is not a file of the viewer")
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


class ViewerController(Controller):
    path = "/viewer"
    include_in_schema = False  # a page, not an API operation
    opt = {"public": True}  # served without the API key (module docstring)

    @get("/", sync_to_thread=False)
    def page(self, request: Request) -> Response[bytes]:
        """The page; which view it shows, and on what, is in its query string, read by the page itself.

        Opened from another site's page, it says so on its <body>: the page then fills its form from the URL but
        waits for the user's Run. Otherwise any site could send a tab here and have the page load the model and run
        the request its URL names (same-origin fetches, with the tab's API key), which the guard refuses that site
        to do itself."""
        response = serve("index.html")
        if request.headers.get("sec-fetch-site", "").lower() in OTHER_SITES:
            response.content = response.content.replace(b"<body>", FROM_ANOTHER_SITE, 1)
        response.headers["Vary"] = "Sec-Fetch-Site"  # two pages under one URL: no cache may serve one for the other
        return response

    @get("/static/{name:path}", sync_to_thread=False)
    def static(self, name: FromPath[str]) -> Response[bytes]:
        return serve(name.lstrip("/"))
