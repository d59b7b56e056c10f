"""Bad model specs get a ModelLoadError naming the problem and what is accepted, and `parallm info`
exits non-zero with that message (no traceback)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import TOKENIZER_DIR
from models_gguf_helpers import gguf_metadata, gguf_tensors, save_with_mlx, write_raw_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bad_specs(tiny_model_dir, tmp_path_factory):
    """name -> (spec, words the message must contain)."""
    tmp = tmp_path_factory.mktemp("bad")
    specs = {"missing path": (str(tmp / "no-such-model"), ["no such file or directory", "Accepted"])}

    text = tmp / "notes.txt"
    text.write_text("hello, I am not a model\n")
    specs["not a model file"] = (str(text), ["not a model file", "Accepted"])

    fake = tmp / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip file")
    specs["not a gguf file"] = (str(fake), ["not a GGUF file", "Accepted"])

    no_config = tmp / "empty-dir"
    no_config.mkdir()
    specs["dir without config"] = (str(no_config), ["without config.json", "Accepted"])

    unknown = tmp / "unknown-arch"
    shutil.copytree(tiny_model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "made_up_transformer"
    (unknown / "config.json").write_text(json.dumps(config))
    specs["unknown architecture"] = (str(unknown), ["unknown architecture", "made_up_transformer", "llama"])

    truncated = tmp / "truncated-safetensors"
    shutil.copytree(tiny_model_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    specs["truncated safetensors"] = (str(truncated), ["truncated safetensors"])

    tensors, cfg = gguf_tensors(tiny_model_dir)
    md = gguf_metadata(cfg, TOKENIZER_DIR)
    good = save_with_mlx(tmp / "good.gguf", tensors, md)
    cut = tmp / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    specs["truncated gguf"] = (str(cut), ["truncated GGUF"])
    header_cut = tmp / "header-cut.gguf"
    header_cut.write_bytes(good.read_bytes()[:5000])
    specs["gguf cut inside its header"] = (str(header_cut), ["cut short"])

    iquant, _ = write_raw_gguf(tmp / "iquant.gguf", tensors, gguf_metadata(cfg, TOKENIZER_DIR, file_type="IQ2_XXS"),
                               "IQ2_XXS")
    specs["unsupported quant type"] = (str(iquant), ["IQ2_XXS", "Q4_K", "Q6_K"])

    other_arch = save_with_mlx(tmp / "phi.gguf", {"token_embd.weight": np.zeros((4, 32), np.float32)},
                               {"general.architecture": "phi9"})
    specs["unknown gguf architecture"] = (str(other_arch), ["phi9", "llama"])
    return specs


CASES = ["missing path", "not a model file", "not a gguf file", "dir without config", "unknown architecture",
         "truncated safetensors", "truncated gguf", "gguf cut inside its header", "unsupported quant type",
         "unknown gguf architecture"]


@pytest.mark.parametrize("case", CASES)
def test_load_raises_a_clear_error(case, bad_specs):
    from parallm.models import ModelLoadError, load

    spec, words = bad_specs[case]
    with pytest.raises(ModelLoadError) as info:
        load(spec, device="cpu")
    for word in words:
        assert word in str(info.value), f"{case}: {word!r} not in {info.value}"


@pytest.mark.parametrize("case", CASES)
def test_info_command_exits_non_zero(case, bad_specs, capsys):
    from parallm.cli import main

    spec, words = bad_specs[case]
    assert main(["info", spec, "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert words[0] in err and "Traceback" not in err


def test_python_m_parallm_info_exits_non_zero(bad_specs):
    spec, words = bad_specs["unsupported quant type"]
    proc = subprocess.run([sys.executable, "-m", "parallm", "info", spec], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "IQ2_XXS" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_device_is_rejected():
    from parallm.models import ModelLoadError, load

    with pytest.raises(ModelLoadError, match="accepted: auto, gpu, cpu"):
        load(None, device="tpu")
