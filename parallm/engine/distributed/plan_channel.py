"""PlanChannel: rank 0 -> all ranks broadcast of step plans, and all-rank agreement checks, on
mx.distributed collectives only (no transport of our own).

Broadcast = all_sum where rank 0 contributes the bytes and every other rank contributes zeros
(all_sum works on every backend: ring, MPI, NCCL, JACCL; send/recv does not reach every rank pair
on all of them). A plan goes out in one fixed-size frame when it fits, the common case (a decode
step of 64 rows pickles to a few KB): the frame's first 4 bytes hold the plan's length, the rest
its first bytes; a longer plan (a step admitting long prompts) sends the remainder in a second
all_sum whose size both sides know from the header. So a step costs one collective, rarely two.

Every collective is bracketed by the GroupWatchdog: a collective that blocks longer than the
timeout (a hung or partitioned peer) fails the group; a lost connection (a dead peer) already
raises RuntimeError from the backend, which we re-raise as GroupFailure with the rank's view.
"""
from __future__ import annotations

import hashlib
import time
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from parallm.engine.distributed.group_watchdog import GroupFailure, GroupWatchdog
from parallm.engine.distributed.step_plan import StepPlan

FRAME_BYTES = 8192
_HEADER = 4  # little-endian uint32 payload length
DIGEST_BYTES = 8


class PlanChannel:
    def __init__(self, group: "mx.distributed.Group", watchdog: Optional[GroupWatchdog] = None):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.watchdog = watchdog
        self.plans_sent = 0
        self.bytes_sent = 0
        self.send_seconds = 0.0  # wall time rank 0 spent in plan broadcasts (waiting for peers included)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ---- broadcast -------------------------------------------------------------------------------
    def send_plan(self, plan: StepPlan) -> None:
        if not self.is_leader:
            raise RuntimeError("only rank 0 sends plans")
        t0 = time.perf_counter()
        data = plan.encode()
        if len(data) >= 1 << 32:
            raise ValueError(f"step plan of {len(data)} bytes is too large to broadcast")
        frame = np.zeros(FRAME_BYTES, np.uint8)
        frame[:_HEADER] = np.frombuffer(len(data).to_bytes(_HEADER, "little"), np.uint8)
        head = data[: FRAME_BYTES - _HEADER]
        frame[_HEADER:_HEADER + len(head)] = np.frombuffer(head, np.uint8)
        self._all_sum(frame, f"sending plan {plan.step}")
        rest = data[len(head):]
        if rest:
            self._all_sum(np.frombuffer(rest, np.uint8), f"sending plan {plan.step} (tail)")
        self.plans_sent += 1
        self.bytes_sent += len(data)
        self.send_seconds += time.perf_counter() - t0

    def receive_plan(self, timeout_s: Optional[float] = None) -> StepPlan:
        if self.is_leader:
            raise RuntimeError("rank 0 does not receive plans")
        frame = self._all_sum(np.zeros(FRAME_BYTES, np.uint8), "waiting for the next plan from rank 0", timeout_s)
        length = int.from_bytes(frame[:_HEADER].tobytes(), "little")
        data = frame[_HEADER:_HEADER + min(length, FRAME_BYTES - _HEADER)].tobytes()
        if length > len(data):
            data += self._all_sum(np.zeros(length - len(data), np.uint8), "receiving a plan tail").tobytes()
        return StepPlan.decode(data)

    # ---- agreement -------------------------------------------------------------------------------
    def gather_digests(self, digests: Sequence[bytes], what: str) -> list[list[bytes]]:
        """All-gather `len(digests)` fixed-size digests; returns [rank][i]."""
        local = np.frombuffer(b"".join(_pad(d) for d in digests), np.uint8)
        out = self._collective(mx.distributed.all_gather, local, what)
        flat = out.reshape(self.size, len(digests), DIGEST_BYTES)
        return [[bytes(flat[r, i]) for i in range(len(digests))] for r in range(self.size)]

    def check_agreement(self, digests: Sequence[bytes], names: Sequence[str], what: str) -> None:
        """Raise GroupFailure naming the parts on which some rank differs from rank 0."""
        table = self.gather_digests(digests, what)
        differs = [(names[i], r) for r in range(1, self.size) for i in range(len(names))
                   if table[r][i] != table[0][i]]
        if differs:
            parts = sorted({name for name, _ in differs})
            ranks = sorted({r for _, r in differs})
            raise GroupFailure(f"{what}: rank(s) {ranks} differ from rank 0 in {', '.join(parts)}")

    # ---- internals -------------------------------------------------------------------------------
    def _all_sum(self, buf: np.ndarray, what: str, timeout_s: Optional[float] = None) -> np.ndarray:
        return self._collective(mx.distributed.all_sum, buf, what, timeout_s)

    def _collective(self, op, buf: np.ndarray, what: str, timeout_s: Optional[float] = None) -> np.ndarray:
        """Run one collective under the watchdog; a transport error becomes a GroupFailure."""
        if self.watchdog:
            self.watchdog.enter(what, timeout_s)
        try:
            out = op(mx.array(buf), group=self.group)
            mx.eval(out)
        except RuntimeError as e:
            raise self._failure(what, e) from e
        finally:
            if self.watchdog:
                self.watchdog.leave()
        return np.array(out, copy=False)

    def _failure(self, what: str, error: BaseException) -> GroupFailure:
        failure = GroupFailure(f"rank {self.rank}/{self.size}: the distributed group failed while {what}: "
                               f"{error} (a peer rank died or its connection dropped)")
        if self.watchdog:
            self.watchdog.fail(str(failure))
        return failure


def digest(*parts: object) -> bytes:
    """A short stable digest of reprs (same value on every rank, unlike Python's salted hash())."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return h.digest()


def _pad(d: bytes) -> bytes:
    if len(d) != DIGEST_BYTES:
        raise ValueError(f"digests are {DIGEST_BYTES} bytes, got {len(d)}")
    return d
