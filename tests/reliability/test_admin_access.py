"""Least privilege for the routes that change what the server serves (model and adapter
load/unload, the admin listing, DELETE of a fine-tuned model), run-time model loads confined to
--models-dir / --allowed-hub-models, /health when nothing is served, HEAD, and one server per data
directory.

The servers here are `parallm serve`'s own wiring in this process (build_engine,
mount_fine_tuning, create_app), so the model admin routes are the real ones, not the full
server's stand-ins; the fine-tuning runner is not started."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from live_app import free_port, run_app_in_thread
from tests.adapters.conftest import write_adapter_dir
from tiny_models import write_tiny_llama

from .conftest import SHORT_CONTEXT
from .live import MODEL, ROOT, assert_openai_error, serve
from .test_auth import walk_routes

API_KEY, ADMIN_KEY = "inference-key", "admin-key"


@dataclass
class AdminServer:
    url: str
    app: object
    engine: object  # MultiModelEngine
    mount: object  # FineTuningMount
    root: Path
    server: uvicorn.Server = field(repr=False)
    thread: object = field(repr=False)

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def adapters(self) -> list[str]:
        return sorted(n for m in self.engine.managers.values() for n in m.names())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.mount.service.shutdown()
        self.mount.lock.release()


def start_admin_server(model_dir: Path, root: Path, **settings) -> AdminServer:
    """`parallm serve --model model_dir --adapters-dir root/adapters --models-dir root/models
    --data-dir root/data` (plus `settings`), in this process, bound to loopback whatever `host`
    says (host only decides whether the admin routes count as reachable from the network)."""
    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings
    from parallm.commands.fine_tuning_setup import mount_fine_tuning
    from parallm.commands.serve import build_engine

    for sub in ("adapters", "models", "data"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    s = ServerSettings(model=str(model_dir), served_model_name=MODEL, device="cpu", max_num_seqs=4,
                       max_num_batched_tokens=64, port=port, adapters_dir=str(root / "adapters"),
                       models_dir=str(root / "models"), data_dir=str(root / "data"), **settings)
    engine = build_engine(s)
    mount = mount_fine_tuning(engine, s)
    app = create_app(engine, s, routers=mount.routers)
    server, thread = run_app_in_thread(app, port)
    return AdminServer(f"http://127.0.0.1:{port}", app, engine, mount, root, server, thread)


def admin_requests() -> list[tuple[str, str, dict | None]]:
    """One request to every admin route, each of which would change or show something if let in."""
    return [("POST", "/v1/load_lora_adapter", {"lora_name": "probe", "lora_path": "inside"}),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": "kept"}),
            ("POST", "/v1/admin/models/load", {"model": "inside-model", "name": "probe-model"}),
            ("POST", "/v1/admin/models/unload", {"model": MODEL, "force": True}),
            ("GET", "/v1/admin/adapters", None),
            ("DELETE", "/v1/models/ft:tiny::probe", None)]


@pytest.fixture(scope="module")
def world(short_model_dir, tmp_path_factory):
    """Each server's directories hold a valid adapter and a valid model, so a refusal is about
    who asks and never about what is there."""
    servers = {}

    def make(kind: str, **settings) -> AdminServer:
        root = tmp_path_factory.mktemp(kind)
        server = start_admin_server(short_model_dir, root, **settings)
        write_adapter_dir(short_model_dir, server.adapters_dir / "inside", seed=2)
        write_tiny_llama(server.models_dir / "inside-model", max_position_embeddings=SHORT_CONTEXT, seed=3)
        server.engine.managers[MODEL].load("kept", str(server.adapters_dir / "inside"), trusted=True)
        servers[kind] = server
        return server

    yield make
    for server in servers.values():
        server.stop()


def send(server: AdminServer, method: str, path: str, body: dict | None, **headers) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=120)


def test_admin_routes_are_off_on_a_network_bind_without_an_admin_key(world):
    # On loopback with no key the admin routes stay open, as they were.
    local = world("local")
    r = send(local, "POST", "/v1/load_lora_adapter", {"lora_name": "local-probe", "lora_path": "inside"})
    assert r.status_code == 200, r.text
    assert send(local, "POST", "/v1/unload_lora_adapter", {"lora_name": "local-probe"}).status_code == 200

    exposed = world("exposed", host="0.0.0.0")
    for method, path, body in admin_requests():
        error = assert_openai_error(send(exposed, method, path, body), 403)
        assert error["code"] == "admin_disabled" and "--admin-key" in error["message"], (path, error)
    assert exposed.adapters() == ["kept"] and exposed.engine.model_names() == [MODEL]
    # inference is not an admin route
    assert httpx.get(exposed.url + "/v1/models", timeout=30).status_code == 200


def test_only_the_admin_key_opens_the_admin_routes(world):
    server = world("keyed", host="0.0.0.0", api_key=API_KEY, admin_key=ADMIN_KEY)
    for method, path, body in admin_requests():
        for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}, {"x-api-key": API_KEY},
                        {"Authorization": f"Bearer {ADMIN_KEY}x"}):
            error = assert_openai_error(send(server, method, path, body, **headers), 401)
            assert error["code"] == "invalid_admin_key", (path, headers, error)
    assert server.adapters() == ["kept"] and server.engine.model_names() == [MODEL]

    # the admin key, in every spelling clients use; and it reaches the routes
    r = send(server, "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "inside"},
             Authorization=f"bearer {ADMIN_KEY}")
    assert r.status_code == 200, r.text
    r = send(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"}, **{"x-api-key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    r = send(server, "DELETE", "/v1/models/ft:tiny::nope", None, Authorization=f"Bearer {ADMIN_KEY}")
    assert assert_openai_error(r, 404)["code"] == "model_not_found"
    # inference takes the API key (and the admin key), not nothing
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    for key in (API_KEY, ADMIN_KEY):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_unloading_the_last_model_leaves_health_degraded(short_model_dir, tmp_path):
    server = start_admin_server(short_model_dir, tmp_path)
    try:
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        r = send(server, "POST", "/v1/admin/models/unload", {"model": MODEL, "force": True})
        assert r.status_code == 200, r.text
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "degraded", health.text
        assert health.json()["models"] == []
        head = httpx.head(server.url + "/health", timeout=30)
        assert head.status_code == 503 and head.content == b""
    finally:
        server.stop()


def test_head_answers_on_every_get_route(world):
    server = world("head")
    checked = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for template, methods in walk_routes(server.app.routes):
            if "GET" not in methods:
                continue
            path = re.sub(r"\{[^}]+\}", "probe-id", template)
            got, head = client.get(path), client.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.content == b"" and head.headers.get("content-type") == got.headers.get("content-type"), path
            checked += 1
    assert checked >= 10


def test_run_time_model_loads_stay_in_the_models_dir(world, short_model_dir, tmp_path):
    server = world("models")
    models = server.models_dir
    (tmp_path / "missing").mkdir()
    # inside the dir, but leading out: the whole dir, or one file of an otherwise local model
    (models / "linked-out").symlink_to(short_model_dir, target_is_directory=True)
    half = models / "half-linked"
    half.mkdir()
    for f in short_model_dir.iterdir():
        if f.name == "model.safetensors":
            (half / f.name).symlink_to(f)
        else:
            shutil.copy(f, half / f.name)
    outside_name = short_model_dir.name
    refused = {
        "an outside model": str(short_model_dir),
        "an outside path that does not exist": str(tmp_path / "missing" / outside_name),
        "a relative climb": os.path.relpath(short_model_dir, models),
        "a linked dir": "linked-out",
        "a linked weights file": "half-linked",
        "a hub id not allowed": "acme/model",
        "a system path": "/etc",
    }
    messages = {}
    for why, spec in refused.items():
        r = send(server, "POST", "/v1/admin/models/load", {"model": spec, "name": "probe"})
        error = assert_openai_error(r, 400)
        assert error["code"] == "model_not_allowed", (why, error)
        assert str(tmp_path) not in r.text and str(models) not in r.text, (why, r.text)
        messages[why] = error["message"]
    # the same answer whether the outside path exists or not
    assert messages["an outside model"] == messages["an outside path that does not exist"]
    assert server.engine.model_names() == [MODEL]

    r = send(server, "POST", "/v1/admin/models/load", {"model": "inside-model"})
    assert r.status_code == 200, r.text
    assert r.json()["root"] == "inside-model" and str(models) not in r.text
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert all(not str(c["root"]).startswith("/") for c in cards), cards
    assert send(server, "POST", "/v1/admin/models/unload", {"model": "inside-model"}).status_code == 200


def test_hub_ids_load_only_when_allowed(tmp_path):
    from parallm.server.config import ServerSettings
    from parallm.commands.engines import ModelNotAllowed, confine_model_spec

    settings = ServerSettings(allowed_hub_models="acme/*, other/exact")
    for ok in ("acme/tiny", "acme/tiny-2.5", "other/exact", "acme/tiny/model-q4.gguf"):
        assert confine_model_spec(ok, settings) == ok
    for bad in ("acme/..", "acme/../x", "evil/x", "other/exactly", "/abs/acme/x", "acme/x/../../y.gguf",
                "acme", "", "acme/x\x00"):
        with pytest.raises(ModelNotAllowed):
            confine_model_spec(bad, settings)
    with pytest.raises(ModelNotAllowed):  # no --models-dir: no local path, even an existing one
        confine_model_spec(str(tmp_path), ServerSettings())


# ---- one server per data directory --------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every file with a digest; SQLite's shared-memory index changes on reads, so it is left out."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}


def test_the_data_dir_lock_is_exclusive(tmp_path):
    from parallm.commands.data_dir_lock import DataDirInUse, lock_data_dir

    lock = lock_data_dir(tmp_path)
    try:
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            lock_data_dir(tmp_path)
    finally:
        lock.release()
    lock_data_dir(tmp_path).release()  # free again once released


def test_a_second_server_on_the_same_data_dir_exits_and_touches_nothing(short_model_dir, tmp_path):
    from parallm.finetune.ids import new_id
    from parallm.finetune.store import JobRecord, Store

    data = tmp_path / "data"
    first = serve(short_model_dir, tmp_path, "--data-dir", str(data))
    try:
        # A job the first server is running (as its runner leaves it while a worker trains).
        store = Store(data)
        job = JobRecord(id=new_id("ftjob"), model=MODEL, created_at=int(time.time()), status="running",
                        training_file="file-abc", seed=1, hyperparameters={}, method={}, plan={}, attempts=1,
                        worker_pid=first.proc.pid)
        store.add_job(job)
        store.add_event(job.id, "Fine-tuning job started")
        store.close()
        before = snapshot(data)

        second = subprocess.run(
            [sys.executable, "-m", "parallm", "serve", "--model", str(short_model_dir), "--served-model-name",
             MODEL, "--port", str(free_port()), "--device", "cpu", "--data-dir", str(data)],
            cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert second.returncode in (1, 2), (second.returncode, second.stderr[-2000:])
        assert "in use by another parallm serve" in second.stderr and f"pid {first.proc.pid}" in second.stderr, \
            second.stderr[-2000:]

        assert snapshot(data) == before
        store = Store(data)
        try:
            after = store.get_job(job.id)
            assert (after.status, after.attempts, after.worker_pid) == ("running", 1, first.proc.pid)
            assert [e.message for e in store.events_since(job.id, 0)] == ["Fine-tuning job started"]
        finally:
            store.close()
        assert first.proc.poll() is None and first.health()["status"] == "ok"
    finally:
        first.stop()
