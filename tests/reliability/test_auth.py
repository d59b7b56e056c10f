"""With an API key set, every route refuses a missing or wrong key with 401, files, fine-tuning
and adapter routes included. Routes are enumerated from the app itself, so a route added later is
covered without editing this test; the only open routes are the ones listed in OPEN_ROUTES. The key
is read as clients send it (the Bearer scheme in any case, or x-api-key), once: a repeated header
is a 400, and an empty key in the environment or a config file stops the server rather than
turning auth off. (The admin key: test_admin_access.py.)"""
from __future__ import annotations

import re

import httpx
import pytest
from starlette.routing import Route

from .live import assert_openai_error, start_full_server

KEY = "s3cret-key"
# Open on purpose: /health for load balancers; /metrics like vLLM's (docs/operations.md: no
# prompt or user in it). Anything else open is a failure.
OPEN_ROUTES = {"/health", "/metrics"}


@pytest.fixture(scope="module")
def keyed_server(short_model_dir, tmp_path_factory):
    server = start_full_server(short_model_dir, tmp_path_factory.mktemp("keyed"), api_key=KEY)
    yield server
    server.stop()


def walk_routes(routes, prefix: str = ""):
    """Plain routes, also inside included routers (FastAPI >= 0.16x keeps those as wrappers
    holding `original_router` and an include prefix, not flattened into app.routes)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from walk_routes(inner.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Route):
            yield prefix + route.path, route.methods or {"GET"}


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every method of every route; path parameters filled in."""
    out = []
    for template, methods in walk_routes(app.routes):
        path = re.sub(r"\{[^}]+\}", "probe-id", template)
        out += [(method, path) for method in sorted(methods) if method != "HEAD"]
    return out


def test_route_enumeration_sees_every_router(keyed_server):
    paths = {p for _, p in every_route(keyed_server.app)}
    for expected in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/files",
                     "/v1/files/probe-id/content", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/probe-id/cancel",
                     "/v1/load_lora_adapter", "/v1/admin/adapters", "/health", "/metrics"):
        assert expected in paths, (expected, sorted(paths))
    # and every operation of the OpenAPI document is among them
    schema_paths = {re.sub(r"\{[^}]+\}", "probe-id", p) for p in keyed_server.app.openapi()["paths"]}
    assert schema_paths <= paths, schema_paths - paths


@pytest.mark.parametrize("credentials", [None, "Bearer wrong-key", f"Bearer {KEY}x", KEY, f"Basic {KEY}",
                                         "Bearer", f"bearer {KEY}x", f"Bearer {KEY[:-1]}"],
                         ids=["missing", "wrong", "longer", "no-scheme", "basic", "scheme-only",
                              "lowercase-scheme-wrong-key", "prefix"])
def test_every_route_but_the_open_ones_refuses_bad_credentials(keyed_server, credentials):
    headers = {} if credentials is None else {"Authorization": credentials}
    checked = 0
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for method, path in every_route(keyed_server.app):
            if path in OPEN_ROUTES:
                continue
            r = client.request(method, path, headers=headers, json={} if method in ("POST", "PUT") else None)
            error = assert_openai_error(r, 401)
            assert error["code"] == "invalid_api_key", (method, path, error)
            assert r.headers.get("www-authenticate") == "Bearer", (method, path)
            checked += 1
    assert checked >= 20  # the enumeration found the routers, not an empty list


def test_open_routes_and_the_right_key(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/v1/files", headers=good).status_code == 200
        assert client.get("/v1/fine_tuning/jobs", headers=good).status_code == 200
        assert client.get("/v1/admin/adapters", headers=good).status_code == 200


@pytest.mark.parametrize("raw_path", ["//v1/models", "/v1//models", "/V1/models", "/v1/../v1/models",
                                      "/v1%2Fmodels", "/health/../v1/models", "/./v1/models",
                                      "/v1/models?x=/health", "/v1/files/..%2F..%2Fhealth"])
def test_path_tricks_do_not_bypass_the_key(keyed_server, raw_path):
    """Spellings that a router might match while the key check does not: never a 2xx without the key."""
    from .test_path_safety import raw_request

    status, body = raw_request(keyed_server.url, "GET", raw_path)
    assert status in (401, 404, 400), (status, body[:200])
    assert b'"data"' not in body


@pytest.mark.parametrize("headers", [{"Authorization": f"bearer {KEY}"}, {"Authorization": f"BEARER {KEY}"},
                                     {"Authorization": f"Bearer   {KEY}"}, {"x-api-key": KEY},
                                     {"X-Api-Key": KEY, "Authorization": "Bearer something-else"}],
                         ids=["lowercase", "uppercase", "spaces", "x-api-key", "x-api-key-beside-another"])
def test_the_key_as_clients_send_it(keyed_server, headers):
    r = httpx.get(keyed_server.url + "/v1/models", headers=headers, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("headers", [
    [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")],
    [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer wrong")],
    [("x-api-key", "wrong"), ("x-api-key", KEY)],
], ids=["wrong-then-right", "right-then-wrong", "two-x-api-keys"])
def test_a_repeated_key_header_is_a_400(keyed_server, headers):
    """Which copy counts differs between proxies and frameworks: the request is refused, whichever
    copy holds the key."""
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            r = client.request(method, path, headers=headers, json={"model": "tiny", "prompt": "x"}
                               if method == "POST" else None)
            assert assert_openai_error(r, 400)["code"] == "duplicate_credentials", (method, path)


@pytest.mark.parametrize("key", ["api_key", "admin_key"])
def test_an_empty_key_from_the_environment_or_a_file_is_an_error(tmp_path, key):
    from parallm.server.config import ConfigError, load_settings

    for value in ("", "   "):
        with pytest.raises(ConfigError, match=key):
            load_settings({}, environ={f"PARALLM_{key.upper()}": value})
        toml = tmp_path / "c.toml"
        toml.write_text(f'[server]\n{key} = "{value}"\n')
        with pytest.raises(ConfigError, match=key):
            load_settings({}, config_file=str(toml), environ={})
    # a real key from either place still works, taken literally
    assert getattr(load_settings({}, environ={f"PARALLM_{key.upper()}": "none"}), key) == "none"
