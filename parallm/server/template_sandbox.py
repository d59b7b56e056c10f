"""Chat templates sent by clients, rendered where they cannot hurt the server.

A Jinja template is a program: a loop can run for minutes and `"a" * 10**9` takes gigabytes. So a
client's template (allowed only with --allow-client-chat-template) never runs in the server
process. A few helper processes ("zygotes": `python -m parallm.server.template_sandbox`, holding
only jinja2, no threads, no MLX) each fork one short-lived child per render. The server itself is
never forked (it holds MLX and threads), and multiprocessing is not used (its children re-import
the parent's __main__). Each child renders with:
- jinja2's ImmutableSandboxedEnvironment, set up as transformers sets up model templates;
- a wall-time limit (RENDER_TIMEOUT_S; the zygote kills the child) and an RLIMIT_CPU;
- an address-space limit (RLIMIT_AS, MAX_MEMORY_BYTES), so a memory bomb ends in MemoryError
  (macOS does not enforce RLIMIT_AS: there the time limits bound it);
- an output limit (MAX_OUTPUT_CHARS), checked while the template writes.
Any of these costs only that request: a 400 that says which limit was hit. Up to MAX_CONCURRENT
renders run at once, beside (never on) the prompt thread that renders the models' own templates.
Jobs and results cross the pipes as JSON, never pickle: a child is untrusted.
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Optional

from parallm.engine.errors import InvalidRequest

RENDER_TIMEOUT_S = 2.0
MAX_OUTPUT_CHARS = 1 << 20
MAX_MEMORY_BYTES = 512 << 20
MAX_CONCURRENT = 4
CHILD_NICE = 10  # a looping template competes with the engine for the CPU as little as it can
ZYGOTE_START_S = 30.0  # a zygote's first answer may wait for its interpreter to start


class ClientTemplateRefused(InvalidRequest):
    code = "chat_template_not_allowed"

    def __init__(self):
        super().__init__(
            "This server does not run chat templates sent by clients (chat_template, or chat_template_kwargs."
            "chat_template); it uses the model's own. The operator can allow them with "
            "--allow-client-chat-template (they then render in a sandbox with time, memory and size limits).",
            param="chat_template")


class TemplateFailed(InvalidRequest):
    code = "chat_template_error"

    def __init__(self, why: str):
        super().__init__(f"The chat template sent with the request could not be rendered: {why}",
                         param="chat_template")


class _OutputTooLarge(Exception):
    pass


def render(template: str, context: dict, max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """Render `template` in jinja2's immutable sandbox, with the globals and filters transformers gives
    model templates (raise_exception, strftime_now, a tojson that keeps non-ASCII). In this process:
    call it only where a runaway template can be killed (a sandbox child)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    pieces, size = [], 0
    for piece in env.from_string(template).generate(**context):
        size += len(piece)
        if size > max_chars:
            raise _OutputTooLarge()
        pieces.append(piece)
    return "".join(pieces)


# ---- framing: a 8-byte length, then that many bytes of JSON -------------------------------------

def _write_frame(fd: int, obj) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int, deadline: Optional[float]) -> Optional[bytes]:
    """n bytes from fd, or None at EOF or once `deadline` (time.monotonic) has passed."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: Optional[float] = None):
    head = _read_exactly(fd, 8, deadline)
    body = _read_exactly(fd, int.from_bytes(head, "big"), deadline) if head is not None else None
    return None if body is None else json.loads(body)


# ---- the zygote and its children (their own processes) ------------------------------------------

def _child(out: int, job: dict, zygote_fds: tuple[int, int]) -> None:
    """A forked child of the zygote: set the limits, render, write one frame, exit."""
    for fd in zygote_fds:  # the zygote's own pipes are none of the template's business
        os.close(fd)
    max_chars, max_memory, timeout = job["max_chars"], job["max_memory"], job["timeout"]
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        os.nice(CHILD_NICE)
    except (ImportError, ValueError, OSError):  # not enforceable here: the zygote's timeout still is
        pass
    try:
        result = ["ok", render(job["template"], job["context"], max_chars)]
    except MemoryError:
        result = ["error", f"it used more than {max_memory >> 20} MB of memory"]
    except _OutputTooLarge:
        result = ["error", f"its output grew past {max_chars} characters"]
    except RecursionError:
        result = ["error", "it recursed too deeply"]
    except Exception as e:  # syntax errors, raise_exception, sandbox violations: the template's own fault
        result = ["error", f"{type(e).__name__}: {e}"]
    try:
        _write_frame(out, result)
    finally:
        os._exit(0)


def _zygote_main() -> None:
    """Serve render jobs from stdin, one at a time, each in a forked child; answer on stdout."""
    import jinja2.sandbox  # noqa: F401  imported once here, so each fork starts with it

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the server's to handle
    stdin, stdout = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not break the framing
    while (job := _read_frame(stdin)) is not None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(w, job, (stdin, stdout))
        os.close(w)
        result = _read_frame(r, time.monotonic() + job["timeout"])
        if result is None:
            os.kill(pid, signal.SIGKILL)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if result is None:
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                result = ["error", f"it ran for more than {job['timeout']:g} s"]
            else:  # killed by the kernel (RLIMIT_CPU, out of memory) before it could answer
                result = ["error", f"its process died ({_exit_reason(status)}); it probably went past the "
                                   f"{job['max_memory'] >> 20} MB memory or CPU time limit"]
        _write_frame(stdout, result)


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


# ---- the server's side ----------------------------------------------------------------------------

class _Zygote:
    def __init__(self):
        package_root = str(Path(__file__).resolve().parents[2])  # this checkout's parallm, installed or not
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        # no BLAS preloaded (parallm/__init__.py): a zygote forks, and needs no threads and no maths
        env = dict(os.environ, PYTHONPATH=path, PARALLM_BLAS="none")
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, close_fds=True)
        self.fresh = True

    def ask(self, job: dict, timeout: float):
        _write_frame(self.proc.stdin.fileno(), job)
        margin = ZYGOTE_START_S if self.fresh else 5.0  # the zygote enforces `timeout` itself
        reply = _read_frame(self.proc.stdout.fileno(), time.monotonic() + timeout + margin)
        self.fresh = False
        return reply

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


class TemplateSandbox:
    def __init__(self, timeout: float = RENDER_TIMEOUT_S, max_chars: int = MAX_OUTPUT_CHARS,
                 max_memory: int = MAX_MEMORY_BYTES, concurrency: int = MAX_CONCURRENT):
        self.timeout, self.max_chars, self.max_memory = timeout, max_chars, max_memory
        # one thread waits on each render; as many zygotes as threads are ever started
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="parallm-template-sandbox")
        self._idle: list[_Zygote] = []
        self._lock = threading.Lock()

    async def render(self, template: str, context: dict) -> str:
        """The rendered text, or TemplateFailed (a 400) naming the limit or error that stopped it."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._render, template, context)

    def _render(self, template: str, context: dict) -> str:
        with self._lock:
            zygote = self._idle.pop() if self._idle else None
        job = {"template": template, "context": context, "timeout": self.timeout, "max_chars": self.max_chars,
               "max_memory": self.max_memory}
        try:
            zygote = zygote or _Zygote()
            reply = zygote.ask(job, self.timeout)
        except (OSError, ValueError):
            reply = None
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], str)):  # never reused
            if zygote is not None:
                zygote.kill()
            raise TemplateFailed("the template sandbox did not answer")
        with self._lock:
            self._idle.append(zygote)
        status, value = reply
        if status != "ok":
            raise TemplateFailed(value)
        return value

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for zygote in idle:
            zygote.kill()


if __name__ == "__main__":
    _zygote_main()
