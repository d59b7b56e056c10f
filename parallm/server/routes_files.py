"""/v1/files: uploads for fine-tuning (OpenAI's shapes). Mount with
`app.include_router(files_router(fine_tuning.files))`."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from parallm.finetune.files import FileStore
from parallm.server.fine_tuning_http import list_page, openai_errors


def files_router(files: FileStore) -> APIRouter:
    router = APIRouter(tags=["files"])

    # Sync endpoints: FastAPI runs them in its thread pool, so disk I/O never blocks the loop.
    @router.post("/v1/files")
    @openai_errors
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...)):
        record = files.save(file.file, filename=file.filename or "upload.jsonl", purpose=purpose)
        return record.as_openai()

    @router.get("/v1/files")
    @openai_errors
    def list_files(purpose: Optional[str] = None, after: Optional[str] = None,
                   limit: int = Query(10000, ge=1, le=10000)):
        page = files.list(purpose=purpose, after=after, limit=limit)  # newest first
        return list_page(page.items, page.has_more)

    @router.get("/v1/files/{file_id}")
    @openai_errors
    def retrieve_file(file_id: str):
        return files.get(file_id).as_openai()

    @router.delete("/v1/files/{file_id}")
    @openai_errors
    def delete_file(file_id: str):
        record = files.delete(file_id)
        return {"id": record.id, "object": "file", "deleted": True}

    @router.get("/v1/files/{file_id}/content")
    @openai_errors
    def file_content(file_id: str):
        record = files.get(file_id)
        media = "application/jsonl" if record.filename.endswith(".jsonl") else "application/octet-stream"
        return StreamingResponse(files.content(file_id), media_type=media)

    return router
