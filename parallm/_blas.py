"""Preload an optimized BLAS for MLX's CPU backend on Linux, before mlx is imported.

The Linux mlx wheel links a reference BLAS (about 4 GFLOP/s for sgemm here). Loading OpenBLAS first
with RTLD_GLOBAL makes the dynamic linker resolve MLX's `cblas_sgemm` & co. to OpenBLAS instead
(about 12x faster for f32 matmul on a 2-core box, identical results): BENCHMARKS.md, "CPU: BLAS and
dequantization". This only works if it happens before the
first `import mlx` in the process, which is why parallm/__init__.py calls `preload_blas()`.

PARALLM_BLAS selects the behaviour: `auto` (default; the first candidate that loads), `none` (keep
the wheel's BLAS), or a path to a BLAS shared library.

This module must stay cheap to import and must never import mlx. It keeps no state: which BLAS is
in use is read back from the process's memory map (`blas_in_use`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("parallm.blas")

ENV_VAR = "PARALLM_BLAS"

# Debian/Ubuntu's libopenblas0-pthread (and -openmp / -serial), amd64 and arm64.
_SYSTEM_CANDIDATES = [
    f"/usr/lib/{triple}/{flavour}/libopenblas.so.0"
    for triple in ("x86_64-linux-gnu", "aarch64-linux-gnu")
    for flavour in ("openblas-pthread", "openblas-openmp", "openblas-serial")
]


def blas_candidates() -> list[Path]:
    """Libraries `auto` tries, in order: PyPI's cmeel-openblas (a dependency), then the system's."""
    found = []
    for entry in sys.path:
        if entry:
            found.append(Path(entry) / "cmeel.prefix" / "lib" / "libopenblas.so.0")
    found += [Path(p) for p in _SYSTEM_CANDIDATES]
    return [p for p in dict.fromkeys(found) if p.is_file()]


def _mlx_already_imported() -> bool:
    return "mlx" in sys.modules or "mlx.core" in sys.modules


def preload_blas(setting: str | None = None) -> str | None:
    """Load an optimized BLAS globally if we are on Linux and mlx is not imported yet.

    Returns the path loaded, or None when nothing was loaded (not Linux, disabled, none found, or
    too late). Never raises: a failed preload only costs speed."""
    if not sys.platform.startswith("linux"):
        return None
    setting = (setting if setting is not None else os.environ.get(ENV_VAR, "auto")).strip() or "auto"
    if setting.lower() == "none":
        logger.debug("%s=none: keeping the BLAS that the mlx wheel links", ENV_VAR)
        return None
    if _mlx_already_imported():
        # Too late: MLX's BLAS symbols are already bound. Loading now would change nothing.
        logger.warning("mlx was imported before parallm; cannot preload an optimized BLAS")
        return None
    candidates = [Path(setting)] if setting.lower() != "auto" else blas_candidates()
    for path in candidates:
        problem = _cannot_run_here(path)
        if problem:
            logger.info("not using BLAS %s: %s", path, problem)
            continue
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            logger.warning("could not load BLAS %s: %s", path, e)
            continue
        logger.debug("preloaded BLAS %s", path)
        return str(path)
    if setting.lower() == "auto":
        logger.debug("no optimized BLAS found; MLX's CPU backend uses the wheel's own BLAS")
    return None


# OpenBLAS kernels built for one core (not DYNAMIC_ARCH) use that core's instructions
# unconditionally: core name -> /proc/cpuinfo flag it needs. cmeel-openblas 0.3.31's x86_64 wheel
# is built for SKYLAKEX, and dies with SIGILL on CPUs without AVX-512 (seen on an AMD EPYC VM).
_CORE_NEEDS_FLAG = {
    "SKYLAKEX": "avx512f", "COOPERLAKE": "avx512f", "SAPPHIRERAPIDS": "avx512f",
    "HASWELL": "avx2", "ZEN": "avx2", "SANDYBRIDGE": "avx",
    "A64FX": "sve", "NEOVERSEV1": "sve", "NEOVERSEV2": "sve",
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cannot_run_here(path: Path) -> str | None:
    """Why this OpenBLAS would crash on this CPU, or None. Probes the library with RTLD_LOCAL and
    closes it again, so a rejected library leaves no symbols behind."""
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except OSError as e:
        return str(e)
    try:
        get_config = getattr(lib, "openblas_get_config", None)
        if get_config is None:
            return None  # not OpenBLAS: nothing to check
        get_config.restype = ctypes.c_char_p
        config = get_config().decode(errors="replace")
        if "DYNAMIC_ARCH" in config:
            return None  # picks its kernels at run time for the CPU it finds
        needs = {flag for core, flag in _CORE_NEEDS_FLAG.items() if f" {core}" in f" {config.upper()}"}
        missing = needs - _cpu_flags()
        if missing:
            return f"built for one CPU type ({config}) that needs {', '.join(sorted(missing))}, which this CPU lacks"
        return None
    finally:
        import _ctypes
        _ctypes.dlclose(lib._handle)


def blas_in_use() -> str:
    """A one-line description of the BLAS that MLX's CPU backend calls in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    openblas = sorted(p for p in libs if "libopenblas" in Path(p).name)
    if openblas:
        return f"OpenBLAS ({openblas[0]})"
    wheel = sorted(p for p in libs if Path(p).name.startswith("libblas"))
    if wheel:
        return f"reference BLAS bundled with mlx ({wheel[0]}); slow, see PARALLM_BLAS"
    return "not loaded yet (mlx not imported)"
