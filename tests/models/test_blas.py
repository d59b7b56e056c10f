"""BLAS preloading: importing parallm is cheap and does not import mlx; PARALLM_BLAS=none keeps the
wheel's BLAS; auto picks an OpenBLAS that can run on this CPU; results do not change."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import parallm, sys; assert 'mlx' not in sys.modules; import mlx.core as mx; "
         "from parallm._blas import blas_in_use; mx.random.seed(0); a = mx.random.normal((64, 64)); "
         "print(blas_in_use()); print(float((a @ a).sum()))")


def run_probe(setting: str) -> list[str]:
    env = {**os.environ, "PARALLM_BLAS": setting}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_preload_selects_openblas_and_keeps_results():
    from parallm._blas import blas_candidates

    wheel_blas, wheel_sum = run_probe("none")
    assert "OpenBLAS" not in wheel_blas
    auto_blas, auto_sum = run_probe("auto")
    if not blas_candidates():
        pytest.skip("no OpenBLAS installed here")
    assert auto_blas.startswith("OpenBLAS")
    assert abs(float(auto_sum) - float(wheel_sum)) <= 1e-3 * max(1.0, abs(float(wheel_sum)))


def test_a_bad_path_keeps_the_wheel_blas_without_crashing():
    blas, _ = run_probe("/no/such/libopenblas.so.0")
    assert "OpenBLAS" not in blas


def test_single_core_openblas_is_refused_on_a_cpu_without_its_instructions(monkeypatch):
    """cmeel-openblas's x86_64 build is SKYLAKEX-only and dies with SIGILL on CPUs without AVX-512;
    such builds must be refused when the CPU lacks the flag they need."""
    import ctypes

    from parallm import _blas

    single_core = []
    for path in _blas.blas_candidates():
        lib = ctypes.CDLL(str(path))
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        if "DYNAMIC_ARCH" not in config and any(c in config.upper() for c in _blas._CORE_NEEDS_FLAG):
            single_core.append(path)
    if not single_core:
        pytest.skip("no single-core OpenBLAS build installed")
    monkeypatch.setattr(_blas, "_cpu_flags", lambda: set())
    assert "lacks" in _blas._cannot_run_here(single_core[0])
    monkeypatch.setattr(_blas, "_cpu_flags", lambda: {"avx", "avx2", "avx512f", "sve"})
    assert _blas._cannot_run_here(single_core[0]) is None
