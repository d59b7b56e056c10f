"""Request ids (given, sanitised, generated), JSON and text log lines, the access log, and no prompt
text in logs unless --log-prompts."""
from __future__ import annotations

import argparse
import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from parallm.server.logging_setup import LogSettings, configure_logging
from parallm.server.request_context import sanitize_request_id

from .conftest import MODEL, build_app

SECRET_PROMPT = "my-secret-diagnosis-xyzzy please summarise"


@pytest.fixture
def log_stream():
    """Configure parallm's logging into a buffer; undo afterwards so other tests see no change."""
    names = ("parallm", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level,
                 logging.getLogger(n).propagate, logging.getLogger(n).disabled) for n in names}
    stream = io.StringIO()

    def configure(fmt: str = "text"):
        configure_logging(LogSettings(format=fmt, level="info"), stream=stream)
        return stream

    yield configure
    for n, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_given_request_id_is_echoed_and_in_every_log_line(fake_engine, log_stream):
    stream = log_stream("json")
    app, _ = build_app(fake_engine)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "one two", "max_tokens": 3},
                        headers={"X-Request-Id": "client-abc.123"})
    assert r.headers["x-request-id"] == "client-abc.123"
    lines = json_lines(stream)
    app_line = [e for e in lines if e["logger"] == "parallm.server.testapp"]
    access = [e for e in lines if e["logger"] == "parallm.access"]
    assert len(app_line) == 1 and app_line[0]["request_id"] == "client-abc.123"
    assert len(access) == 1
    entry = access[0]
    assert entry["request_id"] == "client-abc.123"
    assert (entry["method"], entry["route"], entry["status"]) == ("POST", "/v1/completions", 200)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (2, 3)
    assert entry["model"] == MODEL
    assert isinstance(entry["latency_ms"], float) and entry["latency_ms"] >= 0


def test_request_id_is_generated_when_missing_or_unsafe(fake_engine, log_stream):
    stream = log_stream("json")
    app, _ = build_app(fake_engine)
    with TestClient(app) as client:
        plain = client.get(f"/v1/models/{MODEL}")
        unsafe = client.get(f"/v1/models/{MODEL}", headers={"X-Request-Id": "bad id\tinjected=1"})
        too_long = client.get(f"/v1/models/{MODEL}", headers={"X-Request-Id": "a" * 129})
    ids = [r.headers["x-request-id"] for r in (plain, unsafe, too_long)]
    assert len(set(ids)) == 3
    for rid in ids:
        assert sanitize_request_id(rid) == rid and len(rid) == 32  # a fresh uuid4 hex
    access_ids = [e["request_id"] for e in json_lines(stream) if e["logger"] == "parallm.access"]
    assert access_ids == ids


def test_request_id_header_is_echoed_on_errors(fake_engine, log_stream):
    stream = log_stream("json")
    app, _ = build_app(fake_engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/models/nope", headers={"X-Request-Id": "rid-404"})
        boom = client.get("/boom", headers={"X-Request-Id": "rid-500"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "rid-404"
    assert boom.status_code == 500
    statuses = {e["request_id"]: e["status"] for e in json_lines(stream) if e["logger"] == "parallm.access"}
    assert statuses == {"rid-404": 404, "rid-500": 500}


def test_sanitize_request_id():
    assert sanitize_request_id("  ok-1:2.3_x  ") == "ok-1:2.3_x"
    assert sanitize_request_id("") is None
    assert sanitize_request_id("a\r\nSet-Cookie: x") is None
    assert sanitize_request_id("é") is None
    assert sanitize_request_id("a" * 128) == "a" * 128


def test_no_prompt_text_in_logs_by_default(fake_engine, log_stream):
    stream = log_stream("text")
    app, _ = build_app(fake_engine)
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"prompt": SECRET_PROMPT}).status_code == 200
    text = stream.getvalue()
    assert "POST" in text and "route=/v1/completions" in text  # the access line is there...
    assert "xyzzy" not in text  # ...without the prompt


def test_log_prompts_puts_prompt_in_access_line(fake_engine, log_stream):
    stream = log_stream("json")
    app, _ = build_app(fake_engine, log_prompts=True)
    with TestClient(app) as client:
        client.post("/v1/completions", json={"prompt": SECRET_PROMPT}, headers={"X-Request-Id": "p1"})
    access = [e for e in json_lines(stream) if e["logger"] == "parallm.access"]
    assert access[0]["prompt"] == SECRET_PROMPT


def test_text_format_is_human_readable_with_request_id(fake_engine, log_stream):
    stream = log_stream("text")
    app, _ = build_app(fake_engine)
    with TestClient(app) as client:
        client.get(f"/v1/models/{MODEL}", headers={"X-Request-Id": "human-1"})
    (line,) = [ln for ln in stream.getvalue().splitlines() if "parallm.access" in ln]
    assert "[human-1]" in line and "status=200" in line and "route=/v1/models/{model}" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_log_outside_a_request_has_no_request_id(log_stream):
    stream = log_stream("json")
    logging.getLogger("parallm.engine").warning("startup %d", 5)
    (entry,) = json_lines(stream)
    assert entry["message"] == "startup 5" and entry["request_id"] == "-" and entry["level"] == "warning"


def test_configure_twice_does_not_duplicate_lines(log_stream):
    log_stream("json")
    stream = log_stream("json")
    logging.getLogger("parallm").info("once")
    assert [e["message"] for e in json_lines(stream)].count("once") == 1


def test_serve_flags_reach_the_settings():
    from parallm.server.config import ConfigError, load_settings
    from parallm.commands.serve import add_arguments, cli_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--log-format", "json", "--log-prompts"])
    settings = load_settings(cli_settings(args), environ={})
    assert (settings.log_format, settings.log_prompts) == ("json", True)
    plain = load_settings({}, environ={})
    assert (plain.log_format, plain.log_prompts) == ("text", False)
    assert load_settings({}, environ={"PARALLM_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="use text or json"):
        load_settings({"log_format": "xml"}, environ={})
    with pytest.raises(ValueError, match="accepted: text, json"):
        configure_logging(LogSettings(format="xml"))
