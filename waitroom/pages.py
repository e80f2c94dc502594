"""The web pages: the waiting room and the checkout, and the operators' console, as static
files the app serves.

- ``GET /events/{event_id}``: the waiting page (``static/waiting.html``);
- ``GET /events/{event_id}/checkout``: the checkout page (``static/checkout.html``);
- ``GET /events/{event_id}/seats``: the seat map (``static/seatmap.html``): pick seats or the
  best available, and hold them with the queue pass;
- ``GET /checkin``: the door staff's check-in page (``static/checkin.html``; type or paste a
  ticket, ``POST /v1/checkin``);
- ``GET /admin``: the operators' live console (``static/console.html``; its API is
  :mod:`waitroom.console`, and it keeps the operator's token in ``sessionStorage``);
- ``GET /static/{name}``: their CSS, JavaScript and icon.

Both pages are the same file for every event: the JavaScript reads the event id from the URL
and asks the JSON API, so an unknown event is told by the API's 404, in the page. There is
no build step and nothing is loaded from anywhere but this origin; the Content-Security-Policy
enforces that in the browser (no inline script or style, no other host), which also matters
because the checkout page keeps the queue pass in ``sessionStorage``.

The files are read once per process, from the installed package, into memory: a handful of
small files, served without touching the disk, each with a strong ETag so revalidation costs
a 304 without a body. Only names found in the folder are served, so no path can escape it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from waitroom.core import ids
from waitroom.core.errors import NotFound

#: Only this origin, for everything; ``connect-src 'self'`` covers the same host's ws(s)://.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
#: The pages always revalidate (a 304 is cheap), so a new release reaches fans at once.
PAGE_CACHE = "no-cache"
#: Assets have no content hash in their names (no build step): a short freshness bounds how
#: long a fan can run an old script against a new server, while sparing the server the
#: requests of a crowd reloading the page during a sale.
ASSET_CACHE = "public, max-age=300"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    """One static file, held in memory."""

    body: bytes
    content_type: str
    etag: str


@cache
def assets() -> dict[str, Asset]:
    """Every servable file of ``waitroom/static``, by name (read once per process)."""
    found: dict[str, Asset] = {}
    for entry in resources.files("waitroom").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if not entry.is_file() or suffix not in _TYPES or entry.name.startswith("."):
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        found[entry.name] = Asset(body, _TYPES[suffix], etag)
    return found


def _serve(request: Request, name: str, cache_control: str) -> Response:
    asset = assets().get(name)
    if asset is None:
        raise NotFound(f"no file {name!r}", code="route_not_found")
    headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if _matches(request.headers.get("if-none-match"), asset.etag):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, headers=headers, media_type=asset.content_type)


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in candidates or "*" in candidates


async def waiting_page(request: Request) -> Response:
    """The waiting-room page of any event (the script reads the id from the URL)."""
    # Only for an id of the documented form: the page would call the API with it.
    ids.EVENT_ID.check(request.path_params["event_id"])
    return _serve(request, "waiting.html", PAGE_CACHE)


async def checkout_page(request: Request) -> Response:
    """The checkout page of any event (the pass comes from the waiting page's session)."""
    ids.EVENT_ID.check(request.path_params["event_id"])
    return _serve(request, "checkout.html", PAGE_CACHE)


async def seatmap_page(request: Request) -> Response:
    """The seat map of any event: pick seats or ask for the best available, then hold them."""
    ids.EVENT_ID.check(request.path_params["event_id"])
    return _serve(request, "seatmap.html", PAGE_CACHE)


async def static_file(request: Request) -> Response:
    """A CSS, JavaScript or icon file of the pages."""
    name: str = request.path_params["name"]
    if name.endswith(".html"):
        # The pages live at their own URLs; serving them here too would only add a second
        # copy for caches to hold.
        raise NotFound(f"no file {name!r}", code="route_not_found")
    return _serve(request, name, ASSET_CACHE)


async def checkin_page(request: Request) -> Response:
    """The door staff's check-in page (it asks for the staff token; the API checks it)."""
    return _serve(request, "checkin.html", PAGE_CACHE)


async def console_page(request: Request) -> Response:
    """The operators' live console (the page asks for the token; the API checks it)."""
    return _serve(request, "console.html", PAGE_CACHE)


ROUTES: list[BaseRoute] = [
    Route("/admin", console_page, methods=["GET"], name="console_page"),
    Route("/checkin", checkin_page, methods=["GET"], name="checkin_page"),
    Route("/events/{event_id}", waiting_page, methods=["GET"], name="waiting_page"),
    Route("/events/{event_id}/checkout", checkout_page, methods=["GET"], name="checkout_page"),
    Route("/events/{event_id}/seats", seatmap_page, methods=["GET"], name="seatmap_page"),
    Route("/static/{name}", static_file, methods=["GET"], name="static_file"),
]
