"""/docs (Swagger UI) and /redoc from local files (DESIGN.md §8: duty networks are often cut
off from the internet, and both pages were blank without it).

The JavaScript and CSS are the copies the `fastapi-offline` package ships (swagger-ui-dist
and redoc's standalone bundle, with their licences in that package). Two defaults in them would
still reach out at run time, so the copies served here are rewritten once at start:

- Swagger UI validates the spec against `https://validator.swagger.io/validator` unless told
  otherwise: its default becomes `null` (no validator);
- Redoc's sidebar shows a logo from `https://cdn.redoc.ly/…`: it becomes an empty image.

The pages themselves come from FastAPI's own helpers, pointed at these files, without Google
Fonts. Served at `/docs-assets/{name}`; like every page but the login, they need a user.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

import structlog
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response

from central import CentralError
from protocols.errors import DetailedError

log = structlog.get_logger(__name__)
ASSETS = "/docs-assets"
_EMPTY_GIF = "data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEAAAAALAAAAAABAAEAAAIBAAA="
# (file, what it must not fetch, what it fetches instead)
REWRITES: tuple[tuple[str, str, str], ...] = (
    ("swagger-ui-bundle.js", '"https://validator.swagger.io/validator"', "null"),
    ("redoc.standalone.js", '"https://cdn.redoc.ly/redoc/logo-mini.svg"', f'"{_EMPTY_GIF}"'),
)
TYPES = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8",
         "redoc.standalone.js": "text/javascript; charset=utf-8",
         "swagger-ui.css": "text/css; charset=utf-8", "favicon.png": "image/png"}


class DocsAssetError(CentralError, DetailedError):
    template = "docs asset {name}: {reason}"
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str


def load_assets() -> dict[str, Asset]:
    """The docs assets from the installed package, with the rewrites applied."""
    folder = importlib.resources.files("fastapi_offline").joinpath("static")
    out: dict[str, Asset] = {}
    for name, media_type in TYPES.items():
        try:
            out[name] = Asset(folder.joinpath(name).read_bytes(), media_type)
        except OSError as exc:
            raise DocsAssetError(name, f"cannot read: {exc}") from exc
    for name, old, new in REWRITES:
        body = out[name].body
        if old.encode() not in body:
            # a newer bundle without that default: nothing to rewrite (the offline test
            # would catch a new external fetch)
            log.warning("docs_asset_rewrite_missing", asset=name, pattern=old)
            continue
        out[name] = Asset(body.replace(old.encode(), new.encode()), out[name].media_type)
    return out


def install(app: FastAPI) -> None:
    """Add /docs, /redoc, the OAuth2 redirect page and the local assets to `app` (made with
    `docs_url=None, redoc_url=None`)."""
    assets = load_assets()
    title = app.title
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
                              with_google_fonts=False)

    @app.get(ASSETS + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            return Response(status_code=404)
        return Response(found.body, media_type=found.media_type,
                        headers={"Cache-Control": "private, max-age=86400"})
