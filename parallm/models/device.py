"""Choose where MLX computes: `auto` (the GPU when MLX has one: Metal or CUDA), `gpu`, or `cpu`."""
from __future__ import annotations

from parallm.models.load_errors import ModelLoadError

DEVICES = ("auto", "gpu", "cpu")


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when this MLX build can run on a GPU here, else None."""
    import mlx.core as mx

    metal = getattr(mx, "metal", None)
    try:
        if metal is not None and metal.is_available():
            return "metal"
    except Exception:  # a CPU-only build may ship the module without a working backend
        pass
    cuda = getattr(mx, "cuda", None)
    try:
        if cuda is not None and cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return None


def computing_on_cuda() -> bool:
    """True when MLX's default device is a CUDA GPU (where parallm's CUDA kernels apply)."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu and gpu_backend() == "cuda"


def select_device(device: str = "auto") -> str:
    """Set MLX's default device and return 'gpu' or 'cpu'."""
    import mlx.core as mx

    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; accepted: {', '.join(DEVICES)}")
    backend = gpu_backend()
    if device == "gpu" and backend is None:
        raise ModelLoadError(
            "device 'gpu' was asked for but this MLX build has no GPU here (no Metal, no CUDA). "
            "Accepted: 'cpu', or 'auto' to use the GPU only when there is one. On Linux with an "
            "NVIDIA GPU, install parallm's `cuda` extra (mlx[cuda13]).")
    chosen = "gpu" if device == "gpu" or (device == "auto" and backend) else "cpu"
    mx.set_default_device(mx.gpu if chosen == "gpu" else mx.cpu)
    return chosen


def describe_device(chosen: str) -> str:
    backend = gpu_backend() if chosen == "gpu" else None
    return f"gpu ({backend})" if backend else "cpu"
