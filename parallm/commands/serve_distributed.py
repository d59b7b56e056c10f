"""`parallm serve --distributed`: tensor-parallel serving under mlx.launch.

Every rank runs this same command. Rank 0 serves HTTP and schedules; the other ranks follow its
step plans (parallm/engine/distributed/lockstep.py). Startup on every rank:
1. mx.distributed.init(backend) -> the group (mlx.launch set up MLX_RANK / MLX_HOSTFILE etc.);
2. load the model; digest config + weights + engine settings; shard it (model.shard(group));
   load the startup adapters (`--adapter NAME=PATH`, the same on every rank: same slots, same keys)
   into the sharded layers, each rank keeping its slice, and digest them;
3. all-gather the digests: any rank that differs from rank 0 makes every rank exit non-zero;
4. rank 0: HTTP server + LeaderEngine; ranks > 0: Follower loop until rank 0's SHUTDOWN plan.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Optional

from parallm.engine.distributed.group_watchdog import EXIT_GROUP_FAILED, GroupFailure, GroupWatchdog

log = logging.getLogger("parallm.distributed")

RANK0_EXIT_GRACE_S = 5.0  # rank 0 keeps answering /health (503 + reason) this long after a failure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed (tensor parallel, run under mlx.launch)")
    group.add_argument("--distributed", action="store_true",
                       help="shard the model across the ranks of an mlx.launch job; rank 0 serves HTTP")
    group.add_argument("--distributed-backend", default="any",
                       help="mx.distributed backend: any | ring | mpi | nccl | jaccl (default any: what mlx.launch set up)")
    group.add_argument("--distributed-timeout", type=float, default=60.0,
                       help="seconds a step or collective may block before the group is declared failed (default 60)")
    group.add_argument("--distributed-heartbeat", type=float, default=0.1,
                       help="seconds between rank 0's heartbeat plans while idle; the other ranks sleep 80%% "
                       "of it (less idle CPU, up to that much added latency after an idle spell; default 0.1)")
    group.add_argument("--distributed-verify-every", type=int, default=32,
                       help="every N steps all ranks compare what they sampled; 0 turns it off (default 32)")


def _tag_log_lines_with_rank(rank: int, size: int) -> None:
    """Prefix every parallm log line with "[rank r/n]" (the ranks' logs often share one terminal).
    A filter on the handlers configure_logging installed, so text and JSON formats both keep it."""
    prefix = f"[rank {rank}/{size}] "

    def tag(record: logging.LogRecord) -> bool:
        if not getattr(record, "_parallm_rank_tagged", False):
            record.msg, record._parallm_rank_tagged = prefix + str(record.msg), True
        return True

    for name in ("parallm", ""):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(tag)


def _make_async_engine(loaded, config, leader, watchdog):
    """Rank 0's EngineClient: the AsyncEngine plus health_error() for /health."""
    from parallm.engine.async_engine import AsyncEngine

    class _DistributedAsyncEngine(AsyncEngine):
        def fail_group(self, reason: str) -> None:
            """The group failed (any thread): refuse new requests and end every open stream with
            EngineDead now, rather than when the stuck worker comes back (it may never)."""
            if self._dead is None:
                self._dead = GroupFailure(reason)
            self._fail_all(self._dead)

        def health_error(self) -> Optional[str]:
            """Why /health must say unhealthy: the group failed or the engine worker died."""
            return watchdog.failure or super().health_error()

    return _DistributedAsyncEngine(loaded, config, engine=leader)


def serve_distributed(args: argparse.Namespace, settings) -> int:
    import mlx.core as mx

    from parallm.engine.adapter_manager import build_adapter_manager
    from parallm.engine.distributed.lockstep import (STARTUP_PARTS, Follower, LeaderEngine, adapters_digest, shard_model,
                                            startup_digests)
    from parallm.engine.errors import EngineError
    from parallm.engine.engine import Engine, EngineConfig
    from parallm.engine.distributed.liveness import LivenessLink
    from parallm.engine.distributed.plan_channel import PlanChannel
    from parallm.models import load
    from parallm.server.app import create_app  # noqa: F401 - imported before the group waits on us
    from parallm.commands.serve import adapter_specs, engine_config

    try:
        group = mx.distributed.init(strict=True, backend=args.distributed_backend)
    except Exception as e:  # noqa: BLE001 - the platform's message plus how to fix it
        print(f"parallm serve --distributed: cannot join a distributed group ({e}). Start every rank with "
              "mlx.launch, e.g. `mlx.launch -n 2 --backend ring -- parallm serve --distributed ...`",
              file=sys.stderr)
        return 2
    rank, size = group.rank(), group.size()
    _tag_log_lines_with_rank(rank, size)
    try:
        loaded = load(settings.model, device=settings.device, name=settings.served_model_name)
        config = engine_config(settings, EngineConfig)
        digests = startup_digests(loaded.model, loaded.config, config)
        shard_model(loaded.model, loaded.config, group)
    except Exception as e:  # noqa: BLE001 - a clear line and a non-zero exit on every rank
        print(f"parallm serve --distributed [rank {rank}]: cannot load and shard {settings.model or '(default)'}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:  # after sharding: the adapter layers wrap the sharded linears and keep this rank's slice
        adapters = build_adapter_manager(loaded.name, loaded.model, adapters_dir=settings.adapters_dir,
                                         startup=adapter_specs(settings))
        digests.append(adapters_digest(adapters))
    except EngineError as e:
        print(f"parallm serve --distributed [rank {rank}]: cannot load adapter: {e.message}", file=sys.stderr)
        return 1
    watchdog = GroupWatchdog(rank, args.distributed_timeout, RANK0_EXIT_GRACE_S if rank == 0 else 0.0)
    watchdog.start()
    channel = PlanChannel(group, watchdog)
    try:
        channel.check_agreement(digests, STARTUP_PARTS, "the startup check")
    except GroupFailure as e:
        print(f"parallm serve --distributed [rank {rank}]: {e}. Start every rank with the same model files, "
              "config and engine settings.", file=sys.stderr)
        return EXIT_GROUP_FAILED
    link = LivenessLink(group, lambda reason: watchdog.fail(f"rank {rank}: {reason}"))
    linked = link.start()
    log.info("rank %d/%d: model %s sharded; startup check passed; liveness link %s", rank, size, loaded.name,
             "up" if linked else "off (dead peers are found by the timeout only)")
    if rank == 0:
        leader = LeaderEngine(loaded, config, channel=channel, watchdog=watchdog,
                              heartbeat_s=args.distributed_heartbeat, verify_every=args.distributed_verify_every,
                              adapters=adapters)
        engine = _make_async_engine(loaded, config, leader, watchdog)
        watchdog.on_fail = engine.fail_group  # end every stream now, even if the worker is stuck
        return _serve_rank0(engine, leader, watchdog, link, settings)
    return _follow(Follower(Engine(loaded, config, adapters=adapters), channel, watchdog), watchdog, link, settings)


def _serve_rank0(engine, leader, watchdog: GroupWatchdog, link, settings) -> int:
    from parallm.server.app import create_app
    from parallm.server.http_server import ConnectionLimits, run_server

    # Run-time adapter loads (--adapters-dir) go through rank 0's AdapterManager; the LeaderRunner
    # ships them to the other ranks in the step plan.
    app = create_app(engine, settings)
    log.info("serving %s on http://%s:%d (tensor parallel, %d ranks)", ", ".join(engine.model_names()),
             settings.host, settings.port, leader.channel.size)
    run_server(app, settings.host, settings.port, settings.drain_timeout, settings.log_level,
               limits=ConnectionLimits.from_settings(settings))
    if watchdog.failure or engine.health_error():
        log.error("exiting after a group failure: %s", watchdog.failure or engine.health_error())
        return EXIT_GROUP_FAILED
    link.expect_close()
    try:
        leader.shutdown_followers()
    except GroupFailure as e:
        log.error("could not tell the other ranks to stop: %s", e)
        return EXIT_GROUP_FAILED
    link.wait_closed(5.0)
    watchdog.stop()
    return 0


def _follow(follower, watchdog: GroupWatchdog, link, settings) -> int:
    # A signal reaches every rank (Ctrl-C, or mlx.launch forwarding it). Rank 0 drains and then
    # sends SHUTDOWN, so a follower keeps running the plans; if none comes, it leaves on its own.
    def on_signal(signum, frame):
        log.info("signal %d: waiting for rank 0 to drain and send shutdown", signum)
        timer = threading.Timer(settings.drain_timeout + 15.0, lambda: os._exit(EXIT_GROUP_FAILED))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        follower.run()
    except Exception as e:  # noqa: BLE001 - out of lockstep: say why (here and to rank 0), exit non-zero
        if not isinstance(e, GroupFailure):
            log.exception("rank %d failed", follower.channel.rank)
        reason = str(e) if isinstance(e, GroupFailure) else f"{type(e).__name__}: {e}"
        link.report(reason)
        print(f"parallm serve --distributed [rank {follower.channel.rank}]: {reason}", file=sys.stderr)
        return EXIT_GROUP_FAILED
    link.close()
    watchdog.stop()
    log.info("rank %d: rank 0 sent shutdown after %d steps", follower.channel.rank, follower.steps_run)
    return 0
