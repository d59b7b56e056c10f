"""Every field that names a model, adapter, file or job, tried with traversal: `../`, absolute
paths, URL-encoded and double-encoded forms, NUL, backslashes. None escapes its directory: each
answer is a 4xx, nothing outside the server's directories is read (a canary never shows up in a
response; a *valid* adapter placed outside the adapters dir is never loaded), and nothing outside
them is created, changed or deleted.

Path parameters go over a raw socket so that no client library normalises `..` away. Files inside
an adapter directory are confined too (a link out is refused), and no answer holds a server path."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from tests.adapters.conftest import write_adapter_dir

from .live import MODEL, assert_openai_error

CANARY = "CANARY-4f1d2b-do-not-serve"


def traversals(target: Path, root: Path) -> list[str]:
    """Ways to name `target` (outside the directory a field is resolved in), plain and encoded."""
    rel = "../" * 6 + str(target).lstrip("/")
    return [
        rel, "../" + target.name, "../../" + target.name, str(target), "/etc/passwd", "/etc/../etc/passwd",
        rel.replace("/", "%2f").replace("..", "%2e%2e"), rel.replace("/", "%2F"),
        rel.replace("/", "%252f").replace("..", "%252e%252e"),  # double-encoded
        rel.replace("/", "\\"), "..\\..\\" + target.name, target.name + "\x00.txt", "x/../../" + target.name,
        "file://" + str(target), "~/" + target.name, str(root),
    ]


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, str]:
    """Every path under root outside `skip`, with a digest of the files (to see reads that wrote)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def raw_request(url: str, method: str, raw_path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request with the path sent byte for byte."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = (f"{method} {raw_path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def world(full_server, short_model_dir):
    """A canary file and a valid adapter outside the adapters dir, a valid one inside it, one stored
    file and one job: escaping anything would find something real."""
    root = full_server.root
    (root / "secret.txt").write_text(CANARY)
    outside_adapter = write_adapter_dir(short_model_dir, root / "outside-adapter", seed=1)
    write_adapter_dir(short_model_dir, full_server.adapters_dir / "inside", seed=2)
    client = httpx.Client(base_url=full_server.url, timeout=60)
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)).encode()
    f = client.post("/v1/files", files={"file": ("t.jsonl", io.BytesIO(rows))}, data={"purpose": "fine-tune"})
    assert f.status_code == 200, f.text
    job = client.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": f.json()["id"]})
    assert job.status_code == 200, job.text
    before = snapshot(root, skip=(full_server.data_dir,))
    yield {"root": root, "client": client, "outside_adapter": outside_adapter, "before": before,
           "db": full_server.data_dir / "parallm.db", "file_id": f.json()["id"], "job_id": job.json()["id"]}
    client.close()


def check_refused(status: int, body: bytes) -> None:
    assert 400 <= status < 500, (status, body[:300])
    assert CANARY.encode() not in body and b"root:" not in body and b"SQLite format" not in body, body[:300]


def test_a_valid_adapter_inside_the_dir_loads(world, full_server):
    # Control: the route works, so the refusals below are about the paths.
    r = world["client"].post("/v1/load_lora_adapter", json={"lora_name": "inside-ok", "lora_path": "inside"})
    assert r.status_code == 200, r.text


def test_adapter_paths(world, full_server):
    root = world["root"]
    names = list(full_server.manager.names())
    for i, bad in enumerate(traversals(world["outside_adapter"], full_server.adapters_dir)):
        r = world["client"].post("/v1/load_lora_adapter", json={"lora_name": f"probe{i}", "lora_path": bad})
        error = assert_openai_error(r)
        assert CANARY not in r.text, (bad, r.text)
        assert error["code"] in ("path_not_allowed", "adapter_not_found"), (bad, error)
    assert list(full_server.manager.names()) == names  # nothing was loaded
    assert snapshot(root, skip=(full_server.data_dir,)) == world["before"]


def test_adapter_names(world, full_server):
    """A name is a label, never a path: one that climbs (a '..' segment) is refused, and whatever
    name is accepted, the adapter comes from the lora_path inside the adapters dir."""
    client = world["client"]
    for i, bad in enumerate(traversals(world["outside_adapter"], full_server.adapters_dir)):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": bad, "lora_path": "inside"})
        if "../" in bad or bad.startswith(("/", "~", "..")) or "\x00" in bad or "\\" in bad:
            assert_openai_error(r)
            continue
        if r.status_code == 200:
            [info] = [a for a in full_server.manager.list() if a.name == bad]
            assert full_server.adapters_dir.resolve() in Path(info.path).parents, (bad, info.path)
            assert client.post("/v1/unload_lora_adapter", json={"lora_name": bad}).status_code == 200
        else:
            assert_openai_error(r)
    assert_openai_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "../inside-ok"}), 404)
    assert snapshot(world["root"], skip=(full_server.data_dir,)) == world["before"]


def test_symlink_out_of_the_adapters_dir(world, full_server):
    link = full_server.adapters_dir / "escape"
    link.symlink_to(world["outside_adapter"], target_is_directory=True)
    try:
        r = world["client"].post("/v1/load_lora_adapter", json={"lora_name": "esc", "lora_path": "escape"})
        assert assert_openai_error(r)["code"] == "path_not_allowed"
    finally:
        link.unlink()


def test_a_file_linked_out_of_an_adapter_dir(world, full_server):
    """The directory lies inside the adapters dir, its weights file is a link to an adapter outside."""
    half = full_server.adapters_dir / "half-linked"
    half.mkdir()
    shutil.copy(world["outside_adapter"] / "adapter_config.json", half / "adapter_config.json")
    (half / "adapters.safetensors").symlink_to(world["outside_adapter"] / "adapters.safetensors")
    names = list(full_server.manager.names())
    try:
        r = world["client"].post("/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": "half-linked"})
        error = assert_openai_error(r)
        assert error["code"] == "path_not_allowed", error
        assert "adapters.safetensors" in error["message"] and str(world["outside_adapter"]) not in r.text
        assert list(full_server.manager.names()) == names
    finally:
        shutil.rmtree(half)


def test_answers_hold_no_server_paths(world, full_server):
    """Adapter loads, listings and their errors name what the client sent, never where the server
    keeps it (the same goes for run-time model loads: test_admin_access.py)."""
    client, root = world["client"], str(full_server.root.resolve())
    broken = full_server.adapters_dir / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    try:
        answers = [client.post("/v1/load_lora_adapter", json={"lora_name": "paths-ok", "lora_path": "inside"})]
        assert answers[0].status_code == 200, answers[0].text
        answers += [client.get("/v1/models"), client.get("/v1/models/paths-ok"), client.get("/v1/admin/adapters")]
        for lora_path, code in (("broken", "adapter_invalid"), ("missing", "adapter_not_found"),
                                (str(full_server.adapters_dir / "missing"), "adapter_not_found"),
                                (str(world["outside_adapter"]), "path_not_allowed")):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": lora_path})
            assert assert_openai_error(r)["code"] == code, (lora_path, r.text)
            answers.append(r)
        for r in answers:
            assert root not in r.text and str(full_server.root) not in r.text, r.text
        assert {m["id"]: m["root"] for m in answers[1].json()["data"]}["paths-ok"] == "inside"
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "paths-ok"}).status_code == 200
    finally:
        shutil.rmtree(broken)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_model_names(world, full_server, route):
    for bad in traversals(world["root"] / "secret.txt", full_server.root) + [str(full_server.adapters_dir / "inside")]:
        body = {"model": bad, "max_tokens": 1}
        body |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"}
        r = world["client"].post(route, json=body)
        error = assert_openai_error(r)
        assert error["code"] in ("model_not_found", "invalid_request"), (bad, error)
        assert CANARY not in r.text


def encoded_ids(target_name: str) -> list[str]:
    """Path-parameter spellings (already URL-level: sent raw)."""
    return [f"..%2F{target_name}", f"%2e%2e%2f{target_name}", f"%2E%2E%2F%2E%2E%2F{target_name}",
            f"..%252F{target_name}", f"%252e%252e%252f{target_name}", f"file-..%2F..%2F{target_name}",
            "%2Fetc%2Fpasswd", f"..%5C{target_name}", f"{target_name}%00", "..", "%2e%2e", ".",
            f"../{target_name}", f"../../{target_name}", f"..%2F..%2Fsecret.txt"]


@pytest.mark.parametrize("method,template", [
    ("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}"),
    ("GET", "/v1/fine_tuning/jobs/{}"), ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
    ("GET", "/v1/fine_tuning/jobs/{}/events"), ("GET", "/v1/fine_tuning/jobs/{}/checkpoints"),
    ("GET", "/v1/fine-tunes/{}"), ("GET", "/v1/models/{}"),
])
def test_file_and_job_ids_in_paths(world, full_server, method, template):
    for bad in encoded_ids("parallm.db"):
        status, body = raw_request(full_server.url, method, template.format(bad))
        check_refused(status, body)
    assert world["db"].exists() and (world["root"] / "secret.txt").read_text() == CANARY
    # the real file and job are still there and intact
    assert world["client"].get(f"/v1/files/{world['file_id']}").status_code == 200
    assert world["client"].get(f"/v1/fine_tuning/jobs/{world['job_id']}").status_code == 200
    assert snapshot(world["root"], skip=(full_server.data_dir,)) == world["before"]


def test_file_and_job_ids_in_bodies(world, full_server):
    client = world["client"]
    for bad in traversals(world["db"], full_server.data_dir) + ["../parallm.db", "files/../parallm.db"]:
        for body in ({"model": MODEL, "training_file": bad},
                     {"model": MODEL, "training_file": world["file_id"], "validation_file": bad},
                     {"model": bad, "training_file": world["file_id"]},
                     {"model": MODEL, "training_file": world["file_id"], "suffix": bad}):
            r = client.post("/v1/fine_tuning/jobs", json=body)
            check_refused(r.status_code, r.content)
            assert_openai_error(r)
    assert snapshot(world["root"], skip=(full_server.data_dir,)) == world["before"]


def test_upload_filenames_do_not_place_files(world, full_server):
    files_dir = full_server.data_dir / "files"
    before_names = {p.name for p in files_dir.iterdir()}
    rows = b'{"text": "x"}\n'
    for bad in ["../../escaped.jsonl", "/tmp/escaped-abs.jsonl", "..%2F..%2Fescaped.jsonl", "a/../../escaped.jsonl"]:
        r = world["client"].post("/v1/files", files={"file": (bad, io.BytesIO(rows))}, data={"purpose": "fine-tune"})
        # accepted as metadata (the stored name is the generated id) or refused; never used as a path
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert "/" not in r.json()["id"] and ".." not in r.json()["id"]
    new = {p.name for p in files_dir.iterdir()} - before_names
    assert all(name.startswith("file-") for name in new), new
    assert not Path("/tmp/escaped-abs.jsonl").exists()
    assert snapshot(world["root"], skip=(full_server.data_dir,)) == world["before"]
    assert not list(full_server.data_dir.parent.rglob("escaped*"))
