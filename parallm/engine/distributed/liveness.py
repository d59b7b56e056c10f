"""LivenessLink: one idle TCP connection between rank 0 and each other rank, carrying no data
(but a failing rank's one-line reason), so that a rank notices at once when a peer *process* dies.

Why: when a peer dies while the ring backend is inside the model's all-reduces (a busy step), MLX
0.32's ring does not raise to the waiting rank: the step just never finishes (measured: rank 0
waited for the 60 s watchdog timeout). The kernel, though, closes a dead process's sockets at
once, so an EOF on this link is an immediate, certain "that process is gone". Hung-but-alive peers
still need the watchdog's timeout. The step plans and tensors never travel here: all of that stays
on mx.distributed.

Rank 0 listens on an ephemeral port; the port goes to the other ranks through one all_sum; each
connects to rank 0's address (taken from the launcher's environment: the ring hostfile,
NCCL_HOST_IP, or the JACCL coordinator). If the link cannot be set up, serving goes on without it.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

log = logging.getLogger("parallm.distributed")


def leader_host() -> str:
    """Rank 0's IP as the launcher described it (127.0.0.1 for a local job)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile):
        try:
            with open(hostfile) as f:
                hosts = json.load(f)
            return str(hosts[0][0]).rsplit(":", 1)[0]
        except (OSError, ValueError, IndexError, KeyError, TypeError):
            pass
    for var in ("NCCL_HOST_IP", "MLX_JACCL_COORDINATOR"):
        if os.environ.get(var):
            return os.environ[var].rsplit(":", 1)[0] if var == "MLX_JACCL_COORDINATOR" else os.environ[var]
    return "127.0.0.1"


class LivenessLink:
    def __init__(self, group: "mx.distributed.Group", on_peer_lost: Callable[[str], None],
                 connect_timeout_s: float = 30.0):
        self.rank, self.size = group.rank(), group.size()
        self._group = group
        self._on_peer_lost = on_peer_lost
        self._timeout = connect_timeout_s
        self._peers: dict[socket.socket, str] = {}  # socket -> who is at the other end
        self._thread: Optional[threading.Thread] = None
        self._closing = False  # a clean shutdown is under way: EOFs are expected, not failures

    def start(self) -> bool:
        """Every rank calls this at the same point of startup (it runs one collective). False when
        the link could not be set up (then only the watchdog's timeout detects dead peers)."""
        listener = None
        port = 0
        if self.rank == 0 and self.size > 1:
            try:
                listener = socket.create_server(("", 0), backlog=self.size)
                port = listener.getsockname()[1]
            except OSError as e:
                log.warning("liveness link: cannot listen (%s); relying on the timeout", e)
        shared = mx.distributed.all_sum(mx.array(np.array([port], np.int32)), group=self._group)
        port = int(np.array(shared)[0])
        if port == 0 or self.size == 1:
            return False
        try:
            if self.rank == 0:
                listener.settimeout(self._timeout)
                for _ in range(self.size - 1):
                    conn, addr = listener.accept()
                    conn.settimeout(self._timeout)
                    peer = int.from_bytes(_recv_exactly(conn, 4), "little")  # the peer says its rank
                    self._peers[conn] = f"rank {peer} ({addr[0]})"
                listener.close()
            else:
                conn = socket.create_connection((leader_host(), port), timeout=self._timeout)
                conn.sendall(self.rank.to_bytes(4, "little"))
                self._peers[conn] = "rank 0"
        except OSError as e:
            log.warning("liveness link not set up (%s); relying on the timeout", e)
            return False
        for conn in self._peers:
            conn.settimeout(None)
        self._thread = threading.Thread(target=self._watch, name="parallm-liveness", daemon=True)
        self._thread.start()
        return True

    def expect_close(self) -> None:
        """Rank 0, before sending SHUTDOWN: the other ranks' EOFs from now on are goodbyes."""
        self._closing = True

    def wait_closed(self, timeout_s: float) -> None:
        """Rank 0, after SHUTDOWN: wait until every other rank has closed its end."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def close(self) -> None:
        """Ranks > 0, on SHUTDOWN: close first, so rank 0's exit is never mistaken for a death."""
        self._closing = True
        for s in list(self._peers):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def report(self, reason: str) -> None:
        """Ranks > 0, failing: tell rank 0 why (its /health shows it), then close."""
        self._closing = True
        for s in list(self._peers):
            try:
                s.sendall(reason.encode()[:4000])
            except OSError:
                pass
        self.close()

    def _watch(self) -> None:
        socks = list(self._peers)
        said: dict[socket.socket, bytes] = {}  # a failing peer's last words (see report)
        while socks:
            try:
                readable, _, broken = select.select(socks, [], socks)
            except (OSError, ValueError):  # a socket closed under us by close()
                return
            for s in set(readable) | set(broken):
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data:
                    said[s] = said.get(s, b"") + data
                    continue
                if self._closing:  # EOF during a clean shutdown: a goodbye
                    socks.remove(s)
                    continue
                if said.get(s):
                    self._on_peer_lost(f"{self._peers[s]} failed: {said[s].decode(errors='replace')}")
                else:  # EOF and nothing said: the process at the other end is gone
                    self._on_peer_lost(f"{self._peers[s]} closed its liveness connection: the process "
                                       "died or its host dropped off the network")
                return


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("the peer closed the liveness connection during setup")
        data += chunk
    return data
