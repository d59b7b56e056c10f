"""q/k/v and gate/up as one matmul each: the same outputs as the plain layers, no second copy of
the weights, greedy tokens as mlx-lm's, and adapters that still match mlx-lm once they wrap a
fused layer (which makes it plain again)."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.types import EngineRequest, SamplingParams
from parallm.models.fused_projections import GroupedLinear, fuse_projections, grouped_count

from tests.adapters.conftest import write_adapter_dir
from tests.adapters.test_lora import PROMPTS, greedy, reference
from tests.engine_helpers import make_prompt, reference_greedy, run_to_completion
from tests.tiny_models import load_tiny


def test_fused_model_computes_what_the_plain_one_does(tiny_model_dir):
    plain, _ = load_model(Path(tiny_model_dir))
    fused, _ = load_model(Path(tiny_model_dir))
    layers = len(fused.layers)
    originals = {p: mx.array(m.weight) for p, m in fused.named_modules() if isinstance(m, nn.Linear)}
    assert fuse_projections(fused) == 2 * layers  # q/k/v and gate/up in every block
    assert grouped_count(fused) == 5 * layers
    assert fuse_projections(fused) == 0  # already fused: nothing more to do
    for path, m in fused.named_modules():
        if isinstance(m, GroupedLinear):  # each weight is its rows of the group's matrix, unchanged
            group = m.__dict__["_projection_group"]
            assert mx.array_equal(m.weight, originals[path])
            assert group.params["weight"].shape[0] == sum(member.weight.shape[0] for member in group.members)
    tokens = mx.array([make_prompt(1, 9), make_prompt(2, 9)])
    assert mx.allclose(fused(tokens), plain(tokens), atol=1e-5)
    # a member called on an input its group has not seen computes its own product
    q = fused.layers[0].self_attn.q_proj
    x = mx.random.normal((2, 3, q.weight.shape[1]))
    assert mx.allclose(q(x), x @ q.weight.T, atol=1e-5)
    # a weight replaced after fusing (a reload) is used, not the group's stale copy of it
    k = fused.layers[0].self_attn.k_proj
    k.weight = mx.zeros_like(k.weight)
    assert mx.array_equal(k(x), mx.zeros((2, 3, k.weight.shape[0])))
    assert mx.allclose(q(x), x @ q.weight.T, atol=1e-5)


def _engine_outputs(loaded, fuse: bool, requests) -> dict:
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, fuse_projections=fuse, prefix_cache_bytes=0))
    assert (grouped_count(loaded.model) > 0) == fuse
    got = run_to_completion(engine, {0: requests[:2], 2: requests[2:]})
    return {r: ([t for o in outs for t in o.token_ids], [lp.logprob for o in outs for lp in o.logprobs])
            for r, outs in got.items()}


def test_engine_with_fused_projections_matches_the_plain_engine_and_mlx_lm(tiny_model_dir):
    """Greedy tokens as mlx-lm's; and seeded sampling at temperature 1 with each token's logprob,
    against the same engine unfused (logprobs see a wrong forward that happens to keep the argmax)."""
    prompts = {f"r{i}": make_prompt(i, 6 + 5 * i) for i in range(4)}
    lengths = {"r0": 5, "r1": 9, "r2": 3, "r3": 7}
    plain = load_tiny(tiny_model_dir)
    greedy_ref = {r: reference_greedy(plain, p, lengths[r]) for r, p in prompts.items()}

    def requests(temperature):
        return [EngineRequest(r, p, SamplingParams(max_tokens=lengths[r], temperature=temperature, seed=7 + i,
                                                   ignore_eos=True, logprobs=True))
                for i, (r, p) in enumerate(prompts.items())]

    fused = _engine_outputs(load_tiny(tiny_model_dir), True, requests(0.0))
    assert {r: toks for r, (toks, _) in fused.items()} == greedy_ref
    sampled_plain = _engine_outputs(load_tiny(tiny_model_dir), False, requests(1.0))
    sampled_fused = _engine_outputs(load_tiny(tiny_model_dir), True, requests(1.0))
    assert len({t for toks, _ in sampled_plain.values() for t in toks}) > 4  # the check has tokens to tell apart
    for r in prompts:
        assert sampled_fused[r][0] == sampled_plain[r][0], r
        assert mx.allclose(mx.array(sampled_fused[r][1]), mx.array(sampled_plain[r][1]), atol=1e-4), r


def test_an_adapter_unfuses_the_layers_it_wraps_and_matches_mlx_lm(tiny_model_dir, tmp_path):
    from parallm.engine.adapter_manager import AdapterManager

    model, _ = load_model(Path(tiny_model_dir))
    fuse_projections(model)
    adapter_dir = write_adapter_dir(tiny_model_dir, tmp_path / "adapters" / "x", seed=3, num_layers=1)  # last block
    manager = AdapterManager("tiny", model, adapters_dir=adapter_dir.parent, reserved_names=lambda: [])
    manager.load("x", "x")
    toks, _ = greedy(model, PROMPTS[:2], before_forward=lambda: manager.bind_rows(["x", None]))
    assert toks[0] == reference(tiny_model_dir, adapter_dir, PROMPTS[0])[0][0]
    assert toks[1] == reference(tiny_model_dir, None, PROMPTS[1])[0][0]
    last, first = model.layers[-1], model.layers[0]
    assert not any(isinstance(m, GroupedLinear) for _, m in last.named_modules())  # wrapped: plain again
    assert isinstance(first.self_attn.k_proj, GroupedLinear)  # an untouched block stays fused


def test_quantized_projections_fuse_to_the_same_output_and_unfuse_for_adapters(tiny_model_dir, tmp_path):
    """4-bit affine layers (as a GGUF Q4 model loads): weight, scales and biases split by rows."""
    from parallm.models.fused_projections import GroupedQuantizedLinear, dissolve

    plain, _ = load_model(Path(tiny_model_dir))
    fused, _ = load_model(Path(tiny_model_dir))
    for m in (plain, fused):
        nn.quantize(m, group_size=32, bits=4)
    assert fuse_projections(fused) == 2 * len(fused.layers)
    k = fused.layers[0].self_attn.k_proj
    assert isinstance(k, GroupedQuantizedLinear) and isinstance(k, nn.QuantizedLinear)
    tokens = mx.array([make_prompt(3, 7), make_prompt(4, 7)])
    assert mx.allclose(fused(tokens), plain(tokens), atol=1e-5)
    dissolve(k)  # what wrapping for adapters does first: the whole group plain again
    assert type(fused.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    assert isinstance(fused.layers[0].mlp.up_proj, GroupedQuantizedLinear)  # another group: still fused
    assert mx.allclose(fused(tokens), plain(tokens), atol=1e-5)
