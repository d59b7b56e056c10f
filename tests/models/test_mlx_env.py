"""parallm sets MLX's CUDA graph cache size (see parallm/_mlx_env.py) unless the user set it."""
from __future__ import annotations

import os
import subprocess
import sys

from parallm._mlx_env import DEFAULTS, apply_mlx_defaults


def test_unset_variables_get_parallm_defaults():
    env = {}
    assert apply_mlx_defaults(env) == DEFAULTS
    assert env["MLX_CUDA_GRAPH_CACHE_SIZE"] == "2000"


def test_a_users_value_is_kept():
    env = {"MLX_CUDA_GRAPH_CACHE_SIZE": "50"}
    assert apply_mlx_defaults(env) == {}
    assert env["MLX_CUDA_GRAPH_CACHE_SIZE"] == "50"


def test_importing_parallm_sets_it_before_mlx_loads():
    code = ("import os, sys; import parallm; assert 'mlx' not in sys.modules; "
            "print(os.environ['MLX_CUDA_GRAPH_CACHE_SIZE'])")
    env = {k: v for k, v in os.environ.items() if k != "MLX_CUDA_GRAPH_CACHE_SIZE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == DEFAULTS["MLX_CUDA_GRAPH_CACHE_SIZE"]
