"""The CUDA LoRA kernel (parallm/models/lora_kernel.py) against the gather_mm computation.

The kernel tests run only where MLX has CUDA (the lent GPU, not CI); the routing test runs
everywhere: off CUDA no layer takes the kernel path. test_lora.py's mlx-lm comparisons go through
the kernel too when they run on CUDA."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from parallm.models.lora import LayerAdapterWeights, LoRARowBinding, MultiLoRALinear
from parallm.models.lora_kernel import LoRADeltaKernel, kernel_available

cuda = pytest.mark.skipif(not kernel_available(), reason="the LoRA kernel is a CUDA kernel")


def _gather_reference(x, y, a, b, slots):
    # on the CPU: MLX's CUDA float32 matmuls run at TF32-class precision, too coarse for a reference
    with mx.stream(mx.cpu):
        slots = mx.where(slots < a.shape[0], slots, 0)
        xa = mx.gather_mm(x.astype(mx.float32), a.astype(mx.float32), rhs_indices=slots)
        return y.astype(mx.float32) + mx.gather_mm(xa, b.astype(mx.float32), rhs_indices=slots)


@cuda
@pytest.mark.parametrize("B,L,din,dout,R,S,dtype", [
    (32, 1, 576, 576, 8, 9, mx.bfloat16), (64, 1, 576, 1536, 16, 9, mx.bfloat16),
    (5, 7, 100, 3000, 8, 3, mx.float32), (3, 1, 4096, 14336, 64, 4, mx.float16),
    (130, 1, 64, 64, 32, 2, mx.float32)])
def test_kernel_matches_gather_mm(B, L, din, dout, R, S, dtype):
    mx.random.seed(B + R)
    x = mx.random.normal((B, L, din)).astype(dtype)
    y = mx.random.normal((B, L, dout)).astype(dtype)
    a = (mx.random.normal((S, din, R)) * 0.05).astype(dtype)
    b = (mx.random.normal((S, R, dout)) * 0.05).astype(dtype)
    a[0] = 0
    b[0] = 0
    # every slot, the no-adapter slot, and one past the stack (a layer that lacks that adapter)
    slots = mx.array([i % (S + 1) for i in range(B)], mx.uint32)
    got = LoRADeltaKernel().apply(x, y, a, b, slots)
    assert got.dtype == dtype and got.shape == y.shape
    want = _gather_reference(x, y, a, b, slots)
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    assert mx.allclose(got.astype(mx.float32), want, atol=tol, rtol=tol).item()
    # rows with slot 0 or out of range are exactly the base output
    plain = [i for i in range(B) if i % (S + 1) in (0, S)]
    assert mx.array_equal(got[mx.array(plain)], y[mx.array(plain)]).item()
    # and the others did change
    changed = [i for i in range(B) if i % (S + 1) not in (0, S)]
    assert mx.abs(got[mx.array(changed)].astype(mx.float32) - y[mx.array(changed)].astype(mx.float32)).max().item() > 1e-3



@cuda
@pytest.mark.parametrize("outs,dtype", [((576, 192, 192), mx.bfloat16), ((1536, 1536), mx.bfloat16),
                                        ((100, 3000, 7), mx.float32)])
def test_fused_kernel_matches_gather_mm(outs, dtype):
    """apply_fused: the members' base outputs side by side in one y; each gets its own slice plus
    its own update, and a member with a one-slot stand-in stack is copied unchanged."""
    mx.random.seed(len(outs))
    B, L, din, R, S = 9, 1, 576, 8, 4
    x = mx.random.normal((B, L, din)).astype(dtype)
    y = mx.random.normal((B, L, sum(outs))).astype(dtype)
    as_ = [(mx.random.normal((S, din, R)) * 0.05).astype(dtype) for _ in outs]
    bs = [(mx.random.normal((S, R, o)) * 0.05).astype(dtype) for o in outs]
    for a, b in zip(as_, bs):  # slot 0 is "no adapter": all zeros in a real stack
        a[0] = 0
        b[0] = 0
    as_[-1], bs[-1] = mx.zeros((1, din, R), dtype), mx.zeros((1, R, outs[-1]), dtype)  # a stand-in
    slots = mx.array([i % (S + 1) for i in range(B)], mx.uint32)
    got = LoRADeltaKernel().apply_fused(x, y, as_, bs, slots)
    col = 0
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    for out, a, b, o in zip(got, as_, bs, outs):
        part = y[..., col: col + o]
        col += o
        assert out.shape == (B, L, o) and out.dtype == dtype
        assert mx.allclose(out.astype(mx.float32), _gather_reference(x, part, a, b, slots), atol=tol, rtol=tol).item()
    assert mx.array_equal(got[-1], y[..., -outs[-1]:]).item()


def _layer(din=64, dout=48):
    mx.random.seed(0)
    layer = MultiLoRALinear(nn.Linear(din, dout, bias=False), LoRARowBinding())
    w = LayerAdapterWeights(a=mx.random.normal((din, 6)) * 0.1, b=mx.random.normal((6, dout)) * 0.1, scale=2.0)
    layer.set_adapter(1, w)
    return layer, w


def test_layer_routes_to_kernel_only_on_cuda():
    layer, _ = _layer()
    assert (layer._kernel is not None) == kernel_available()
    if kernel_available():
        assert layer._stacks.a.shape[-1] == 8  # rank 6 padded to the compiled power of two


def test_layer_output_matches_dense_lora():
    """Whatever path the backend takes: base(x) + scale * (x @ A) @ B on adapter rows only."""
    layer, w = _layer()
    x = mx.random.normal((3, 2, 64))
    layer._binding.bind([1, 0, 1])
    got = layer(x)
    base = layer.base(x)
    want = base + w.scale * (x @ w.a) @ w.b
    tol = 1e-4 if mx.default_device() == mx.cpu else 1e-2  # CUDA: TF32-class float32 matmuls
    assert mx.allclose(got[mx.array([0, 2])], want[mx.array([0, 2])], atol=tol).item()
    assert mx.allclose(got[1], base[1], atol=1e-6).item()


class _ReferenceKernel:
    """Stands in for the CUDA kernel on any backend (same contract as LoRADeltaKernel.prepare,
    gather_mm arithmetic), so the sibling grouping around it is tested everywhere; records each
    launch: the number of members, or ("fused", members)."""

    def __init__(self):
        self.calls: list = []

    def prepare(self, as_, bs, dtype, fused=False):
        def launch(x, ys, slots):
            if fused:
                self.calls.append(("fused", len(bs)))
                cuts, col = [], 0
                for b in bs[:-1]:
                    col += b.shape[-1]
                    cuts.append(col)
                ys = mx.split(ys[0], cuts, axis=-1)
            else:
                self.calls.append(len(bs))
            return [_gather_reference(x, y, a, b, slots).astype(dtype) for y, a, b in zip(ys, as_, bs)]
        return launch


def _use_kernel(layers, kernel):
    for m in layers.values():
        m._kernel = kernel
        m._launch = None


def test_siblings_share_one_launch_and_match_separate_layers(tiny_model_dir, make_adapter):
    from pathlib import Path

    from mlx_lm.utils import load_model

    from parallm.models.adapters import read_adapter
    from parallm.models.lora import install_adapter, multi_lora_layers

    adapter = make_adapter("x", seed=7, rank=8)
    model, _ = load_model(Path(tiny_model_dir))
    binding = install_adapter(model, 1, read_adapter(adapter, model).layers)
    layers = multi_lora_layers(model)
    x = mx.random.normal((3, 2, model.args.hidden_size))
    binding.bind([1, 0, 1])
    attn = [p for p in layers if p.endswith("self_attn.q_proj")][0].rsplit(".", 1)[0]
    mlp = attn.rsplit(".", 1)[0] + ".mlp"
    calls = [f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj")] + [f"{mlp}.{n}" for n in ("gate_proj", "up_proj")]
    separate = {p: layers[p]._add_delta(x, layers[p].base(x)) for p in calls}  # each layer on its own

    fake = _ReferenceKernel()
    _use_kernel(layers, fake)
    for m in layers.values():
        if m._siblings is not None:  # CUDA fuses the base weights at link time: test the unfused plan here
            m._siblings._fused = None
            m._siblings.forget()
    got = {p: layers[p](x) for p in calls}
    assert fake.calls == [3, 2]  # q/k/v in one launch, gate/up in another
    for p in calls:
        assert mx.allclose(got[p], separate[p], atol=1e-5).item(), p

    # a kept output is not reused across a re-bind, nor for a different input
    layers[f"{attn}.q_proj"](x)
    binding.bind([0, 1, 1])
    fake.calls.clear()
    k_after = layers[f"{attn}.k_proj"](x)
    assert fake.calls == [3]
    want = layers[f"{attn}.k_proj"]._add_delta(x, layers[f"{attn}.k_proj"].base(x))
    assert mx.allclose(k_after, want, atol=1e-5).item()
    other = mx.random.normal(x.shape)
    assert mx.allclose(layers[f"{attn}.v_proj"](other),
                       layers[f"{attn}.v_proj"]._add_delta(other, layers[f"{attn}.v_proj"].base(other)), atol=1e-5).item()


def _wrapped_tiny(tiny_model_dir, make_adapter, **adapter_kwargs):
    from pathlib import Path

    from mlx_lm.utils import load_model

    from parallm.models.adapters import read_adapter
    from parallm.models.lora import install_adapter, multi_lora_layers

    model, _ = load_model(Path(tiny_model_dir))
    binding = install_adapter(model, 1, read_adapter(make_adapter("x", seed=7, rank=8, **adapter_kwargs), model).layers)
    layers = multi_lora_layers(model)
    attn = [p for p in layers if p.endswith("self_attn.q_proj")][0].rsplit(".", 1)[0]
    return model, binding, layers, attn


def test_fused_base_is_one_matmul_and_matches_separate_layers(tiny_model_dir, make_adapter):
    """CUDA fuses each group's base weights (q/k/v, gate/up) into one matrix whose rows the members'
    weights are views of; the group's outputs then come from one matmul plus one kernel launch.
    Checked here with the reference kernel: same outputs as each layer computed on its own, the
    weights unchanged in value, and a replaced weight falling back to per-member calls."""
    model, binding, layers, attn = _wrapped_tiny(tiny_model_dir, make_adapter)
    names = [f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    before = {p: mx.array(layers[p].base.weight) for p in names}
    group = layers[names[0]]._siblings
    assert group.fuse_base()
    for p in names:  # same values, now rows of the one matrix
        assert mx.array_equal(layers[p].base.weight, before[p]).item()
    assert group._fused.weight.shape[0] == sum(before[p].shape[0] for p in names)

    x = mx.random.normal((3, 2, model.args.hidden_size))
    binding.bind([1, 0, 1])
    separate = {p: layers[p]._add_delta(x, x @ before[p].T) for p in names}
    fake = _ReferenceKernel()
    _use_kernel(layers, fake)
    got = {p: layers[p](x) for p in names}
    assert fake.calls == [("fused", 3)]
    for p in names:
        assert got[p].shape == separate[p].shape
        assert mx.allclose(got[p], separate[p], atol=1e-5).item(), p

    # a member's weight replaced (a reload): the fused matrix is stale, so per-member calls again
    fresh = mx.random.normal(before[names[1]].shape) * 0.02
    layers[names[1]].base.weight = fresh
    binding.bind([1, 1, 0])
    fake.calls.clear()
    got = {p: layers[p](x) for p in names}
    assert ("fused", 3) not in fake.calls
    want_k = layers[names[1]]._add_delta(x, x @ fresh.T)
    assert mx.allclose(got[names[1]], want_k, atol=1e-5).item()


def test_fused_base_copies_members_without_the_adapter(tiny_model_dir, make_adapter):
    """An adapter on q and v only: k still comes out of the fused launch, exactly its base output."""
    model, binding, layers, attn = _wrapped_tiny(tiny_model_dir, make_adapter, keys=["self_attn.q_proj",
                                                                                      "self_attn.k_proj",
                                                                                      "self_attn.v_proj"])
    names = [f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    layers[names[1]].remove_adapter(1)  # k carries nothing
    group = layers[names[0]]._siblings
    assert group.fuse_base()
    fake = _ReferenceKernel()
    _use_kernel(layers, fake)
    x = mx.random.normal((2, 1, model.args.hidden_size))
    binding.bind([1, 1])
    got = {p: layers[p](x) for p in names}
    assert fake.calls == [("fused", 3)]
    assert mx.allclose(got[names[1]], layers[names[1]].base(x), atol=1e-6).item()
    for p in (names[0], names[2]):
        want = layers[p]._add_delta(x, layers[p].base(x))
        assert mx.allclose(got[p], want, atol=1e-5).item()
        assert not mx.allclose(got[p], layers[p].base(x), atol=1e-4).item()  # the adapter did act


def _emulated_kernel():
    """A LoRADeltaKernel whose compiled kernels are replaced by an emulation of the CUDA source's
    contract (inputs in the declared order; grid = a block of THREADS per token and TILE-output
    tile of every member; one output per member): the Python around the launch (prepare,
    PreparedLaunch) is then checked on any backend, argument order and grid included."""
    from parallm.models import lora_kernel as lk

    def emulate(m, fused):
        names = ["x", *(["y"] if fused else [f"y{i}" for i in range(m)]),
                 *[f"a{i}" for i in range(m)], *[f"b{i}" for i in range(m)], "slots"]

        def fn(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            kernel.launches.append((m, fused))
            d = dict(zip(names, inputs, strict=True))
            t = dict(template)
            x, slots = d["x"], d["slots"]
            widths = [d[f"b{i}"].shape[2] for i in range(m)]
            assert t["R"] == d["a0"].shape[2] and t["NT"] == lk.THREADS and t["TILE"] == lk.TILE
            assert threadgroup == (lk.THREADS, 1, 1)
            tokens = x.shape[0] * x.shape[1]
            assert grid == (tokens * sum(-(-w // lk.TILE) for w in widths) * lk.THREADS, 1, 1)
            assert output_shapes == [(x.shape[0], x.shape[1], w) for w in widths]
            if fused:
                cuts = [sum(widths[: i + 1]) for i in range(m - 1)]
                ys = mx.split(d["y"], cuts, axis=-1)
            else:
                ys = [d[f"y{i}"] for i in range(m)]
            return [_gather_reference(x, y, d[f"a{i}"], d[f"b{i}"], slots).astype(dt)
                    for i, (y, dt) in enumerate(zip(ys, output_dtypes))]
        return fn

    kernel = object.__new__(lk.LoRADeltaKernel)
    kernel._kernels = {m: emulate(m, False) for m in range(1, lk.MAX_MEMBERS + 1)}
    kernel._fused_kernels = {m: emulate(m, True) for m in range(2, lk.MAX_MEMBERS + 1)}
    kernel._compiled, kernel._failed = set(), set()
    kernel.launches = []
    return kernel


def test_prepared_launches_pass_the_kernel_what_its_source_expects(tiny_model_dir, make_adapter):
    model, binding, layers, attn = _wrapped_tiny(tiny_model_dir, make_adapter)
    x = mx.random.normal((3, 2, model.args.hidden_size))
    binding.bind([1, 0, 1])
    names = [f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    want = {p: layers[p]._add_delta(x, layers[p].base(x)) for p in names}  # gather_mm path (CPU)
    kernel = _emulated_kernel()
    _use_kernel(layers, kernel)
    group = layers[names[0]]._siblings
    group._fused = None  # CUDA fuses at link time: start from the unfused group on every backend
    for fused in (False, True):
        if fused:
            assert group.fuse_base()
        group.forget()
        binding.bind([1, 0, 1])  # a new generation: nothing kept from the last pass
        kernel.launches.clear()
        for p in names:
            assert mx.allclose(layers[p](x), want[p], atol=1e-5).item(), (p, fused)
        assert kernel.launches == [(3, fused), (1, False)]  # q/k/v together, then o_proj alone


def test_fused_base_weights_take_no_extra_memory():
    """The members' weights become views of the one concatenated matrix: once the originals are
    dropped, fusing has not added a second copy of the group's weights."""
    import gc

    from parallm.models.lora import SharedInputGroup

    binding = LoRARowBinding()
    members = [MultiLoRALinear(nn.Linear(1024, out, bias=False), binding) for out in (1024, 256, 256)]
    mx.eval([m.base.parameters() for m in members])
    gc.collect()
    before = mx.get_active_memory()
    group = SharedInputGroup(members)
    assert group.fuse_base()
    gc.collect()
    weight_bytes = sum(m.base.weight.nbytes for m in members)
    assert mx.get_active_memory() - before < 0.1 * weight_bytes
    assert group._fused.weight.nbytes == weight_bytes
