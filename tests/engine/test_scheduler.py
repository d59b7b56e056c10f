"""Scheduler bookkeeping without a model."""
from __future__ import annotations

from parallm.engine.scheduler import (PLACEHOLDER, RunnerOutput, SampledToken, Scheduler, SchedulerConfig,
                                      Sequence)
from parallm.engine.types import SamplingParams


def seq(name: str, prompt_len: int, max_tokens: int = 50) -> Sequence:
    return Sequence(f"{name}/0", name, 0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def fake_run(s: Scheduler, out) -> None:
    s.update(out, RunnerOutput({d.seq_id: SampledToken(7) for d in out.decode}))


def test_decode_first_then_chunked_prefill_within_token_budget():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10))
    a = seq("a", 3)
    s.add(a)
    out = s.schedule()  # a: prefill 2 + decode its last prompt token
    assert [len(c.token_ids) for c in out.prefill] == [2] and [d.seq_id for d in out.decode] == ["a/0"]
    fake_run(s, out)
    long = seq("long", 40)
    s.add(long)
    steps = 0
    while long.num_computed < 39:
        before = long.num_computed
        out = s.schedule()
        # the running stream decodes every step; the long prompt gets what is left of the budget
        assert out.decode[0].seq_id == "a/0" and out.num_batched_tokens <= 10
        assert sum(len(c.token_ids) for c in out.prefill) == min(9, 39 - before)
        fake_run(s, out)
        steps += 1
    assert steps == 5  # 39 prompt tokens at <= 9 per step
    assert PLACEHOLDER not in a.output_ids and a.output_ids.count(7) == steps + 1


def test_lowest_free_slot_and_preempt_newest():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=100, kv_budget_tokens=30))
    seqs = [seq(n, 8) for n in "abc"]
    for x in seqs:
        s.add(x)
    out = s.schedule()
    assert [r.slot for r in out.new_rows] == [0, 1, 2]
    fake_run(s, out)  # 3 x 8 = 24 tokens held
    for _ in range(3):  # 27, 30, then 33 > 30 forces preemption of the newest ("c")
        fake_run(s, s.schedule())
    assert s.num_preemptions >= 1 and seqs[2] in s.waiting and seqs[2].num_computed == 0
    assert seqs[0].is_running and seqs[1].is_running
    s.finish(seqs[0])
    out = s.schedule()
    assert 0 in out.freed_slots
    assert seqs[2].slot == 0  # re-admitted into the lowest free slot, recomputing prompt + outputs
    assert out.new_rows[0].generated_ids == [t for t in seqs[2].output_ids if t != PLACEHOLDER][: len(out.new_rows[0].generated_ids)]


def test_no_decode_beyond_max_tokens():
    s = Scheduler(SchedulerConfig())
    a = seq("a", 4, max_tokens=2)
    s.add(a)
    for _ in range(5):
        fake_run(s, s.schedule())
    assert a.output_ids == [7, 7]


def _admitted(out) -> list[str]:
    return [r.seq_id.split("/")[0] for r in out.new_rows]


