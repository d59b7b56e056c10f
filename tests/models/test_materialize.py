"""materialize: every array a model holds is evaluated, the private ones (scaled RoPE's `_freqs`)
included, so a model loaded on one thread runs on another."""
from __future__ import annotations

import json
import threading

import mlx.core as mx

from parallm.models import load
from parallm.models.materialize import arrays_held
from tiny_models import write_tiny_llama


def write_llama3_rope(path):
    write_tiny_llama(path)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_private_arrays_are_found(tmp_path):
    loaded = load(str(write_llama3_rope(tmp_path / "m")), device="cpu")
    rope = loaded.model.model.layers[0].self_attn.rope
    assert any(a is rope._freqs for a in arrays_held(loaded.model))


def test_a_model_loaded_here_runs_on_another_thread(tmp_path):
    loaded = load(str(write_llama3_rope(tmp_path / "m")), device="cpu")
    result = {}

    def run():
        try:
            logits = loaded.model(mx.array([[1, 2, 3]]))
            mx.eval(logits)
            result["shape"] = logits.shape
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "error" not in result, result
    assert result["shape"][:2] == (1, 3)
