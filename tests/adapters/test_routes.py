"""The adapter/admin routes on a bare FastAPI app: vLLM request shapes, OpenAI error bodies, every
failure a 4xx that leaves the served adapters unchanged."""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlx_lm.utils import load_model

from parallm.engine.adapter_manager import AdapterManager
from parallm.engine.multi_model_engine import MultiModelEngine
from parallm.server.routes_adapters import create_adapter_router

from .test_registry import FakeLoaded, FakeMemory


class FakeEngine:
    """What MultiModelEngine needs of a model's engine here: its adapter manager, start, shutdown."""

    def __init__(self, adapters):
        self.engine = type("Inner", (), {"adapters": adapters})()

    async def start(self):
        pass

    async def shutdown(self, drain_timeout: float = 0.0):
        pass


@pytest.fixture
def setup(tiny_model_dir, tmp_path, make_adapter):
    model, _ = load_model(Path(tiny_model_dir))
    (tmp_path / "adapters").mkdir(exist_ok=True)
    built = []
    holder = {}

    def factory(loaded):
        built.append(loaded.name)
        manager = (AdapterManager("tiny", model, adapters_dir=tmp_path / "adapters",
                                  reserved_names=holder["multi"].registry.names) if loaded.name == "tiny" else None)
        return FakeEngine(manager)

    multi = holder["multi"] = MultiModelEngine(factory, loader=lambda spec, name=None: FakeLoaded(
        name or spec, FakeMemory(1000), source=f"/m/{spec}"))
    multi.add_model(FakeLoaded("tiny", FakeMemory(5000), context_length=2048, source=str(tiny_model_dir)))
    app = FastAPI()
    app.include_router(create_adapter_router(multi))
    make_adapter("x", seed=1)
    return TestClient(app), multi.managers["tiny"], multi, built


def _err(resp, status, code):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    return err


def test_load_list_unload(setup):
    client, manager, multi, _ = setup
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["parent"] == "tiny"
    assert manager.has_adapter("x")
    listing = multi.model_cards()
    assert [(m["id"], m["parent"]) for m in listing] == [("tiny", None), ("x", "tiny")]
    assert listing[1]["root"] == "x"
    assert client.get("/v1/admin/adapters").json()["data"][0]["name"] == "x"
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 200 and not manager.has_adapter("x")
    _err(client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}), 404, "model_not_found")


@pytest.mark.parametrize("body,status,code", [
    ({"lora_name": "y", "lora_path": "../x"}, 400, "path_not_allowed"),
    ({"lora_name": "y", "lora_path": "/etc"}, 400, "path_not_allowed"),
    ({"lora_name": "y", "lora_path": "%2e%2e%2fx"}, 400, "path_not_allowed"),
    ({"lora_name": "y", "lora_path": "missing"}, 400, "adapter_not_found"),
    ({"lora_name": "tiny", "lora_path": "x"}, 400, "name_conflict"),
    ({"lora_name": "y"}, 400, "invalid_request"),
    ({"lora_name": 5, "lora_path": "x"}, 400, "invalid_request"),
    ({"lora_name": "y", "lora_path": "x", "base_model_name": "nope"}, 404, "model_not_found"),
])
def test_load_errors(setup, body, status, code):
    client, manager, _, _ = setup
    _err(client.post("/v1/load_lora_adapter", json=body), status, code)
    assert manager.list() == []


def test_bad_json_and_duplicate(setup):
    client, manager, _, _ = setup
    _err(client.post("/v1/load_lora_adapter", content=b"{nope", headers={"content-type": "application/json"}),
         400, "invalid_request")
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}).status_code == 200
    _err(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}), 400,
         "adapter_already_loaded")
    assert [a.name for a in manager.list()] == ["x"]


def test_admin_models(setup):
    client, _, multi, built = setup
    registry = multi.registry
    r = client.post("/v1/admin/models/load", json={"model": "other"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "other" and r.json()["parallm"]["memory_bytes"] == 1000 and built == ["tiny", "other"]
    _err(client.post("/v1/admin/models/load", json={"model": "other"}), 400, "model_exists")
    registry.acquire("other")
    _err(client.post("/v1/admin/models/unload", json={"model": "other"}), 400, "model_busy")
    assert client.post("/v1/admin/models/unload", json={"model": "other", "force": True}).status_code == 200
    _err(client.post("/v1/admin/models/unload", json={"model": "other"}), 404, "model_not_found")
    _err(client.post("/v1/admin/models/load", json={}), 400, "invalid_request")
    assert registry.names() == ["tiny"]
