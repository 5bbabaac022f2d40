"""/docs works with no internet: every script, stylesheet and icon it loads is served by FaceGate itself, and the
OpenAPI declares the key header as a security scheme (the docs' Authorize button)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from scheduler.api import create_app
from tests.conftest import make_settings


def test_docs_load_nothing_from_elsewhere(tmp_path):
    with TestClient(create_app(make_settings(tmp_path), None, collect_every_s=None)) as api:
        page = api.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
        assert urls, page.text
        assert not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
        for url in urls:
            assert api.get(url).status_code == 200, url
        assert api.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(
            ("application/javascript", "text/javascript"))
        schemes = api.get("/openapi.json").json()["components"]["securitySchemes"]
        assert any(s.get("type") == "apiKey" and s.get("name") == "X-API-Key" for s in schemes.values()), schemes
        assert api.get("/redoc").status_code == 404  # its scripts would come from a CDN: not served
