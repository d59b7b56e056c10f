"""What a web page in the user's browser can make a server on localhost do.

A page may `fetch()` any URL with a "simple" request, no CORS preflight: POST with a text/plain,
form or multipart body (or none). The browser hides the answer from the page, but the request
still runs. So every route that takes JSON refuses any other Content-Type (415) before reading
the body; the server sends CORS headers only to the origins given with --cors-origin."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.adapters.conftest import write_adapter_dir

from .live import MODEL, assert_openai_error
from .test_admin_access import admin_requests, start_admin_server

EVIL, GOOD = "https://evil.example", "https://a.example"

# what a page can send without a preflight (the Fetch standard's CORS-safelisted content types)
SIMPLE_TYPES = ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x"]


@pytest.fixture(scope="module")
def servers(short_model_dir, tmp_path_factory):
    made = {}

    def make(kind: str, **settings):
        server = start_admin_server(short_model_dir, tmp_path_factory.mktemp(kind), **settings)
        write_adapter_dir(short_model_dir, server.adapters_dir / "inside", seed=2)
        server.engine.managers[MODEL].load("kept", str(server.adapters_dir / "inside"), trusted=True)
        made[kind] = server
        return server

    yield make
    for server in made.values():
        server.stop()


def simple_request(url: str, path: str, body: dict | None, content_type: str | None) -> httpx.Response:
    headers = {"Origin": EVIL}
    if content_type is not None:
        headers["Content-Type"] = content_type
    content = json.dumps(body).encode() if body is not None else None
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


def test_a_web_page_cannot_drive_the_api(servers):
    """The default server (loopback, no keys): what an attacker's page reaches. Every admin route
    and the generation and job routes refuse a simple request; nothing is loaded or unloaded."""
    server = servers("default")
    targets = [(path, body) for method, path, body in admin_requests() if method == "POST"]
    targets += [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                          "max_tokens": 1}),
                ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}),
                ("/v1/fine_tuning/jobs", {"model": MODEL, "training_file": "file-x"}),
                ("/v1/fine_tuning/jobs/ftjob-x/cancel", None)]
    for path, body in targets:
        for content_type in SIMPLE_TYPES + [None]:
            r = simple_request(server.url, path, body if body is not None or content_type else None, content_type)
            error = assert_openai_error(r, 415)
            assert error["code"] == "unsupported_media_type", (path, content_type, error)
            assert "access-control-allow-origin" not in r.headers, (path, r.headers)
    assert server.adapters() == ["kept"] and server.engine.model_names() == [MODEL]
    assert httpx.get(server.url + "/v1/fine_tuning/jobs").json()["data"] == []

    # JSON, as every API client sends it, still works (and is what a preflight would guard)
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(server.url + "/v1/completions", content=json.dumps({"model": MODEL, "prompt": "x",
                                                                           "max_tokens": 1}),
                       headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code == 200, (content_type, r.text)
    # the upload is multipart by design, and is not a JSON route
    r = httpx.post(server.url + "/v1/files", files={"file": ("t.jsonl", b'{"text": "x"}\n')},
                   data={"purpose": "fine-tune"}, timeout=60)
    assert r.status_code == 200, r.text


def test_cors_headers_go_to_the_configured_origin_only(servers):
    def preflight(server, origin: str) -> httpx.Response:
        return httpx.options(server.url + "/v1/chat/completions", timeout=30,
                             headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization, content-type"})

    server = servers("cors", cors_origin=f"{GOOD}, https://b.example")
    r = preflight(server, GOOD)
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == GOOD, (r.status_code, r.headers)
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    refused = preflight(server, EVIL)
    assert not any(h.startswith("access-control-") for h in refused.headers), refused.headers
    assert_openai_error(refused)
    got = httpx.get(server.url + "/v1/models", headers={"Origin": GOOD}, timeout=30)
    assert got.status_code == 200 and got.headers.get("access-control-allow-origin") == GOOD
    other = httpx.get(server.url + "/v1/models", headers={"Origin": EVIL}, timeout=30)
    assert "access-control-allow-origin" not in other.headers

    # without --cors-origin no origin gets any
    plain = servers("no-cors")
    for origin in (GOOD, EVIL):
        r = preflight(plain, origin)
        assert not any(h.startswith("access-control-") for h in r.headers), r.headers
