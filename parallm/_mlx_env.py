"""MLX settings parallm changes from MLX's defaults, set in the environment before MLX reads them.

MLX_PTX_CACHE_DIR (CUDA build): MLX compiles its CUDA kernels at run time (NVRTC) and keeps the
results on disk, by default under the system temp dir (/tmp/mlx/<version>/ptx). What that cache is
worth, measured on an H200 with a 1B model (BENCHMARKS.md, "kernel cache"): the engine warm-up of
the first process on a machine to run the engine at a model's shapes took 68-91 s, and 1.5 s in a
later process once the kernels were on disk. /tmp is emptied at reboot on many systems (or is a
tmpfs), and a /tmp/mlx made by another user is not writable for a service's user, so a server
would pay the first number again after every reboot. parallm points the cache at the user's cache
dir instead ($XDG_CACHE_HOME or ~/.cache, then parallm/mlx-ptx/<mlx version>: compiled kernels are
only valid for the MLX version that made them, which is why MLX's own default has the version in
it too).

Only where MLX's CUDA build is installed (the `mlx_cuda*` package beside `mlx`; the CPU and Metal
builds compile no PTX), only if unset (a user's value wins), and only if the directory can be
made; otherwise MLX keeps its default.

This module must never import mlx: it runs before the first `import mlx` (parallm/__init__.py).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from typing import MutableMapping, Optional

PTX_CACHE_VAR = "MLX_PTX_CACHE_DIR"


def _mlx_dist_infos(prefix: str) -> list[str]:
    """Names of the `<prefix>*.dist-info` dirs beside the mlx package, without importing mlx."""
    spec = importlib.util.find_spec("mlx")  # locates the package; does not run it
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for location in spec.submodule_search_locations:
        found += [os.path.basename(p) for p in glob.glob(os.path.join(os.path.dirname(location), prefix + "*.dist-info"))]
    return found


def installed_mlx_version() -> Optional[str]:
    """MLX's version from its dist-info directory (None if not found)."""
    for name in _mlx_dist_infos("mlx-"):
        return name[len("mlx-"):-len(".dist-info")]
    return None


def cuda_build_installed() -> bool:
    """Whether MLX's CUDA backend package (mlx_cuda_12, mlx_cuda_13, ...) is installed."""
    return bool(_mlx_dist_infos("mlx_cuda"))


def ptx_cache_dir(environ: MutableMapping[str, str], version: str) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parallm" / "mlx-ptx" / version


def apply_mlx_defaults(environ: MutableMapping[str, str] = os.environ, cuda: Optional[bool] = None,
                       version: Optional[str] = None) -> dict[str, str]:
    """Set the defaults above that the environment does not set; returns what was set.
    `cuda` / `version`: None finds them from the installed packages."""
    if PTX_CACHE_VAR in environ or not (cuda_build_installed() if cuda is None else cuda):
        return {}
    version = version or installed_mlx_version()
    if version is None:
        return {}
    path = ptx_cache_dir(environ, version)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: MLX's temp-dir default is better than no cache
        return {}
    environ[PTX_CACHE_VAR] = str(path)
    return {PTX_CACHE_VAR: str(path)}
