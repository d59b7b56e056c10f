"""fix_for_batching(model): adapt model code that is right for one sequence but wrong for a batch
whose rows sit at different positions.

Gemma 2 groups its queries as [B, kv_heads, repeats, N, D] and applies the mask to scores of that
shape. A single sequence's mask is [N, kv] and broadcasts; a batch's per-row mask [B, 1, N, kv]
lines its batch axis up with kv_heads instead: wrong text when B equals the number of KV heads, a
shape error otherwise (mlx-lm's own BatchGenerator has the same fault). The fix gives the mask the
missing repeats axis before the model's own attention runs.
"""
from __future__ import annotations

from typing import Any


def fix_for_batching(model: Any) -> list[str]:
    """Apply every fix that concerns `model`, in place. Returns what was done, for logs."""
    done = []
    fixed = _gemma2_masks(model)
    if fixed:
        done.append(f"Gemma 2 attention masks given a repeats axis in {fixed} layers")
    return done


def _gemma2_masks(model: Any) -> int:
    try:
        from mlx_lm.models import gemma2
    except ImportError:  # pragma: no cover - an mlx-lm without Gemma 2
        return 0
    fixed = 0
    for module in model.modules():
        if type(module) is gemma2.Attention and module.repeats > 1:
            module.__class__ = _BatchedGemma2Attention
            fixed += 1
    return fixed


def _make_batched_gemma2_attention():
    from mlx_lm.models import gemma2

    class BatchedGemma2Attention(gemma2.Attention):
        def __call__(self, x, mask=None, cache=None):
            if mask is not None and not isinstance(mask, str) and mask.ndim == 4:
                mask = mask[:, :, None]  # [B, 1, N, kv] -> [B, 1, 1, N, kv]
            return super().__call__(x, mask=mask, cache=cache)

    return BatchedGemma2Attention


try:
    _BatchedGemma2Attention = _make_batched_gemma2_attention()
except ImportError:  # pragma: no cover
    _BatchedGemma2Attention = None
