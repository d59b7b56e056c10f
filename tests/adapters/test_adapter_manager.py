"""AdapterManager: load/unload at run time, reference counting, 404 for new requests only, slot
reuse, and every failure leaving the manager unchanged."""
from __future__ import annotations

from pathlib import Path

import json
import os

import mlx.core as mx
import pytest
from mlx_lm.utils import load_model
from mlx_lm.models.cache import make_prompt_cache

from parallm.engine.adapter_manager import AdapterLoadFailed, AdapterManager, AdapterNameInvalid
from parallm.engine.errors import UnknownModel
from parallm.models.lora import multi_lora_layers

from .test_lora import PROMPTS, greedy, reference


@pytest.fixture
def base(tiny_model_dir):
    model, _ = load_model(Path(tiny_model_dir))
    return model


@pytest.fixture
def manager(base, tmp_path):
    (tmp_path / "adapters").mkdir(exist_ok=True)
    return AdapterManager("tiny", base, adapters_dir=tmp_path / "adapters", reserved_names=lambda: ["other-base"])


def test_mixed_rows_through_manager_match_mlx_lm(tiny_model_dir, base, manager, make_adapter):
    x_dir, y_dir = make_adapter("x", seed=1), make_adapter("y", seed=2, dora=True)
    manager.load("x", "x")
    manager.load("y", str(y_dir))  # an absolute path inside the adapters dir is fine
    rows = ["x", None, "y"]
    toks, _ = greedy(base, PROMPTS, before_forward=lambda: manager.bind_rows(rows))
    assert toks[0] == reference(tiny_model_dir, x_dir, PROMPTS[0])[0][0]
    assert toks[1] == reference(tiny_model_dir, None, PROMPTS[1])[0][0]
    assert toks[2] == reference(tiny_model_dir, y_dir, PROMPTS[2])[0][0]
    assert toks[0] != reference(tiny_model_dir, None, PROMPTS[0])[0][0]


def test_unload_while_in_flight(tiny_model_dir, base, manager, make_adapter):
    x_dir = make_adapter("x", seed=1)
    manager.load("x", "x")
    key = manager.acquire("x")  # the engine admitted a request for x
    assert key.startswith("x#")
    cache = make_prompt_cache(base)
    tokens, got = mx.array([PROMPTS[0]]), []
    for step in range(6):
        if step == 2:  # unload in the middle of the request
            manager.unload("x")
            assert not manager.has_adapter("x")
            with pytest.raises(UnknownModel) as e:
                manager.acquire("x")  # a new request
            assert e.value.status == 404
            assert [a.unloading for a in manager.list()] == [True]
        manager.bind_rows([key])
        nxt = mx.argmax(base(tokens, cache=cache)[:, -1, :], axis=-1)
        got.append(nxt.item())
        tokens = nxt[:, None]
    assert got == reference(tiny_model_dir, x_dir, PROMPTS[0])[0][0]  # in-flight kept its adapter
    assert manager.list()[0].active_requests == 1
    manager.release(key)  # last request done -> freed
    assert manager.list() == []
    manager.bind_rows([None])  # the worker applies the uninstall between steps
    assert all(not layer.slots for layer in multi_lora_layers(base).values())
    manager.bind_rows(["x", None])  # a stale row of the finished request: runs without the adapter
    assert manager._binding.slots is None


def test_unload_idle_frees_at_once_and_slot_is_reused(manager, make_adapter):
    make_adapter("x", seed=1), make_adapter("y", seed=2)
    first = manager.load("x", "x")
    manager.unload("x")
    assert manager.list() == [] and not manager.has_adapter("x")
    again = manager.load("y", "y")
    assert again.slot == first.slot
    manager.unload("y")
    again = manager.load("y", "y")  # the same name again: a new key, so caches cannot mix them
    key = manager.acquire("y")
    assert key != "y#2" and key.startswith("y#")
    manager.release("y#2")  # a stale key of the previous load releases nothing
    assert manager.list()[0].active_requests == 1
    manager.release(key)
    manager.bind_rows(["y"])  # uninstall(x) then install(y) in order; y is live in that slot
    layers = multi_lora_layers(manager._model)
    assert all(layer.slots == {again.slot} for layer in layers.values())
    with pytest.raises(UnknownModel) as e:
        manager.unload("x")
    assert "y" in e.value.message  # the error lists what is served


def test_list_metadata(manager, make_adapter):
    make_adapter("x", seed=1, rank=4)
    make_adapter("d", seed=2, rank=8, dora=True, num_layers=1)
    manager.load("x", "x")
    manager.load("d", "d")
    info = {a.name: a for a in manager.list()}
    assert info["x"].parent == "tiny" and info["x"].fine_tune_type == "lora" and info["x"].rank == 4
    assert info["d"].fine_tune_type == "dora" and info["d"].rank == 8 and info["d"].num_layers == 1
    assert 0 < info["d"].memory_bytes and info["x"].memory_bytes > 0
    assert sorted(manager.names()) == ["d", "x"]


# ---------------- failures: each a typed 4xx, manager unchanged ----------------

def _unchanged(manager):
    assert manager.list() == [] and manager.wrapped_layer_count() == 0


def _expect_load_error(manager, name, path, code, status=400):
    with pytest.raises((AdapterLoadFailed, AdapterNameInvalid)) as e:
        manager.load(name, path)
    assert e.value.status == status and e.value.code == code, e.value.message
    manager.apply_pending()
    _unchanged(manager)
    return e.value.message


def test_missing_dir_and_files(manager, make_adapter, tmp_path):
    assert "does not exist" in _expect_load_error(manager, "a", "nope", "adapter_not_found")
    d = make_adapter("nofile", seed=1)
    (d / "adapters.safetensors").unlink()
    assert "adapters.safetensors" in _expect_load_error(manager, "a", "nofile", "adapter_not_found")
    d = make_adapter("noconf", seed=1)
    (d / "adapter_config.json").unlink()
    assert "adapter_config.json" in _expect_load_error(manager, "a", "noconf", "adapter_not_found")


def test_corrupt_files(manager, make_adapter):
    d = make_adapter("badst", seed=1)
    (d / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "safetensors" in _expect_load_error(manager, "a", "badst", "adapter_invalid")
    d = make_adapter("badjson", seed=1)
    (d / "adapter_config.json").write_text("{oops")
    assert "not valid JSON" in _expect_load_error(manager, "a", "badjson", "adapter_invalid")
    d = make_adapter("norank", seed=1)
    conf = json.loads((d / "adapter_config.json").read_text())
    del conf["lora_parameters"]["rank"]
    (d / "adapter_config.json").write_text(json.dumps(conf))
    assert "rank" in _expect_load_error(manager, "a", "norank", "adapter_invalid")


def test_wrong_fine_tune_type(manager, make_adapter):
    for kind in ("full", "qlora-ish"):
        d = make_adapter(kind, seed=1)
        conf = json.loads((d / "adapter_config.json").read_text())
        conf["fine_tune_type"] = kind
        (d / "adapter_config.json").write_text(json.dumps(conf))
        msg = _expect_load_error(manager, "a", kind, "adapter_not_lora")
        assert ("not an adapter" in msg) if kind == "full" else ("lora, dora" in msg)


def test_shape_mismatch(manager, make_adapter):
    d = make_adapter("wide", seed=1)
    tensors = mx.load(str(d / "adapters.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_a"))
    tensors[key] = mx.zeros((tensors[key].shape[0] * 2, tensors[key].shape[1]))  # a wider base model
    mx.save_safetensors(str(d / "adapters.safetensors"), tensors)
    msg = _expect_load_error(manager, "a", "wide", "adapter_shape_mismatch")
    assert key in msg and "(128, 4)" in msg and "(64, 4)" in msg
    # Tensors for a layer the base model does not have (an adapter of a deeper model).
    d = make_adapter("deep", seed=1)
    tensors = mx.load(str(d / "adapters.safetensors"))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    mx.save_safetensors(str(d / "adapters.safetensors"), tensors)
    assert "model.layers.7" in _expect_load_error(manager, "a", "deep", "adapter_shape_mismatch")


@pytest.mark.parametrize("path", ["../x", "x/../../x", "/etc", "%2e%2e/x", "x%2F..%2F..", "", "a\x00b",
                                  "..\\x"])
def test_path_traversal_rejected(manager, make_adapter, path):
    make_adapter("x", seed=1)
    _expect_load_error(manager, "a", path, "path_not_allowed")


def test_symlink_escaping_rejected(manager, make_adapter, tmp_path):
    outside = make_adapter("../outside", seed=1)  # a valid adapter, but outside the adapters dir
    os.symlink(outside, tmp_path / "adapters" / "link")
    assert "outside the adapters directory" in _expect_load_error(manager, "a", "link", "path_not_allowed")
    os.symlink(tmp_path / "adapters" / "link", tmp_path / "adapters" / "link2")
    _expect_load_error(manager, "a", "link2", "path_not_allowed")


def test_runtime_load_needs_adapters_dir(base, make_adapter):
    manager = AdapterManager("tiny", base)
    d = make_adapter("x", seed=1)
    _expect_load_error(manager, "a", str(d), "path_not_allowed")
    assert manager.load("a", str(d), trusted=True).name == "a"  # startup --adapter NAME=PATH


def test_name_errors(manager, make_adapter):
    make_adapter("x", seed=1)
    assert "taken by a served model" in _expect_load_error(manager, "tiny", "x", "name_conflict")
    _expect_load_error(manager, "other-base", "x", "name_conflict")
    _expect_load_error(manager, "bad name", "x", "invalid_adapter_name")
    manager.load("x", "x")
    with pytest.raises(AdapterNameInvalid) as e:
        manager.load("x", "x")
    assert e.value.code == "adapter_already_loaded"
    assert [a.name for a in manager.list()] == ["x"]


def test_unknown_unload_is_404(manager):
    with pytest.raises(UnknownModel) as e:
        manager.unload("ghost")
    assert e.value.status == 404


def test_startup_specs(base, make_adapter, tmp_path):
    from parallm.engine.adapter_manager import AdapterSpec, build_adapter_manager

    d = make_adapter("x", seed=1)
    assert AdapterSpec.parse(f"sql={d}") == AdapterSpec("sql", str(d))
    for bad in ("noequals", "=path", "name="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            AdapterSpec.parse(bad)
    manager = build_adapter_manager("tiny", base, startup=[AdapterSpec("sql", str(d))])
    assert manager.names() == ["sql"] and manager.wrapped_layer_count() > 0
    with pytest.raises(AdapterLoadFailed):  # no adapters dir: no run-time loads
        manager.load("other", str(d))
