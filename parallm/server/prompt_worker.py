"""PromptWorker: chat templates and tokenization run on one thread of their own, not on the loop.

Why not on the event loop, even for a short prompt: a transformers fast tokenizer releases the GIL
inside encode (its Rust batch path). On the loop thread, taking the GIL back then waits until the
engine thread, which holds it while it builds a step's graph, lets go, up to the interpreter's
switch interval (5 ms). Measured with loadtests/profile_server_path.py: a 128-word prompt took
0.33 ms to encode alone and 5.8 ms beside a busy Python thread, and every stream on the loop
waited with it. On a worker thread that wait is the request's own.

Why one thread: a fast tokenizer used from several threads at once can fail with "Already
borrowed" (the Rust object is borrowed mutably when truncation or padding settings change). One
worker keeps every call serial; at ~0.4 ms a prompt that is ~2,500 prompts a second.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class PromptWorker:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parallm-prompts")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
