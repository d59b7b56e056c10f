"""The scheduler under random arrivals: every request is admitted and finishes, no step breaks
its budgets, and an idle scheduler never holds a waiting request back."""
from __future__ import annotations

import random

import pytest

from parallm.engine.scheduler import RunnerOutput, SampledToken, Scheduler, SchedulerConfig, Sequence
from parallm.engine.types import SamplingParams


@pytest.mark.parametrize("seed", range(12))
def test_random_arrivals_all_finish_within_budgets(seed):
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([16, 40, 100]),
                          kv_budget_tokens=rng.choice([200, 400, 10_000]))
    s = Scheduler(cfg)
    arrivals = {}
    for i in range(30):
        arrivals.setdefault(rng.randrange(60), []).append(i)
    added, finished = {}, set()
    step = 0
    while step < 5000 and (s.has_work() or step < 60):
        for i in arrivals.get(step, []):
            seq = Sequence(f"r{i}/0", f"r{i}", 0, list(range(1, rng.randrange(2, 60))),
                           SamplingParams(max_tokens=rng.randrange(1, 12)))
            s.add(seq)
            added[seq.request_id] = (step, seq)
        decoding_before = any(q.num_tokens - q.num_computed == 1 for q in s.running)
        out = s.schedule()
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(s.running) <= cfg.max_num_seqs
        assert s.kv_tokens_used() <= cfg.kv_budget_tokens
        if not decoding_before and s.waiting and not out.new_rows and not out.prefill and not out.decode:
            pytest.fail("an idle scheduler held a waiting request back")
        s.update(out, RunnerOutput({d.seq_id: SampledToken(7) for d in out.decode}))
        for seq in list(s.running):
            if len(seq.output_ids) >= seq.params.max_tokens and seq.num_computed == seq.num_tokens - 1:
                finished.add(seq.request_id)
                s.finish(seq)
        step += 1
    assert set(added) == finished, f"unfinished: {set(added) - finished}"
