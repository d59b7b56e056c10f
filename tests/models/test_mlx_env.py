"""parallm points MLX's CUDA kernel cache at the user's cache dir (parallm/_mlx_env.py)."""
from __future__ import annotations

import os
import subprocess
import sys

from parallm._mlx_env import PTX_CACHE_VAR, apply_mlx_defaults, cuda_build_installed, installed_mlx_version


def test_a_cuda_build_gets_a_versioned_cache_dir_under_xdg_cache_home(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    applied = apply_mlx_defaults(env, cuda=True, version="9.9.9")
    want = tmp_path / "parallm" / "mlx-ptx" / "9.9.9"
    assert applied == {PTX_CACHE_VAR: str(want)} and env[PTX_CACHE_VAR] == str(want)
    assert want.is_dir()


def test_a_users_value_and_non_cuda_builds_are_left_alone(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), PTX_CACHE_VAR: "/somewhere/else"}
    assert apply_mlx_defaults(env, cuda=True, version="1.0") == {}
    assert env[PTX_CACHE_VAR] == "/somewhere/else"
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert apply_mlx_defaults(env, cuda=False, version="1.0") == {} and PTX_CACHE_VAR not in env
    assert not (tmp_path / "parallm").exists()


def test_an_unwritable_cache_root_keeps_mlxs_default(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {"XDG_CACHE_HOME": str(blocker)}
    assert apply_mlx_defaults(env, cuda=True, version="1.0") == {}
    assert PTX_CACHE_VAR not in env


def test_the_packages_are_read_without_importing_mlx():
    code = ("import sys; from parallm._mlx_env import installed_mlx_version as v, cuda_build_installed as c; "
            "print(v(), c()); assert 'mlx.core' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import mlx.core as mx
    assert out.stdout.split() == [mx.__version__, str(cuda_build_installed())]
    assert installed_mlx_version() == mx.__version__
    if mx.default_device() == mx.gpu and not mx.metal.is_available():  # computing on CUDA
        assert cuda_build_installed()


def test_importing_parallm_sets_it_before_mlx_loads_on_a_cuda_build(tmp_path):
    code = ("import os, sys; import parallm; assert 'mlx.core' not in sys.modules; "
            f"print(os.environ.get({PTX_CACHE_VAR!r}, 'unset'))")
    env = {k: v for k, v in os.environ.items() if k != PTX_CACHE_VAR}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if cuda_build_installed():
        assert out.stdout.strip().startswith(str(tmp_path / "parallm" / "mlx-ptx"))
    else:
        assert out.stdout.strip() == "unset"
