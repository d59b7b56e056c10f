"""PromptWorker: chat templates and tokenization run on threads of their own, not on the loop.

Why not on the event loop, even for a short prompt: a transformers fast tokenizer releases the GIL
inside encode (its Rust batch path). On the loop thread, taking the GIL back then waits until the
engine thread, which holds it while it builds a step's graph, lets go, up to the interpreter's
switch interval (5 ms). Measured: a 128-word prompt took
0.33 ms to encode alone and 5.8 ms beside a thread running Python without pause, and every stream on the loop
waited with it. On a worker thread that wait is the request's own.

Two lanes of one thread each: prompts over LARGE_PROMPT_CHARS (a body of megabytes takes the
tokenizer seconds) have their own, so one of them never holds up everyone else's first token.
One thread per lane keeps the calls few at a time; concurrent encodes on one fast tokenizer are
safe as long as nothing changes its truncation or padding settings (that borrows the Rust object
mutably, and a concurrent call fails with "Already borrowed"), and the server never does.

A chat template sent by a client never runs on either lane: it renders in a sandbox process
(template_sandbox.py), so a template that loops or eats memory holds up only its own request.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from parallm.server.template_sandbox import TemplateSandbox

LARGE_PROMPT_CHARS = 32_768


class PromptWorker:
    def __init__(self) -> None:
        self._small = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parallm-prompts")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parallm-prompts-large")
        self.sandbox = TemplateSandbox()  # starts its helper processes on first use only

    async def run(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the lane for a prompt of `size` characters."""
        pool = self._large if size > LARGE_PROMPT_CHARS else self._small
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def render_client_template(self, template: str, context: dict) -> str:
        """A client's chat template, rendered in the sandbox (TemplateFailed, a 400, if it breaks a limit)."""
        return await self.sandbox.render(template, context)

    def shutdown(self) -> None:
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)
        self.sandbox.shutdown()
