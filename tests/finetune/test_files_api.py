"""/v1/files through the real openai client against a live uvicorn server."""
import errno
import io

import httpx
import openai
import pytest

from ft_support import open_fine_tuning, LiveServer, build_app, chat_rows
from parallm.finetune import FineTuning
from parallm.finetune.files import FileStore


@pytest.fixture
def served(tmp_path):
    ft = open_fine_tuning(tmp_path / "data", base_models={}, max_upload_bytes=4096)  # runner not started
    with LiveServer(build_app(ft)) as server:
        yield ft, openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    ft.shutdown()


def visible_files(ft):
    return sorted(p.name for p in ft.files.dir.iterdir())


def test_upload_list_retrieve_content_delete(served):
    ft, client = served
    data = chat_rows(3)
    f = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.filename == "train.jsonl"
    assert f.purpose == "fine-tune"
    assert [x.id for x in client.files.list().data] == [f.id]
    assert client.files.retrieve(f.id).bytes == len(data)
    assert client.files.content(f.id).content == data
    assert client.files.delete(f.id).deleted is True
    assert client.files.list().data == []
    assert visible_files(ft) == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_unknown_and_hostile_ids_are_404(served):
    _, client = served
    for bad in ("file-doesnotexist", "file-000000000000000000000000", "file-..%2F..%2Fparallm.db"):
        with pytest.raises(openai.NotFoundError) as info:
            client.files.retrieve(bad)
        assert info.value.body["code"] == "not_found", bad
    for raw in ("file-%2e%2e%2fparallm.db", "..%2Fparallm.db"):  # past the client's own path checks
        r = httpx.get(f"{client.base_url}files/{raw}/content")
        assert r.status_code == 404 and b"SQLite" not in r.content  # unrouted or unknown, never a file
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.files.delete("file-000000000000000000000000")


def test_malformed_jsonl_is_400_with_line_numbers_and_not_kept(served):
    ft, client = served
    data = chat_rows(2) + b'{"messages": [{"role": "user", "content": "x"}]}\n' + b"{oops\n"
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="fine-tune")
    err = info.value.body
    assert err["code"] == "invalid_file" and err["param"] == "file"
    assert "line 3" in err["message"] and "line 4" in err["message"]
    assert visible_files(ft) == [] and client.files.list().data == []


def test_too_large_upload_leaves_nothing(served):
    ft, client = served
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", io.BytesIO(chat_rows(100))), purpose="fine-tune")
    assert info.value.status_code == 413
    assert visible_files(ft) == [] and client.files.list().data == []


def test_disk_full_during_write_leaves_nothing(served, monkeypatch):
    ft, client = served
    written = []

    def write_then_fail(self, out, chunk):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        out.write(chunk)
        written.append(len(chunk))

    monkeypatch.setattr(FileStore, "_write_chunk", write_then_fail)
    monkeypatch.setattr("parallm.finetune.files.CHUNK_BYTES", 64)
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("t.jsonl", io.BytesIO(chat_rows(3))), purpose="fine-tune")
    assert info.value.status_code == 507 and "disk is full" in info.value.body["message"]
    assert written, "the first chunk should have been written before the failure"
    assert visible_files(ft) == [] and client.files.list().data == []


def test_unknown_purpose_is_400(served):
    _, client = served
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("t.jsonl", io.BytesIO(chat_rows(1))), purpose="nonsense")
    assert info.value.body["param"] == "purpose"
