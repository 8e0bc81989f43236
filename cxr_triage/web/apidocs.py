"""``/docs``: the API's Swagger UI, served by the application itself, so it works offline and under the page's CSP.

FastAPI's own ``/docs`` loads Swagger UI from a CDN with an inline script: the CSP (``script-src 'self'``) blocks
both, and a hospital network often cannot reach a CDN. Here the assets come from the ``swagger-ui-py``
package (Swagger UI 5's release files in a wheel; 5 reads FastAPI's OpenAPI 3.1, the older ``swagger-ui-bundle``
does not) and the page's start-up script is a file of its own.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}
"""The files of the package the page uses (nothing else of the package is served)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""

INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout" });
});
"""


def assets_folder() -> Path:
    import swagger_ui

    return Path(swagger_ui.__file__).resolve().parent / "static"


def router(title: str) -> APIRouter:
    """``/docs``, its start-up script and the Swagger UI files."""
    routes = APIRouter(include_in_schema=False)
    page = PAGE.format(title=title)

    @routes.get("/docs", response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        return HTMLResponse(page)

    @routes.get("/docs/init.js")
    def init() -> Response:
        return Response(INIT, media_type="text/javascript")

    @routes.get("/docs/assets/{name}")
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise HTTPException(404, "no such file")
        return FileResponse(assets_folder() / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"})

    return routes
