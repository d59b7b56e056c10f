"""Pieces of the lockstep protocol, mostly in-process: plan encoding and the channel on a 1-rank
group, prefix-cache LRU replay, the watchdog, the startup digests, shardability; and the startup
check between two real ranks (they exit before serving, so it is quick)."""
from __future__ import annotations

import time

import mlx.core as mx
import pytest

from parallm.engine.distributed.lockstep import (RecordingPrefixCache, _seed_new_rows, check_shardable,
                                        startup_digests)
from parallm.engine.engine import EngineConfig
from parallm.engine.distributed.group_watchdog import GroupFailure, GroupWatchdog
from parallm.engine.distributed.plan_channel import FRAME_BYTES, PlanChannel, digest
from parallm.engine.scheduler import DecodeRow, NewRow, SchedulerOutput
from parallm.engine.distributed.step_plan import PlanKind, StepPlan
from parallm.engine.types import SamplingParams


def _sched(prompt_len: int) -> SchedulerOutput:
    row = NewRow("r/0", 3, list(range(prompt_len)), [], SamplingParams(temperature=0.7), 0, None)
    return SchedulerOutput(freed_slots=[1], new_rows=[row], prefill=[],
                           decode=[DecodeRow("r/0", 3, 42, prompt_len - 1)], num_batched_tokens=1, preempted=[])


def test_plan_round_trips_through_bytes():
    plan = StepPlan(PlanKind.STEP, 7, _sched(10), prefix_touches=[3, 1], verify=True)
    back = StepPlan.decode(plan.encode())
    assert back == plan and back.sched.new_rows[0].params.temperature == 0.7


@pytest.mark.parametrize("prompt_len", [10, 5000])  # one frame; frame + tail
def test_channel_broadcast_on_a_one_rank_group(prompt_len):
    group = mx.distributed.init()  # a singleton group when not launched
    channel = PlanChannel(group)
    plan = StepPlan(PlanKind.STEP, 0, _sched(prompt_len))
    assert (len(plan.encode()) > FRAME_BYTES) == (prompt_len > 1000)
    channel.send_plan(plan)
    assert channel.plans_sent == 1 and channel.bytes_sent == len(plan.encode())
    channel.check_agreement([digest("a"), digest(1)], ["x", "y"], "a test")  # one rank agrees with itself


def test_rows_without_a_seed_get_one_from_rank0_and_seeded_rows_keep_theirs():
    sched = _sched(4)
    seeded = NewRow("s/0", 4, [1], [], SamplingParams(seed=99), 0, None)
    sched.new_rows.append(seeded)
    _seed_new_rows(sched)
    assert isinstance(sched.new_rows[0].params.seed, int)
    assert sched.new_rows[1].params.seed == 99


def _kv(n: int):
    return n, [mx.zeros((1, n, 4)), mx.zeros((1, n, 4))]


def test_replayed_touches_make_another_rank_evict_the_same_prefix_entries():
    # Budget for two 16-token entries: the third store evicts the least recently used one, which
    # depends on rank 0's lookups. The follower never calls match(); it replays the touches.
    nbytes = 2 * 16 * 4 * 4
    leader, follower = RecordingPrefixCache(2 * nbytes, 16), RecordingPrefixCache(2 * nbytes, 16)
    a, b, c = [list(range(i, i + 17)) for i in (0, 100, 200)]
    for cache in (leader, follower):
        cache.store(a, None, *_kv(16))
        cache.store(b, None, *_kv(16))
    assert leader.match(a, None, 16) == 16  # touches a: b is now the oldest
    for entry_id in leader.take_touches():
        follower.touch(entry_id)
    for cache in (leader, follower):
        cache.store(c, None, *_kv(16))
    assert leader.state_digest() == follower.state_digest()
    assert follower.match(a, None, 16) == 16 and follower.match(b, None, 16) == 0
    unsynced = RecordingPrefixCache(2 * nbytes, 16)
    for p in (a, b, c):
        unsynced.store(p, None, *_kv(16))
    assert unsynced.state_digest() != leader.state_digest()  # without the replay they diverge
    with pytest.raises(GroupFailure):
        follower.touch(12345)


def test_watchdog_fails_a_stuck_collective_and_exits():
    exits = []
    dog = GroupWatchdog(1, timeout_s=0.3, exit=exits.append, poll_s=0.05)
    dog.start()
    dog.enter("step 5")
    dog.enter("waiting for a plan")  # nested: the outer bracket's start time counts
    dog.leave()
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [3]
    assert "no progress" in dog.failure and "step 5" in dog.failure


def test_watchdog_keeps_quiet_while_collectives_finish_in_time():
    exits = []
    dog = GroupWatchdog(0, timeout_s=0.3, exit=exits.append, poll_s=0.05)
    dog.start()
    for _ in range(10):
        dog.enter("step")
        time.sleep(0.05)
        dog.leave()
    time.sleep(0.4)  # idle (no bracket open) is not a hang
    dog.stop()
    assert exits == [] and dog.failure is None


def test_startup_digests_tell_weights_config_and_settings_apart(tiny_model_dir):
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    config = {"model_type": "llama", "num_attention_heads": 4}
    base = startup_digests(model, config, EngineConfig())
    assert startup_digests(model, config, EngineConfig()) == base
    other_settings = startup_digests(model, config, EngineConfig(max_num_seqs=8))
    assert other_settings[2] != base[2] and other_settings[:2] == base[:2] and other_settings[3] == base[3]
    assert startup_digests(model, {**config, "num_attention_heads": 8}, EngineConfig())[0] != base[0]
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = layer.weight + 1.0
    changed = startup_digests(model, config, EngineConfig())
    assert changed[1] != base[1] and changed[0] == base[0] and changed[2] == base[2]


def test_check_shardable_names_what_does_not_divide():
    class Shardable:
        def shard(self, group):
            pass

    check_shardable(Shardable(), {"num_attention_heads": 4, "num_key_value_heads": 2}, 2)
    with pytest.raises(ValueError, match="num_attention_heads=9, num_key_value_heads=3"):
        check_shardable(Shardable(), {"num_attention_heads": 9, "num_key_value_heads": 3}, 2)
    with pytest.raises(ValueError, match="has no shard"):
        check_shardable(object(), {"model_type": "weird"}, 2)


def test_ranks_started_with_different_engine_settings_both_refuse_to_start(tiny_model_dir, tmp_path):
    """Two real ranks (ring on loopback) whose --max-num-seqs differ: the startup check fails on
    both, naming the part that differs, and both exit 3 before serving anything."""
    import json
    import os
    import subprocess
    import sys

    from tests.distributed.cluster import REPO, free_port

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    procs = []
    try:
        for rank, max_seqs in ((0, "64"), (1, "32")):
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), PYTHONPATH=str(REPO))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "parallm", "serve", "--model", str(tiny_model_dir), "--port", str(free_port()),
                 "--distributed", "--distributed-backend", "ring", "--max-num-seqs", max_seqs, "--log-level", "warning"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 3, out[-2000:]
        assert "rank(s) [1] differ from rank 0 in engine settings" in out
