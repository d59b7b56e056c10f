"""parallm's CUDA decode kernels (decode_attention.py) against MLX's masked attention.

Runs only where MLX has CUDA (skipped on the CPU and on Metal): the lent GPU, not CI. On every
backend the routing is checked: without the kernels the engine keeps MLX's path."""
from __future__ import annotations

import mlx.core as mx
import pytest

from parallm.engine.cuda.decode_attention import DecodeAttention, install_attention_hook
from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.types import EngineRequest, SamplingParams
from tiny_models import load_tiny, write_tiny_llama

from engine_helpers import make_prompt, reference_greedy, run_to_completion, tokens_of

cuda = pytest.mark.skipif(not (mx.cuda.is_available() and mx.default_device() == mx.gpu),
                          reason="the decode kernels are CUDA kernels")


def _reference(q, kbuf, vbuf, lengths, scale):
    """MLX attention of row b over positions [0, lengths[b]] of slot b (bool mask)."""
    B = q.shape[0]
    kv = int(max(lengths)) + 1
    mask = (mx.arange(kv)[None] <= mx.array(lengths)[:, None])[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kbuf[:B, :, :kv].astype(mx.float32),
                                                vbuf[:B, :, :kv].astype(mx.float32), scale=scale, mask=mask)


@cuda
@pytest.mark.parametrize("B,hq,hkv,d,cap,dtype", [
    (1, 32, 8, 128, 512, mx.bfloat16), (3, 9, 3, 64, 256, mx.float32), (64, 32, 8, 64, 512, mx.bfloat16),
    (130, 32, 8, 128, 256, mx.float16), (5, 8, 8, 96, 2048, mx.float32)])
def test_write_then_attend_matches_masked_attention(B, hq, hkv, d, cap, dtype):
    mx.random.seed(B)
    kernels = DecodeAttention()
    slots = B + 3
    kbuf = mx.random.normal((slots, hkv, cap, d)).astype(dtype)
    vbuf = mx.random.normal((slots, hkv, cap, d)).astype(dtype)
    lengths = [int(x) for x in mx.random.randint(0, cap - 1, (B,)).tolist()]
    lengths[0] = cap - 2  # one long row beside short ones
    q = mx.random.normal((B, hq, 1, d)).astype(dtype)
    k_new = mx.random.normal((B, hkv, 1, d)).astype(dtype)
    v_new = mx.random.normal((B, hkv, 1, d)).astype(dtype)
    mx.eval(kbuf, vbuf, q, k_new, v_new)
    lens = mx.array(lengths, dtype=mx.int32)
    done = kernels.write(k_new, v_new, kbuf, vbuf, lens)
    out = kernels.attend(q, kbuf, vbuf, lens, done, d ** -0.5, max(lengths))
    mx.eval(out)
    for b in (0, B - 1):  # written in place, at each row's own position
        assert mx.array_equal(kbuf[b, :, lengths[b]], k_new[b, :, 0]).item()
        assert mx.array_equal(vbuf[b, :, lengths[b]], v_new[b, :, 0]).item()
    ref = _reference(q, kbuf, vbuf, lengths, d ** -0.5)
    err = (mx.linalg.norm((out.astype(mx.float32) - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1))).item()
    assert err < (1e-5 if dtype == mx.float32 else 2e-2), err


@cuda
def test_engine_with_kernels_matches_mlx_lm(tmp_path):
    loaded = load_tiny(write_tiny_llama(tmp_path / "m", hidden_size=256, num_heads=4, num_kv_heads=2))
    engine = Engine(loaded, EngineConfig(max_num_seqs=6, max_num_batched_tokens=48, prefix_cache_bytes=0))
    assert engine.runner.cache.kernels is not None
    lengths = [1, 3, 7, 12, 20, 33, 50, 64, 90]
    schedule: dict[int, list] = {}
    for i, n in enumerate(lengths):
        req = EngineRequest(f"r{i}", make_prompt(i, n),
                            SamplingParams(max_tokens=6 + i, temperature=0.0, ignore_eos=True))
        schedule.setdefault(i * 3 // 2, []).append(req)
    outs = run_to_completion(engine, schedule)
    for i, n in enumerate(lengths):
        assert tokens_of(outs[f"r{i}"]) == reference_greedy(loaded, make_prompt(i, n), 6 + i), i


def test_without_kernels_the_hook_passes_through(tiny_loaded):
    """The hook must leave every non-parallm cache (mlx-lm's own) on MLX's attention."""
    before = reference_greedy(tiny_loaded, make_prompt(3, 9), 5)
    assert install_attention_hook(tiny_loaded.model)
    assert reference_greedy(tiny_loaded, make_prompt(3, 9), 5) == before
    engine = Engine(tiny_loaded, EngineConfig(decode_kernels=False, prefix_cache_bytes=0))
    assert engine.runner.cache.kernels is None
    outs = run_to_completion(engine, {0: [EngineRequest("a", make_prompt(3, 9), SamplingParams(
        max_tokens=5, temperature=0.0, ignore_eos=True))]})
    assert tokens_of(outs["a"]) == reference_greedy(tiny_loaded, make_prompt(3, 9), 5)


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss", "qwen3_next", "mamba2"])
def test_kernels_step_aside_for_windows_state_and_sinks(family, tmp_path, monkeypatch):
    """However a config names its windows (Gemma 3 has no layer_types), a model with a sliding
    window, recurrent state or attention sinks never gets the kernels, even where they would
    compile (checked on every backend by pretending to be CUDA; nothing is compiled)."""
    from mlx_lm import load as mlx_lm_load

    from family_configs import write_family_model
    from parallm.engine.cuda import decode_attention
    from parallm.models.cache_layout import probe_cache_layout

    model, _ = mlx_lm_load(str(write_family_model(family, tmp_path / family)))
    monkeypatch.setattr(decode_attention, "computing_on_cuda", lambda: True)
    monkeypatch.setattr(decode_attention.DecodeAttention, "supports", staticmethod(lambda *a: True))
    monkeypatch.setattr(decode_attention, "DecodeAttention", None)  # constructing it would fail the test
    assert decode_attention.kernels_for(model, probe_cache_layout(model)) is None


@cuda
@pytest.mark.parametrize("family", ["gemma3", "gpt_oss", "qwen3_next"])
def test_windowed_and_hybrid_families_on_cuda_match_mlx_lm(family, tmp_path):
    """Head dims the kernels would take (64): the engine must still match mlx-lm alone."""
    from family_configs import write_family_model

    loaded = load_tiny(write_family_model(family, tmp_path / family, overrides={"head_dim": 64}))
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=24))
    assert engine.runner.cache.kernels is None
    schedule: dict[int, list] = {}
    lengths = [5, 29, 13, 41, 2, 20]
    for i, n in enumerate(lengths):
        req = EngineRequest(f"r{i}", make_prompt(i, n), SamplingParams(max_tokens=8 + i, temperature=0.0,
                                                                       ignore_eos=True))
        schedule.setdefault(i * 5 // 4, []).append(req)
    outs = run_to_completion(engine, schedule)
    for i, n in enumerate(lengths):
        assert tokens_of(outs[f"r{i}"]) == reference_greedy(loaded, make_prompt(i, n), 8 + i), (family, i)
