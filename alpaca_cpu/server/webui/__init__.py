"""The chat page alpaca-server serves at `/` (docs/design.md, "The chat page").

Three static files shipped as package data (no build step, nothing fetched from elsewhere),
read once when the app is made. The page itself needs no API key; its calls to /v1 do.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

# name -> media type; the page loads webui/app.js and webui/style.css relative to `/`
FILES = {"index.html": "text/html; charset=utf-8",
         "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}

# Scripts and styles only from this server and no inline script or event handler: a second
# wall behind the page's own escaping of everything the model writes.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")


def read_files() -> dict[str, bytes]:
    """The page's files by name."""
    folder = resources.files(__name__)
    return {name: folder.joinpath(name).read_bytes() for name in FILES}


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its script and style sheet under /webui/."""
    files = read_files()
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
               "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    def serve(name: str) -> Response:
        return Response(files[name], media_type=FILES[name], headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return serve("index.html")

    @app.api_route("/webui/app.js", methods=["GET", "HEAD"], include_in_schema=False)
    async def script() -> Response:
        return serve("app.js")

    @app.api_route("/webui/style.css", methods=["GET", "HEAD"], include_in_schema=False)
    async def style() -> Response:
        return serve("style.css")
