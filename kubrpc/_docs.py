"""The documentation routes of the HTTP app: /openapi.json, and the /docs page (Swagger UI, served locally).

Swagger UI's files come from the swagger-ui-py package (the `docs` extra), which ships Swagger UI 5, the
first major version that renders OpenAPI 3.1. They are served by the app itself under /docs/assets/, so the
page works with no CDN and no internet access. Without the package, /docs answers 404 with a JSON body that
says what to install.
"""

from __future__ import annotations

import functools
import hashlib
import html
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .openapi import openapi_document

if TYPE_CHECKING:
    from .interfaces import ServerCore

__all__ = ("find_assets", "routes")

#: Swagger UI's files the page uses, and their content types.
ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}

#: Starts Swagger UI on the document named by its <script> tag's data-openapi (no inline script on the page).
_INIT = b"""window.ui = SwaggerUIBundle({
  url: document.currentScript.dataset.openapi,
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""

_MISSING = "the /docs page needs Swagger UI's files: pip install swagger-ui-py (what kubrpc's `docs` extra installs)"
_CACHED_ROOTS = 16  # documents kept per app, one per root_path seen (a deployment has one or two)


def find_assets() -> Path | None:
    """The folder of Swagger UI's files from the swagger-ui-py package, or None if it is not installed."""
    spec = importlib.util.find_spec("swagger_ui")  # finds the package without importing it (and its jinja2)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in ASSETS) else None


@functools.lru_cache(maxsize=4)
def _load(folder: Path) -> dict[str, tuple[bytes, str]]:
    """Each asset's bytes and short content hash (its ETag, and the ?v= that busts caches on an upgrade)."""
    files = {name: (folder / name).read_bytes() for name in ASSETS}
    files["init.js"] = _INIT
    return {name: (data, hashlib.sha256(data).hexdigest()[:16]) for name, data in files.items()}


def _page(title: str, assets: dict[str, tuple[bytes, str]], prefix: str, openapi_url: str) -> bytes:
    def url(name: str) -> str:
        return html.escape(f"{prefix}assets/{name}?v={assets[name][1]}")

    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{url("swagger-ui.css")}">
<link rel="icon" type="image/png" sizes="32x32" href="{url("favicon-32x32.png")}">
<link rel="icon" type="image/png" sizes="16x16" href="{url("favicon-16x16.png")}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{url("swagger-ui-bundle.js")}"></script>
<script src="{url("init.js")}" data-openapi="{html.escape(openapi_url)}"></script>
</body>
</html>
""".encode()


def routes(server: ServerCore) -> list[Route]:
    """GET /openapi.json, /docs (also /docs/) and /docs/assets/{name}."""
    documents: dict[str, bytes] = {}

    async def openapi(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        body = documents.get(root)
        if body is None:
            body = orjson.dumps(openapi_document(server, root_path=root))
            if len(documents) < _CACHED_ROOTS:
                documents[root] = body
        return Response(body, media_type="application/json")

    async def page(request: Request) -> Response:
        folder = find_assets()
        if folder is None:
            return JSONResponse({"code": "not_found", "message": _MISSING}, status_code=404)
        # Relative URLs, so that the page works under any prefix (a Mount, --root-path, a proxy's rewrite).
        prefix, openapi_url = ("", "../openapi.json") if request.url.path.endswith("/") else ("docs/", "openapi.json")
        info = server.openapi
        title = (info.title if info and info.title else ", ".join(server.services) or "kubrpc") + " - API docs"
        return Response(
            _page(title, _load(folder), prefix, openapi_url),
            media_type="text/html; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )

    async def asset(request: Request) -> Response:
        folder = find_assets()
        name: str = request.path_params["name"]
        if folder is None or name not in ASSETS and name != "init.js":
            message = _MISSING if folder is None else f"no such file: /docs/assets/{name}"
            return JSONResponse({"code": "not_found", "message": message}, status_code=404)
        data, digest = _load(folder)[name]
        headers = {
            "etag": f'"{digest}"',
            # The page names each file with ?v=<its hash>: a new version is a new URL.
            "cache-control": "public, max-age=31536000, immutable",
        }
        if request.headers.get("if-none-match") == headers["etag"]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=ASSETS.get(name, "text/javascript; charset=utf-8"), headers=headers)

    return [
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", page, methods=["GET"]),
        Route("/docs/", page, methods=["GET"]),
        Route("/docs/assets/{name}", asset, methods=["GET"]),
    ]
