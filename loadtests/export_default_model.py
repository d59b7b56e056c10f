"""Write the default model (SmolLM2-135M-Instruct from its Q4_1 GGUF), dequantized to float32, as an
mlx-lm directory, so that mlx_lm.server and parallm can serve the very same f32 weights:

  python loadtests/export_default_model.py loadtests/out/smollm2-f32
  python loadtests/bench_serving.py --compare --model loadtests/out/smollm2-f32
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's parallm, not an installed one


def export(out: Path) -> Path:
    import mlx.core as mx
    import mlx.nn as nn

    from parallm.models import load

    loaded = load(None, device="cpu")  # dequantized and cast to float32 for the CPU
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(nn.utils.tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {k: v for k, v in loaded.config.items()}
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    hf_tokenizer = getattr(loaded.tokenizer, "_tokenizer", loaded.tokenizer)
    hf_tokenizer.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "loadtests/out/smollm2-f32")
    print(export(target))
