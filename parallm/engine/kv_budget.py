"""The default KV budget: how many bytes of K/V all running sequences may hold together.

A fixed 2 GiB starves a large GPU: an 8B model's K/V costs 128 KiB per token, so 2 GiB holds 16k
tokens, fewer than 128 sequences of 200 tokens, and the scheduler then preempts and recomputes
sequences that would have fit many times over. On a GPU the default is therefore a share of the
memory the loaded model leaves free (as vLLM's gpu_memory_utilization); on the CPU, where memory
is shared with everything else on the machine, it stays 2 GiB. A setting always wins.
"""
from __future__ import annotations

CPU_DEFAULT_BYTES = 2 << 30
GPU_FREE_SHARE = 0.5  # of the device memory not held by the model when the engine starts


def default_kv_budget_bytes() -> int:
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return CPU_DEFAULT_BYTES
    info = mx.device_info()
    # Metal reports how much the GPU may use of unified memory; CUDA the card's memory
    total = next((int(info[k]) for k in ("max_recommended_working_set_size", "memory_size", "total_memory")
                  if info.get(k)), 0)
    free = total - mx.get_active_memory()
    return max(CPU_DEFAULT_BYTES, int(free * GPU_FREE_SHARE))
