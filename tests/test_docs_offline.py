"""Offline docs and console (DESIGN.md §8): /docs and /redoc render with the network off, and
nothing central serves would make a browser fetch from outside."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from central.app import STATIC, create_app
from central.config.settings import Settings
from central.web.docs import ASSETS, TYPES
from tests.browser import OFFLINE, chromium, console_login, requested_urls
from tests.fleet import Central
from tests.helpers import Mosquitto
from tests.identity import ADMIN, PASSWORD, authorize

EXTERNAL = r"(?:https?:)?//[A-Za-z0-9]"
# What makes a browser load something: HTML attributes, CSS url() and @import, and in
# JavaScript URL-valued properties and the calls that fetch.
HTML_LOADS = re.compile(rf"""\b(?:src|href|action|srcset|poster|data|formaction)\s*=\s*["']?\s*{EXTERNAL}""",
                        re.I)
CSS_LOADS = re.compile(rf"""(?:url\(\s*["']?\s*{EXTERNAL}|@import\s+["']\s*{EXTERNAL})""", re.I)
JS_LOADS = (
    re.compile(rf"""(?:\bsrc|\bhref|[uU]rl|\baction)\s*[:=]\s*["'`]{EXTERNAL}[^"'`]*"""),
    re.compile(rf"""(?:fetch|importScripts|Worker|\.open|import)\s*\(\s*(?:["'`][A-Z]+["'`]\s*,\s*)?["'`]{EXTERNAL}[^"'`]*"""),
    re.compile(r"""["'`](?:https?:)?//(?:cdn|unpkg|fonts\.g|cdnjs|ajax\.googleapis)[^"'`]*"""),
)
# Known URL strings in the vendored bundles that no browser loads, each with the reason.
NOT_LOADED = {
    "https://redocly.com/redoc/": "redoc's 'API docs by Redocly' link: navigation on click only",
    "https://github.com/mermade/oas-kit": "redoc's converter metadata, a plain string",
}


def external_loads(kind: str, text: str) -> list[str]:
    if kind == "html":
        found = [m.group(0) for m in HTML_LOADS.finditer(text)]
        found += [m.group(0) for m in CSS_LOADS.finditer(text)]  # inline styles
        return found
    if kind == "css":
        return [m.group(0) for m in CSS_LOADS.finditer(text)]
    if kind == "json":  # data (the district boundaries): any URL at all is suspect
        return re.findall(rf"{EXTERNAL}[^\"]*", text)
    out = []
    for pattern in JS_LOADS:
        for m in pattern.finditer(text):
            url = re.search(rf"{EXTERNAL}[^\"'`]*", m.group(0))
            if url is None or url.group(0) not in NOT_LOADED:
                out.append(m.group(0))
    return out


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/central.db",
                              command_key_path=tmp_path / "key.pem"), run_ingest=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        await authorize(app, c)
        yield c


def test_the_scanner_catches_what_would_load() -> None:
    """The patterns flag a CDN script, a web font, a stylesheet import and a fetch."""
    assert external_loads("html", '<script src="https://cdn.example.org/x.js"></script>')
    assert external_loads("html", "<link href='//fonts.googleapis.com/css?family=X'>")
    assert external_loads("css", '@import "https://example.org/a.css";')
    assert external_loads("css", "a{background:url(https://example.org/a.png)}")
    assert external_loads("js", 'fetch("https://example.org/api")')
    assert external_loads("js", '{validatorUrl:"https://validator.swagger.io/validator"}')
    assert not external_loads("html", '<a href="/docs">/api</a> <script src="/static/x.js">')
    assert not external_loads("css", "a{background:url(\"data:image/svg+xml;"
                                     "xmlns='http://www.w3.org/2000/svg'\")}")


async def test_nothing_served_loads_from_outside(client: httpx.AsyncClient) -> None:
    """Every page (console, login, /docs, /redoc) and every script and stylesheet central
    serves, including the vendored swagger-ui and redoc bundles, loads nothing external."""
    served: dict[str, str] = {}
    for page in ("/", "/login", "/docs", "/redoc", "/docs/oauth2-redirect"):
        served[page] = "html"
    for f in sorted(STATIC.rglob("*")):  # the console's pages and vendor/ (ECharts, map)
        if f.is_file() and f.suffix in (".html", ".js", ".css", ".json"):
            served[f"/static/{f.relative_to(STATIC).as_posix()}"] = f.suffix.lstrip(".")
    for name in TYPES:
        if not name.endswith(".png"):
            served[f"{ASSETS}/{name}"] = name.rsplit(".", 1)[1]
    problems = {}
    for path, kind in served.items():
        r = await client.get(path)
        assert r.status_code == 200, (path, r.status_code)
        # every asset a page names is one of those checked here
        if kind == "html":
            for ref in re.findall(r"""(?:src|href)=["']([^"'#?]+)""", r.text):
                if ref.endswith((".js", ".css")):
                    assert ref in served, (path, ref)
        found = external_loads(kind, r.text)
        if found:
            problems[path] = found[:5]
    assert not problems, problems
    assert len(served) >= 12


@pytest.mark.browser
def test_docs_render_in_chromium_with_the_network_off(tmp_path: Path,
                                                      mosquitto: Mosquitto) -> None:
    """Logged in, /docs lists the operations and /redoc the endpoints with every name lookup
    and every non-local connection failing; every request the pages made went to central."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    try:
        central.auth_headers()  # makes the admin
        with chromium(tmp_path / "chrome", extra_args=OFFLINE, log_requests=True) as driver:
            console_login(driver, central.base_url, ADMIN, PASSWORD)
            wait = WebDriverWait(driver, 30, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException))
            driver.get(central.base_url + "/docs")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
            assert "Fieldlink central" in driver.find_element(By.CSS_SELECTOR, ".info").text
            assert driver.find_elements(By.CSS_SELECTOR, ".btn.authorize")
            driver.save_screenshot(str(tmp_path / "docs.png"))
            driver.get(central.base_url + "/redoc")
            wait.until(lambda d: "/api/gateways" in d.find_element(By.TAG_NAME, "body").text)
            assert "Fieldlink central" in driver.find_element(By.TAG_NAME, "h1").text
            driver.save_screenshot(str(tmp_path / "redoc.png"))
            urls = requested_urls(driver)
        assert any(u.endswith("/docs-assets/swagger-ui-bundle.js") for u in urls)
        assert any(u.endswith("/docs-assets/redoc.standalone.js") for u in urls)
        # chrome:// is the browser's own new-tab page, not the network
        outside = [u for u in urls if not u.startswith((central.base_url, "data:", "blob:",
                                                        "about:", "chrome://"))]
        assert outside == [], outside
    finally:
        central.stop()
