"""ModelRegistry: load, list (with adapters' parent/root), LRU eviction of idle models under a
memory budget, busy models kept, name clashes, unknown names."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from parallm.models.registry import ModelRegistry, RegistryError

MiB = 2**20


@dataclass
class FakeMemory:
    weight_bytes: int
    kv_bytes_per_token: int = 1024


@dataclass
class FakeLoaded:
    name: str
    memory: FakeMemory
    context_length: int = 2048
    source: str = ""


@dataclass
class FakeAdapter:
    name: str
    parent: str
    path: str
    created: int = 123
    memory_bytes: int = 4096


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


@dataclass
class Loader:
    sizes: dict[str, int]
    calls: list = field(default_factory=list)

    def __call__(self, spec, *, name=None, **kwargs):
        self.calls.append((spec, name, kwargs))
        if spec not in self.sizes:
            raise FileNotFoundError(spec)
        return FakeLoaded(name or spec.rsplit("/", 1)[-1], FakeMemory(self.sizes[spec]), source=f"/models/{spec}")


def make(budget=None, **sizes):
    evicted = []
    reg = ModelRegistry(Loader({k: v * MiB for k, v in sizes.items()}), memory_budget_bytes=budget * MiB if budget else None,
                        on_evict=lambda n, m: evicted.append(n), clock=Clock())
    return reg, evicted


def test_load_get_list():
    reg, _ = make(a=10, b=20)
    reg.load("a")
    reg.load("b", name="bee", device="cpu")
    assert reg.names() == ["a", "bee"]
    assert reg.get("bee").memory.weight_bytes == 20 * MiB
    assert reg._loader.calls[-1] == ("b", "bee", {"device": "cpu"})
    cards = reg.cards([FakeAdapter("sql", parent="a", path="/adapters/sql")])
    by_id = {c.id: c for c in cards}
    assert [c.id for c in cards] == ["a", "bee", "sql"]
    assert by_id["a"].parent is None and by_id["a"].root == "a" and by_id["a"].kind == "model"
    assert by_id["a"].memory_bytes == 10 * MiB and by_id["a"].context_length == 2048
    sql = by_id["sql"].to_openai()
    assert sql["parent"] == "a" and sql["root"] == "sql" and sql["object"] == "model"
    assert sql["parallm"]["kind"] == "adapter" and sql["parallm"]["context_length"] == 2048


def test_unknown_and_duplicate_names():
    reg, _ = make(a=10)
    reg.load("a")
    with pytest.raises(RegistryError) as e:
        reg.get("zzz")
    assert e.value.status == 404 and "Served models: a" in e.value.message
    with pytest.raises(RegistryError) as e:
        reg.load("a")
    assert e.value.code == "model_exists" and e.value.status == 400
    assert len(reg._loader.calls) == 2  # the second load did read weights (name came from the loader)
    with pytest.raises(RegistryError) as e:
        reg.load("a", name="a")
    assert len(reg._loader.calls) == 2  # an explicit clashing name is refused before loading
    with pytest.raises(FileNotFoundError):
        reg.load("missing")
    assert reg.names() == ["a"]


def test_name_clash_with_adapter():
    reg = ModelRegistry(Loader({"a": MiB}), reserved_names=lambda: ["my-lora"])
    with pytest.raises(RegistryError) as e:
        reg.load("a", name="my-lora")
    assert e.value.code == "name_conflict"
    assert reg.names() == []


def test_lru_eviction_of_idle_models():
    reg, evicted = make(budget=50, a=20, b=20, c=20, d=45)
    reg.load("a")
    reg.load("b")
    reg.get("a")  # a is now more recently used than b
    reg.load("c")  # 60 > 50: evict the LRU idle model, b
    assert evicted == ["b"] and reg.names() == ["a", "c"]
    assert reg.total_weight_bytes() == 40 * MiB


def test_busy_models_are_not_evicted():
    reg, evicted = make(budget=50, a=20, b=20, c=20, d=45)
    reg.load("a")
    reg.load("b")
    reg.acquire("a")
    reg.acquire("b")
    with pytest.raises(RegistryError) as e:
        reg.load("c")  # nothing idle to evict
    assert e.value.code == "over_budget" and "busy: a, b" in e.value.message
    assert reg.names() == ["a", "b"] and evicted == []
    reg.release("b")
    reg.load("c")
    assert evicted == ["b"] and reg.names() == ["a", "c"]
    with pytest.raises(RegistryError):
        reg.load("d")  # 45 + busy a (20) > 50 even after evicting c
    assert reg.names() == ["a", "c"] and evicted == ["b"]


def test_unload_busy_needs_force():
    reg, evicted = make(a=10)
    reg.load("a")
    reg.acquire("a")
    with pytest.raises(RegistryError) as e:
        reg.unload("a")
    assert e.value.code == "model_busy"
    reg.release("a")
    reg.unload("a")
    assert reg.names() == [] and evicted == ["a"]
    with pytest.raises(RegistryError) as e:
        reg.unload("a")
    assert e.value.status == 404
