"""Tiny random-weight configurations, one per architecture family mlx-lm supports and we serve.

Each config is shrunk (hidden 64, 2-3 layers, SmolLM2's 49152-token vocabulary) but keeps the
family's real features switched on: RoPE scaling variants, sliding windows small enough that short
test prompts cross them, attention sinks, MLA, MoE routing, softcapping, NoPE layers, linear
attention, conv and SSM layers. Tests that compare a batched engine against mlx-lm's own
`generate` then see those features, which a plain tiny Llama would not exercise.

`write_family_model(name, out)` builds the model with mlx-lm's own classes and writes an mlx-lm
model directory (weights already in mlx layout, so each family's `sanitize` passes them through
unchanged on load)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tiny_models import TOKENIZER_DIR, VOCAB_SIZE

V = VOCAB_SIZE  # every vocab field is SmolLM2's 49152
COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype="float32",
              max_position_embeddings=2048, tie_word_embeddings=False)

FAMILIES: dict[str, dict] = {
    "llama3": dict(COMMON, model_type="llama", hidden_size=64, num_hidden_layers=2,
                   intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "gpt_oss": dict(COMMON, model_type="gpt_oss", hidden_size=64, num_hidden_layers=2,
                    intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    rope_theta=150000.0,
                    rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                                  "beta_slow": 1.0, "original_max_position_embeddings": 256}),
    "deepseek_v3": dict(COMMON, model_type="deepseek_v3", hidden_size=64, num_hidden_layers=3,
                        intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, n_routed_experts=4,
                        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                        first_k_dense_replace=1, moe_layer_freq=1, rms_norm_eps=1e-6,
                        rope_theta=10000.0,
                        rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                                      "mscale": 1.0, "mscale_all_dim": 1.0,
                                      "original_max_position_embeddings": 512}),
    # original_max_position_embeddings 32 so the llama-4 attention scaling (floor(pos / 32)) changes
    # inside short test prompts; its beta is 0.5 (real: 0.1) so that greedy tokens feel it.
    "ministral3": dict(COMMON, model_type="ministral3", hidden_size=64, num_hidden_layers=2,
                       intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rms_norm_eps=1e-5, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "yarn", "type": "yarn", "rope_theta": 1000000.0,
                                        "factor": 64.0, "original_max_position_embeddings": 32,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                        "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}),
    "phi3": dict(COMMON, model_type="phi3", hidden_size=64, num_hidden_layers=2,
                 intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, rope_theta=10000.0, original_max_position_embeddings=512,
                 rope_scaling={"type": "longrope",
                               "short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                               "long_factor": [1.0, 1.2, 1.5, 2.0, 2.8, 3.5, 4.0, 4.0]}),
    # Softcaps sized to this tiny model's attention scores and logits so that tanh bends them (at
    # the real 50 / 30 both would be nearly linear here).
    "gemma2": dict(COMMON, model_type="gemma2", hidden_size=64, num_hidden_layers=2,
                   intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=16,
                   attn_logit_softcapping=10.0, final_logit_softcapping=2.0,
                   tie_word_embeddings=True),
    "gemma3": dict(COMMON, model_type="gemma3_text", hidden_size=64, num_hidden_layers=2,
                   intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                   query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "qwen2": dict(COMMON, model_type="qwen2", hidden_size=64, num_hidden_layers=2,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1000000.0),
    "qwen3": dict(COMMON, model_type="qwen3", hidden_size=64, num_hidden_layers=2,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-6, rope_theta=1000000.0),
    "qwen3_moe": dict(COMMON, model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                      rms_norm_eps=1e-6, rope_theta=1000000.0),
    # Gated DeltaNet heads are 32 wide: mlx-lm's Metal kernels need a multiple of 32.
    "qwen3_next": dict(COMMON, model_type="qwen3_next", hidden_size=64, num_hidden_layers=2,
                       intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, partial_rotary_factor=0.25, rope_theta=10000000.0,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
                       linear_value_head_dim=32, linear_conv_kernel_dim=4, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[],
                       norm_topk_prob=True, full_attention_interval=2, rms_norm_eps=1e-6),
    # As the real checkpoints: a multimodal wrapper whose text model sits in text_config.
    "qwen3_5": dict(model_type="qwen3_5", vocab_size=V, bos_token_id=1, eos_token_id=2,
                    torch_dtype="float32", tie_word_embeddings=False,
                    text_config=dict(COMMON, model_type="qwen3_5_text", hidden_size=64,
                                     num_hidden_layers=2, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     linear_num_value_heads=4, linear_num_key_heads=2,
                                     linear_key_head_dim=32, linear_value_head_dim=32,
                                     linear_conv_kernel_dim=4, full_attention_interval=2,
                                     rms_norm_eps=1e-6,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                                      "partial_rotary_factor": 0.25,
                                                      "mrope_section": [2, 1, 1],
                                                      "mrope_interleaved": True})),
    # block_ff_dim 192 with auto-adjust: int(2 * 192 / 3) rounded to a multiple of 32 = 128.
    "lfm2": dict(COMMON, model_type="lfm2", hidden_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, norm_eps=1e-5, conv_bias=False,
                 conv_L_cache=3, block_dim=64, block_ff_dim=192, block_multiple_of=32,
                 block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True, rope_theta=1000000.0,
                 layer_types=["conv", "full_attention", "conv"], tie_word_embeddings=True),
    # num_heads * head_dim = expand * hidden_size = 128; state 32 for the Metal SSM kernel.
    "mamba2": dict(COMMON, model_type="mamba2", hidden_size=64, num_hidden_layers=2, expand=2,
                   intermediate_size=128, num_heads=8, head_dim=16, n_groups=2, state_size=32,
                   conv_kernel=4, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
                   time_step_limit=[0.001, 100.0], time_step_rank="auto"),
    "granite4_h": dict(COMMON, model_type="granitemoehybrid", hidden_size=64, num_hidden_layers=3,
                       intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                       attention_bias=False, layer_types=["mamba", "attention", "mamba"],
                       embedding_multiplier=12.0, attention_multiplier=0.0625, logits_scaling=4.0,
                       residual_multiplier=0.22, rms_norm_eps=1e-5, num_local_experts=4,
                       num_experts_per_tok=2, shared_intermediate_size=64, mamba_n_heads=8,
                       mamba_d_head=16, mamba_d_state=32, mamba_d_conv=4, mamba_n_groups=1,
                       mamba_expand=2, mamba_proj_bias=False, mamba_conv_bias=True,
                       position_embedding_type="nope", rope_theta=10000.0),
    "falcon_h1": dict(COMMON, model_type="falcon_h1", hidden_size=64, num_hidden_layers=2,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      mamba_d_conv=4, mamba_d_head=16, mamba_d_ssm=128, mamba_d_state=32, mamba_expand=2,
                      mamba_n_groups=1, mamba_n_heads=8, rope_theta=10000.0),
    "olmo2": dict(COMMON, model_type="olmo2", hidden_size=64, num_hidden_layers=2,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=500000.0),
    "smollm3": dict(COMMON, model_type="smollm3", hidden_size=64, num_hidden_layers=2,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    rms_norm_eps=1e-6, rope_theta=5000000.0, no_rope_layer_interval=2,
                    no_rope_layers=[1, 0]),
    "glm4": dict(COMMON, model_type="glm4", hidden_size=64, num_hidden_layers=2,
                 intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0,
                 rms_norm_eps=1e-5),
}

FAMILY_FEATURES: dict[str, str] = {
    "llama3": "llama3 RoPE scaling (factor 8, low/high freq 1/4), GQA 4/2",
    "gpt_oss": "attention sinks, sliding window 8 / full alternating, yarn RoPE, MoE 4 experts top-2",
    "deepseek_v3": "MLA (q/kv LoRA, rope/nope split), yarn + mscale, first layer dense, "
                   "MoE 4 routed (2 groups, top-2) + 1 shared, sigmoid noaux_tc routing",
    "ministral3": "yarn RoPE, llama-4 attention scaling (beta 0.5) past 32 tokens, "
                  "sliding window 8 / full",
    "phi3": "longrope (su) RoPE, original 512 < max 2048, fused qkv, GQA 4/2",
    "gemma2": "attn (10) + final (2) logit softcapping, query_pre_attn_scalar, GQA 4/2, tied head, "
              "1+w norms",
    "gemma3": "sliding window 8 every other layer, local/global RoPE bases, linear RoPE scaling, "
              "qk-norm",
    "qwen2": "qkv bias, GQA 4/2",
    "qwen3": "qk-norm, GQA 4/2",
    "qwen3_moe": "qk-norm, MoE 4 experts top-2",
    "qwen3_next": "Gated DeltaNet + gated full attention (interval 2), partial RoPE, "
                  "MoE 4 top-2 + gated shared expert",
    "qwen3_5": "Gated DeltaNet + gated full attention (interval 2), partial mrope, text_config nesting",
    "lfm2": "short-conv + attention layers, qk-norm, auto-adjusted FFN, tied head",
    "mamba2": "SSM (8 heads, 2 groups, state 32, conv 4), gated RMSNorm",
    "granite4_h": "mamba2 + NoPE attention layers, MoE 4 top-2 + shared MLP, muP multipliers "
                  "(embedding 12, residual 0.22, logits / 4)",
    "falcon_h1": "parallel Mamba2 + attention in every layer (one CacheList per layer), muP multipliers",
    "olmo2": "q/k norm over full projections, post-norm blocks",
    "smollm3": "NoPE on every other layer (no_rope_layers [1, 0])",
    "glm4": "partial RoPE 0.5 (traditional), qkv bias, post attn/mlp norms, fused gate_up",
}

# Parameters mlx-lm initialises to zeros that would make a feature inert in a random model (the
# sinks all equal, DeepSeek's router scoring every expert the same), with the std to draw them at:
# router logits about unit-sized, so neither saturated sigmoids nor the bias decide the experts.
_ZERO_INIT = {"sinks": 1.0, "mlp.gate.weight": 0.125, "e_score_correction_bias": 0.1}
_EMBED = ("embed_tokens.weight", "embeddings.weight")
SCALE = 4.0  # input embedding and separate output head
# Input-embedding scales where 4 is wrong. Where the head is the embedding matrix (gemma2 and lfm2
# always tie), scaling it up let the input token's own embedding dominate the residual and greedy
# decoding repeated the last prompt token 24 times. Granite multiplies its embeddings by 12 (muP)
# and its layers' outputs by 0.22: at 4 the next token hung on the current token alone.
_EMBED_SCALE = {"gemma2": 0.125, "lfm2": 0.125, "granite4_h": 0.25}
# Random attention here was near uniform, so the next token hung mostly on the current one and greedy
# decoding cycled (A B A B, or one token 11 times): doubling queries and keys sharpens it.
_SHARPEN = {"glm4": ("q_proj.weight", "k_proj.weight"), "olmo2": ("q_norm.weight", "k_norm.weight")}


# Mamba heads start with A = -(1..heads): their state forgets a token within a few steps, so a
# wrong state after a prefix-cache hit hardly changed the logits. A = -0.05 keeps the past alive.
_SLOW_DECAY_A_LOG = -3.0


def build_family_model(name: str, seed: int = 0, overrides: dict | None = None):
    """The family's mlx-lm model with seeded random float32 weights, as `write_family_model`
    saves it, and its config (with `overrides` applied to the config's top level)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = json.loads(json.dumps(FAMILIES[name]))  # a deep copy: ModelArgs may mutate dicts
    config.update(overrides or {})
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Scale the embeddings and the output head up so random logits are well separated: greedy
    # comparisons between implementations then do not flip on float rounding (as in
    # tests/tiny_models.py write_tiny_llama; _EMBED_SCALE and _SHARPEN list the exceptions).
    weights = dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        v = v.astype(mx.float32)
        zero_init = [std for suffix, std in _ZERO_INIT.items() if k.endswith(suffix)]
        if zero_init and not mx.any(v).item():
            v = mx.random.normal(v.shape) * zero_init[0]
        if k.endswith(_EMBED):
            v = v * _EMBED_SCALE.get(name, SCALE)
        elif k.endswith("lm_head.weight"):
            v = v * SCALE
        elif k.endswith(_SHARPEN.get(name, ())):
            v = v * 2.0
        elif k.endswith("A_log"):
            v = mx.full(v.shape, _SLOW_DECAY_A_LOG)
        weights[k] = v
    model.load_weights(list(weights.items()))
    model.eval()
    mx.eval(model.parameters())
    return model, config


def write_family_model(name: str, out: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Write an mlx-lm model directory holding family `name`'s tiny random model with SmolLM2's
    tokenizer; `mlx_lm.load(str(out))` gives back exactly these weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model, config = build_family_model(name, seed, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    return out
