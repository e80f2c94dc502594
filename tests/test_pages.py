"""The waiting and checkout pages and their assets: served right, and self-contained."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.harness import ROOT
from tests.test_errors import assert_error
from waitroom import pages

STATIC = ROOT / "waitroom" / "static"
JS = "text/javascript; charset=utf-8"
ASSETS = {
    "common.js": JS,
    "waiting.js": JS,
    "pow-worker.js": JS,
    "checkout.js": JS,
    "console.js": JS,
    "checkin.js": JS,
    "seatmap.js": JS,
    "seatmap.css": "text/css; charset=utf-8",
    "checkin.css": "text/css; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def csp_directives(response: httpx.Response) -> dict[str, str]:
    policy = response.headers["content-security-policy"]
    directives: dict[str, str] = {}
    for part in policy.split(";"):
        name, _, value = part.strip().partition(" ")
        directives[name] = value.strip()
    return directives


def assert_locked_down(response: httpx.Response) -> None:
    """Only this origin, no inline code, no sniffing, no framing."""
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    csp = csp_directives(response)
    for directive in ("default-src", "script-src", "style-src", "connect-src", "img-src"):
        assert csp[directive] == "'self'", (directive, csp)
    assert csp["object-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("path", "script"),
    [
        ("/events/evt-1", "waiting.js"),
        ("/events/any_other-id", "waiting.js"),
        ("/events/evt-1/checkout", "checkout.js"),
        ("/events/no-such-event/checkout", "checkout.js"),
        ("/admin", "console.js"),
        ("/checkin", "checkin.js"),
        ("/events/evt-1/seats", "seatmap.js"),
    ],
)
def test_the_pages_are_the_same_html_for_any_event_with_strict_headers(
    client: httpx.Client, path: str, script: str
) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["etag"]
    assert_locked_down(response)
    assert f'<script type="module" src="/static/{script}"></script>' in response.text
    assert response.content == (STATIC / path_file(path)).read_bytes()


def path_file(path: str) -> str:
    if path == "/admin":
        return "console.html"
    if path == "/checkin":
        return "checkin.html"
    if path.endswith("/seats"):
        return "seatmap.html"
    return "checkout.html" if path.endswith("/checkout") else "waiting.html"


def test_a_page_answers_head_and_revalidates_with_its_etag(client: httpx.Client) -> None:
    first = client.get("/events/evt-1")
    again = client.get("/events/evt-2", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == first.headers["etag"]
    assert_locked_down(again)
    head = client.head("/events/evt-1")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "text/html; charset=utf-8"


@pytest.mark.parametrize(("name", "content_type"), sorted(ASSETS.items()))
def test_assets_are_served_with_their_type_and_cache_headers(
    client: httpx.Client, name: str, content_type: str
) -> None:
    response = client.get(f"/static/{name}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.content == (STATIC / name).read_bytes()
    assert_locked_down(response)
    etag = response.headers["etag"]
    cached = client.get(f"/static/{name}", headers={"If-None-Match": f'W/"x", {etag}'})
    assert cached.status_code == 304 and cached.content == b""
    stale = client.get(f"/static/{name}", headers={"If-None-Match": '"stale"'})
    assert stale.status_code == 200 and stale.content == response.content


@pytest.mark.parametrize(
    "path",
    [
        "/static/nope.js",
        "/static/waiting.html",
        "/static/.hidden.js",
        "/static/",
        "/static/..%2fpages.py",
        "/static/%2e%2e/pages.py",
        "/static/lua/join.lua",
        "/events/",
        "/events/evt-1/checkout/more",
    ],
)
def test_unknown_or_escaping_paths_are_a_404_error_body(client: httpx.Client, path: str) -> None:
    assert_error(client.get(path), 404)


def test_every_file_in_the_folder_is_one_the_app_serves() -> None:
    on_disk = {p.name for p in STATIC.iterdir() if p.is_file()}
    assert on_disk == {
        *ASSETS,
        "waiting.html",
        "checkout.html",
        "console.html",
        "checkin.html",
        "seatmap.html",
    }
    assert set(pages.assets()) == on_disk


def test_every_asset_the_pages_name_is_served(client: httpx.Client) -> None:
    for page in ("waiting.html", "checkout.html", "console.html", "checkin.html", "seatmap.html"):
        html = (STATIC / page).read_text()
        referenced = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
        assert len(referenced) >= 3, referenced
        for path in referenced:
            assert client.get(path).status_code == 200, path
    for script in STATIC.glob("*.js"):
        for target in re.findall(r'from\s+"([^"]+)"', script.read_text()):
            assert target.startswith("./") and (STATIC / target[2:]).is_file(), (script, target)


# --- nothing from outside --------------------------------------------------------------------


def without_comments(path: Path) -> str:
    """The file's text minus comments, so prose may mention URLs but code may not."""
    text = path.read_text()
    if path.suffix in (".html", ".svg"):
        return re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    if path.suffix == ".js":
        # A line comment starts a line or follows whitespace; "${scheme}//${host}" is code.
        text = re.sub(r"(?m)(^|\s)//.*$", r"\1", text)
    return text


#: The SVG namespace is a name, never fetched.
ALLOWED = {'xmlns="http://www.w3.org/2000/svg"'}


@pytest.mark.parametrize("name", sorted(p.name for p in STATIC.iterdir() if p.is_file()))
def test_no_file_loads_anything_from_another_origin(name: str) -> None:
    text = without_comments(STATIC / name)
    for allowed in ALLOWED:
        text = text.replace(allowed, "")
    assert not re.search(r"[A-Za-z][A-Za-z0-9+.-]*://", text), "an absolute URL"
    assert not re.search(r"""(?:["'(=`]|url\()\s*//\S""", text), "a protocol-relative URL"
    assert "//cdn" not in text.lower() and "@import" not in text
    assert "fonts.googleapis" not in text and "@font-face" not in text
    if name.endswith(".js"):
        imports = re.findall(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["']([^"']+)["']""", text)
        assert all(target.startswith("./") for target in imports), imports


@pytest.mark.parametrize(
    "name", ["waiting.html", "checkout.html", "console.html", "checkin.html", "seatmap.html"]
)
def test_the_pages_have_no_inline_script_or_style(name: str) -> None:
    html = (STATIC / name).read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
    assert not re.search(r"\sstyle\s*=|<style\b", html), "an inline style"
    assert 'aria-live="polite"' in html and '<html lang="en">' in html


def test_the_scripts_never_write_server_text_as_html() -> None:
    for script in STATIC.glob("*.js"):
        code = without_comments(script)
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, (script.name, sink)
