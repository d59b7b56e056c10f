"""Adapter ops as they travel in the step plan: rank 0's AdapterManager queues installs and
uninstalls, the LeaderRunner drains them into the plan (wire form: slot, key, path), and every
rank applies the same ops in the same order. Two managers on two copies of the model in one
process stand for rank 0 and rank 1 (unsharded: the sharded layers are covered by the 2-rank
tests in test_tensor_parallel.py)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from mlx_lm.utils import load_model

from parallm.engine.adapter_manager import AdapterManager
from parallm.models.lora import multi_lora_layers
from tests.adapters.conftest import write_adapter_dir


@pytest.fixture
def pair(tiny_model_dir, tmp_path):
    adapters = tmp_path / "adapters"
    for i, name in enumerate(["x", "y"]):
        write_adapter_dir(tiny_model_dir, adapters / name, seed=i + 1, num_layers=1)
    leader = AdapterManager("tiny", load_model(Path(tiny_model_dir))[0], adapters_dir=adapters)
    leader.apply_on_bind = False
    follower = AdapterManager("tiny", load_model(Path(tiny_model_dir))[0])
    return leader, follower


def ship(leader: AdapterManager, follower: AdapterManager) -> list:
    """What LeaderRunner.launch and Follower.run do with one step's ops."""
    ops = leader.take_pending()
    wire = pickle.loads(pickle.dumps(leader.wire_ops(ops)))  # it travels pickled in the StepPlan
    leader.apply_ops(ops)
    follower.apply_remote(wire)
    return wire


def slots_bound(manager: AdapterManager, rows) -> list:
    manager.bind_rows(rows)
    binding = next(iter(multi_lora_layers(manager._model).values()))._binding
    return binding.slots.tolist() if binding.slots is not None else [0] * len(rows)


def test_followers_apply_the_same_ops_and_bind_the_same_slots(pair):
    leader, follower = pair
    leader.load("x", "x")
    leader.load("y", "y")
    wire = ship(leader, follower)
    assert [(op.kind, op.slot) for op in wire] == [("install", 1), ("install", 2)]
    assert leader.applied_state() == follower.applied_state() != ()
    kx, ky = leader.acquire("x"), leader.acquire("y")
    rows = [ky, None, kx]
    assert slots_bound(leader, rows) == slots_bound(follower, rows) == [2, 0, 1]
    leader.release(kx)
    leader.unload("x")
    leader.load("z", "x")  # reuses slot 1: the uninstall travels before the install
    wire = ship(leader, follower)
    assert [(op.kind, op.slot) for op in wire] == [("uninstall", 1), ("install", 1)]
    assert leader.applied_state() == follower.applied_state()
    assert slots_bound(leader, [kx, ky]) == slots_bound(follower, [kx, ky]) == [0, 2]  # x's old key: no adapter


def test_binding_follows_applied_ops_not_the_control_side(pair):
    """An unload that lands between the drain and the forward must not change rank 0's binding
    for this step (rank 1 has not heard of it yet); it takes effect with the next plan."""
    leader, follower = pair
    leader.load("x", "x")
    ship(leader, follower)
    key = leader.acquire("x")
    leader.release(key)
    assert ship(leader, follower) == []  # this step's plan: no ops
    leader.unload("x")  # control thread, after the drain: x is freed at once (no refs)
    assert slots_bound(leader, [key]) == slots_bound(follower, [key]) == [1]
    ship(leader, follower)  # next plan carries the uninstall
    assert slots_bound(leader, [key]) == slots_bound(follower, [key]) == [0]
    assert leader.applied_state() == follower.applied_state() == ()


def test_a_follower_missing_the_files_raises(pair, tmp_path):
    leader, follower = pair
    leader.load("x", "x")
    ops = leader.take_pending()
    wire = leader.wire_ops(ops)
    (Path(wire[0].path) / "adapters.safetensors").unlink()
    with pytest.raises(Exception, match="missing"):
        follower.apply_remote(wire)
