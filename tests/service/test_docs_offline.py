"""/docs and /redoc work without the internet: every script, stylesheet and icon they load is served
by the service itself (fastapi-offline), and /metrics names the docs routes instead of `unmatched`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.service.helpers import TEST_DEVICE, running_server

ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
REFERENCE = re.compile(r"""(?:\bsrc|\bhref|\bspec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
DOCS_ROUTES = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/static-offline-docs/{path}")


@pytest.fixture(scope="module")
def client(encoder_dir: Path) -> Iterator[httpx.Client]:
    settings = Settings(encoder=encoder_dir, device=TEST_DEVICE, poll_interval_s=0)  # type: ignore[call-arg]
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def referenced(html: str) -> list[str]:
    """URLs the page loads: src/href attributes, Swagger UI's `url:` and ReDoc's `spec-url`."""
    return [attribute or swagger for attribute, swagger in REFERENCE.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_same_origin_assets(client: httpx.Client, page: str) -> None:
    answer = client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    assert not re.search(r"(?:https?:)?//[A-Za-z0-9]", html), "the page references another origin"
    urls = referenced(html)
    assert "/openapi.json" in urls
    assets = [url for url in urls if url != "/openapi.json"]
    assert any(url.endswith(".js") for url in assets), urls
    for url in assets:
        assert url.startswith("/"), url
        loaded = client.get(url)
        assert loaded.status_code == 200, url
        wanted = ASSET_TYPES[Path(url).suffix]
        assert wanted in loaded.headers["content-type"], (url, loaded.headers["content-type"])
        assert len(loaded.content) > 1000, url


def test_openapi_and_the_oauth2_redirect_still_answer(client: httpx.Client) -> None:
    assert "/match" in client.get("/openapi.json").json()["paths"]
    redirect = client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "oauth2" in redirect.text.lower()


def test_metrics_name_the_docs_routes(client: httpx.Client) -> None:
    for url in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                "/static-offline-docs/swagger-ui.css", "/static-offline-docs/missing.js", "/nowhere"):
        client.get(url)
    text = client.get("/metrics").text
    counted = set(re.findall(r'^ace_requests_total\{method="GET",route="([^"]+)",status="(\d+)"\}',
                             text, re.MULTILINE))
    for route in DOCS_ROUTES:
        assert (route, "200") in counted, (route, counted)
    assert ("/static-offline-docs/{path}", "404") in counted, counted
    assert [status for route, status in counted if route == "unmatched"] == ["404"], counted
