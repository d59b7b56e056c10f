"""Run the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

uvicorn alone would close the listening socket at once (new clients get connection refused, not
503) and sse-starlette would cut every stream on its should_exit. So the first signal only starts
a drain: new /v1 requests get 503, the engine refuses new work and lets running requests finish
for up to drain_timeout (then aborts them), and once the in-flight responses are done we set
uvicorn's should_exit. A second signal forces the exit.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import uvicorn
from fastapi import FastAPI

from parallm.server.admission import Admission
from parallm.server.config import ServerSettings
from parallm.server.connections import (ConnectionLimits, Connections, connection_cap, protocol_class,
                                        raise_file_limit)

log = logging.getLogger("parallm.server")

# After the engine's drain deadline, aborted requests still need a moment to send their last chunk.
_AFTER_ABORT_GRACE_S = 5.0
# How often the server asks the engine whether it can still serve, and how long it keeps answering
# (503 engine_dead, /health 503 with the reason) after it cannot, before exiting.
ENGINE_HEALTH_POLL_S = 0.5
ENGINE_DEATH_GRACE_S = 5.0


async def drain(app: FastAPI, drain_timeout: float) -> bool:
    """Refuse new requests, let those in flight finish; True when all finished in time."""
    admission: Admission = app.state.admission
    admission.draining = True
    log.info("draining: %d requests in flight, up to %.1fs", admission.in_flight, drain_timeout)
    engine_done = asyncio.ensure_future(app.state.engine.shutdown(drain_timeout=drain_timeout))
    finished = await admission.wait_idle(drain_timeout)
    await engine_done  # aborts whatever is still running at the deadline
    if not finished:
        await admission.wait_idle(_AFTER_ABORT_GRACE_S)
    log.info("drained (%s)", "all requests finished" if finished else "the rest were aborted")
    return finished


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float,
                 exit_on_engine_death: bool = False):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.exit_on_engine_death = exit_on_engine_death
        self.engine_failure: Optional[str] = None  # why the server exited on its own, if it did
        self._drain_task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        log.info("event loop: %s.%s", type(self._loop).__module__, type(self._loop).__name__)
        watcher = asyncio.ensure_future(self._exit_when_engine_dies()) if self.exit_on_engine_death else None
        try:
            await super().serve(sockets)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _exit_when_engine_dies(self) -> None:
        """A dead engine cannot come back: keep answering 503s for a grace period, then exit so
        that the supervisor (launchd KeepAlive, systemd Restart=) starts a fresh server."""
        health_error = self.app.state.engine.health_error
        while not self.should_exit:
            await asyncio.sleep(ENGINE_HEALTH_POLL_S)
            reason = health_error()
            if reason:
                log.error("%s; exiting in %.0f s (--exit-on-engine-death)", reason, ENGINE_DEATH_GRACE_S)
                await asyncio.sleep(ENGINE_DEATH_GRACE_S)
                self.engine_failure = reason
                self.should_exit = True
                return

    def handle_exit(self, sig, frame) -> None:  # called from the signal handler
        if self._drain_task is not None or self._loop is None:
            # Second signal (or no loop yet): stop now. Not recorded in _captured_signals, so
            # uvicorn does not re-raise it after serve() and the exit status stays 0.
            self.should_exit = True
            self.force_exit = self._drain_task is not None
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.app, self.drain_timeout)
        finally:
            self.should_exit = True


def run_server(app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str = "info",
               exit_on_engine_death: bool = False, limits: Optional[ConnectionLimits] = None) -> Optional[str]:
    """Serve until told to stop. Returns why the server stopped on its own (a dead engine, with
    exit_on_engine_death), or None after a normal stop. `limits`: what a connection may cost
    (parallm.server.connections); None takes ServerSettings' defaults."""
    limits = limits or ConnectionLimits.from_settings(ServerSettings())
    # After the model is loaded: importing mlx_lm.utils set the limit to (2048, 4096).
    file_limit = raise_file_limit()
    connections = Connections(limits, connection_cap(limits.max_connections, file_limit))
    log.info("connections: at most %d (open-files limit %s), header timeout %.3g s, keep-alive %.3g s, "
             "stream stall timeout %s", connections.cap, file_limit, limits.header_timeout,
             limits.keep_alive_timeout, f"{limits.stream_stall_timeout:.3g} s" if limits.stream_stall_timeout
             else "off")
    # log_config=None / access_log=False: logging_setup.configure_logging owns the handlers, and
    # our access log (with request id, route and tokens) replaces uvicorn's.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            log_config=None, access_log=False,
                            timeout_graceful_shutdown=_AFTER_ABORT_GRACE_S, backlog=2048,
                            http=protocol_class(connections), timeout_keep_alive=limits.keep_alive_timeout,
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            ws="none")  # no websocket routes: an upgrade must not take a connection out of the count
    server = DrainingServer(config, app, drain_timeout, exit_on_engine_death)
    server.run()
    return server.engine_failure
