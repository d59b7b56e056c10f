"""Faults: SIGTERM in the middle of load, and a disk that fills up during an upload.

(kill -9 of the fine-tuning worker is covered by tests/finetune/test_job_recovery.py: the job
resumes from its last complete checkpoint with no step lost or repeated, fails cleanly with
`worker_died` after max_attempts, and no adapter directory is ever half-written; see
docs/reliability.md for how that was seen to fail.)
"""
from __future__ import annotations

import asyncio
import errno
import io
import json
import signal
import threading
import time

import httpx
import pytest

from .live import MODEL, finish_reasons, serve
from .load import many_streams, stream_body

STREAMS, PLAIN = 8, 4
STREAM_TOKENS, PLAIN_TOKENS = 300, 200


def test_sigterm_during_load_finishes_in_flight_refuses_new_exits_0(tiny_model_dir, tmp_path):
    server = serve(tiny_model_dir, tmp_path, "--max-num-seqs", str(STREAMS + PLAIN), "--drain-timeout", "120")
    results: dict = {}

    async def load():
        async def plain(client, i):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": f"plain {i}",
                                                            "max_tokens": PLAIN_TOKENS, "ignore_eos": True})
            return r.status_code, r.json()
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
            streams = asyncio.ensure_future(many_streams(server.url, [stream_body(STREAM_TOKENS, prompt=f"s{i}")
                                                                      for i in range(STREAMS)], timeout=180))
            plains = await asyncio.gather(*[plain(client, i) for i in range(PLAIN)])
            results["plain"] = plains
            results["streams"] = await streams

    worker = threading.Thread(target=lambda: asyncio.run(load()))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        # all of them inside the server, and the engine running them (its stats lag a step)
        while ((h := server.health(timeout=30))["server"]["in_flight"] < STREAMS + PLAIN
               or h["engine"]["num_running"] == 0):
            assert time.monotonic() < deadline and worker.is_alive(), h
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        # new requests: 503 with an OpenAI error body, never a refused or reset connection
        deadline = time.monotonic() + 15
        while True:
            r = httpx.post(server.url + "/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": "late", "max_tokens": 2})
            if r.status_code == 503:
                break
            assert time.monotonic() < deadline, r.status_code
            time.sleep(0.05)
        assert r.json()["error"]["code"] == "draining" and "retry-after" in r.headers
        in_flight_at_503 = server.health(timeout=30)["server"]["in_flight"]
        assert in_flight_at_503 > 0  # the 503s began while the load was still running
        worker.join(180)
        assert not worker.is_alive()
        for status, body in results["plain"]:
            assert status == 200 and body["usage"]["completion_tokens"] == PLAIN_TOKENS, body
            assert body["choices"][0]["finish_reason"] == "length"
        for o in results["streams"]:
            assert o.complete and o.transport_error is None, (o.status, o.transport_error, o.events[-2:])
            assert finish_reasons(o.events) == ["length"]  # ran to its end, not aborted by the drain
        assert server.proc.wait(60) == 0, server.log()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        worker.join(5)


def chat_rows(n: int) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i} " + "pad " * 50},
                                            {"role": "assistant", "content": "a"}]}) + "\n"
                   for i in range(n)).encode()


def test_disk_full_during_upload_is_a_clean_507_and_leaves_nothing(full_server, monkeypatch):
    """The disk fills after some bytes: the write that hits it is partial, then ENOSPC, as a real
    disk does. Through the whole app (body limit, routes, store): a 507 OpenAI error, no file and
    no temporary left, no record, and the same upload works once there is space again."""
    from parallm.finetune import files as files_module
    from parallm.finetune.files import FileStore

    files_dir = full_server.data_dir / "files"
    before = sorted(p.name for p in files_dir.iterdir())
    space = {"left": 3000}
    real_write = FileStore._write_chunk

    def write_until_full(self, out, chunk):
        if len(chunk) > space["left"]:
            out.write(chunk[:space["left"]])
            out.flush()
            space["left"] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        space["left"] -= len(chunk)
        real_write(self, out, chunk)

    monkeypatch.setattr(FileStore, "_write_chunk", write_until_full)
    monkeypatch.setattr(files_module, "CHUNK_BYTES", 1024)
    data = chat_rows(40)
    assert len(data) > 3 * space["left"]
    with httpx.Client(base_url=full_server.url, timeout=60) as client:
        r = client.post("/v1/files", files={"file": ("train.jsonl", io.BytesIO(data))}, data={"purpose": "fine-tune"})
        assert r.status_code == 507, r.text  # Insufficient Storage: the server's condition, said plainly
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error
        assert error["code"] == "storage_error" and "disk is full" in error["message"], error
        assert space["left"] == 0  # the failure happened part-way, after bytes were written
        assert sorted(p.name for p in files_dir.iterdir()) == before  # no partial file, no temporary
        assert [f["filename"] for f in client.get("/v1/files").json()["data"]].count("train.jsonl") == 0
        monkeypatch.setattr(FileStore, "_write_chunk", real_write)  # space again
        ok = client.post("/v1/files", files={"file": ("train.jsonl", io.BytesIO(data))}, data={"purpose": "fine-tune"})
        assert ok.status_code == 200, ok.text
        assert client.get(f"/v1/files/{ok.json()['id']}/content").content == data
        assert client.get("/health").status_code == 200
