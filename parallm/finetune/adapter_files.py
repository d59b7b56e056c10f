"""Writing adapter directories (mlx-lm's layout: adapters.safetensors + adapter_config.json)
so that a reader never sees a half-written one: everything goes into a temporary sibling
directory, is fsynced, and the directory is renamed into place."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TEMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter_dir(final: Path, weights: dict, config: dict) -> Path:
    """Write `weights` (name -> mx.array) and `config` as an adapter directory at `final`."""
    import mlx.core as mx

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        _fsync_path(tmp / name)
    _fsync_path(tmp)
    if final.exists():  # a step reached again after a resume: replace the old copy whole
        old = final.parent / f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(final.parent)
    return final


def is_complete_adapter_dir(path: Path) -> bool:
    path = Path(path)
    return (not path.name.startswith(TEMP_PREFIX) and (path / ADAPTER_WEIGHTS).is_file()
            and (path / ADAPTER_CONFIG).is_file())


def remove_temporaries(parent: Path) -> None:
    """Drop temporary directories left by a writer that was killed mid-write."""
    if Path(parent).is_dir():
        for p in Path(parent).glob(TEMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)
