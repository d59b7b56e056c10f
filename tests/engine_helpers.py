"""Helpers shared by the engine tests."""
from __future__ import annotations


def reference_greedy(loaded: TinyLoaded, prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own single-sequence generation, greedy."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), loaded.model, max_tokens=max_tokens,
                                  sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(token))
    return out


def make_prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + j * 104729) % 49000 + 100 for j in range(length)]


def run_to_completion(engine, requests_by_step: dict[int, list], max_steps: int = 10_000) -> dict:
    """Add requests at given step numbers, step until idle; returns request_id -> list of outputs."""
    outputs: dict[str, list] = {}
    step = 0
    while step < max_steps and (engine.has_unfinished() or any(s >= step for s in requests_by_step)):
        for req in requests_by_step.get(step, []):
            engine.validate(req)
            engine.add_request(req)
        for o in engine.step().outputs:
            outputs.setdefault(o.request_id, []).append(o)
        step += 1
    assert not engine.has_unfinished(), "engine did not finish"
    return outputs


def tokens_of(outputs: list, index: int = 0) -> list[int]:
    return [t for o in outputs if o.index == index for t in o.token_ids]
