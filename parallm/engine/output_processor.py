"""OutputProcessor: turns sampled tokens into RequestOutputs, and knows when a request is done.

The engine's step hands it what the scheduler confirmed this step (sequence, sampled token); per
token it detokenizes (ChoiceOutput: text deltas, stop strings, EOS, max_tokens), renders logprobs,
and closes a choice when it finishes. A request ends once all of its n choices have: its last
output carries `finished`, the usage and the timings.

Invariants
- Every request that was added gets exactly one output with `finished=True`, through `process`
  (all choices finished) or `abort`.
- A finished choice leaves the scheduler at once (`finish_sequence`), so its row is freed at the
  next step; the request's adapter reference is released when its last choice closes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from parallm.engine.choice_output import ChoiceOutput
from parallm.engine.detokenizer import TokenDecoder, render_bytes
from parallm.engine.scheduler import SampledToken, SchedulerOutput, Sequence
from parallm.engine.types import EngineRequest, RequestOutput, RequestTimes, TokenLogprob, TopLogprob, Usage


@dataclass
class _RequestState:
    request: EngineRequest
    seqs: list[Sequence]
    choices: list[ChoiceOutput]
    times: RequestTimes
    num_done: int = 0
    completion_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_ids: set[int], finish_sequence: Callable[[Sequence], None],
                 release_adapter: Optional[Callable[[str], None]] = None):
        self.tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._finish_sequence = finish_sequence  # the scheduler forgets it and frees its row
        self._release_adapter = release_adapter
        self._requests: dict[str, _RequestState] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: EngineRequest, seqs: list[Sequence]) -> None:
        choices = [ChoiceOutput(request.sampling, self.tokenizer, self._eos_ids) for _ in seqs]
        self._requests[request.request_id] = _RequestState(request, seqs, choices,
                                                           RequestTimes(arrival=request.arrival_time))

    def process(self, scheduled: SchedulerOutput, new_tokens: list[tuple[Sequence, SampledToken]]) -> list[RequestOutput]:
        """The outputs of one step: `new_tokens` as the scheduler confirmed them."""
        now = time.monotonic()
        for row in scheduled.new_rows:
            state = self._requests.get(row.seq_id.rsplit("/", 1)[0])
            if state is not None and state.times.first_scheduled is None:
                state.times.first_scheduled = now
        outputs: list[RequestOutput] = []
        for seq, sampled in new_tokens:
            state = self._requests.get(seq.request_id)
            if state is None:
                continue
            if state.times.first_token is None:
                state.times.first_token = now
            delta = state.choices[seq.index].add(sampled.token_id)
            state.completion_tokens += 1
            out = RequestOutput(seq.request_id, seq.index, delta.text, [sampled.token_id],
                                self._logprobs(seq, sampled), delta.finish_reason, delta.stop_reason)
            if delta.finish_reason is not None:
                self._finish_sequence(seq)
                out = self._close_choice(state, seq, out)
            outputs.append(out)
        return outputs

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Final outputs (finish_reason "abort") for the request's choices still open."""
        state = self._requests.get(request_id)
        if state is None:
            return []
        outputs = []
        for seq, choice in zip(state.seqs, state.choices):
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                outputs.append(self._close_choice(state, seq, RequestOutput(request_id, seq.index,
                                                                            finish_reason="abort")))
        return outputs

    def _close_choice(self, state: _RequestState, seq: Sequence, out: RequestOutput) -> RequestOutput:
        state.num_done += 1
        if state.num_done == len(state.seqs):
            state.times.finished = time.monotonic()
            out.finished = True
            out.usage = Usage(len(state.request.prompt_token_ids), state.completion_tokens,
                              max(s.num_cached for s in state.seqs))
            out.times = state.times
            del self._requests[seq.request_id]
            if state.request.adapter is not None and self._release_adapter is not None:
                self._release_adapter(state.seqs[0].adapter)
        return out

    def _logprobs(self, seq: Sequence, sampled: SampledToken) -> Optional[list[TokenLogprob]]:
        if not seq.params.logprobs or sampled.logprob is None:
            return None
        # a token's text alone: a partial UTF-8 character (one byte of an emoji) is written
        # 'bytes:\\xf0\\x9f' as OpenAI does, not decoded to U+FFFD, and its bytes go along as they are
        decoder = TokenDecoder.for_tokenizer(self.tokenizer)
        top = []
        for token_id, logprob in sampled.top or []:
            raw = decoder.token_raw(token_id)
            top.append(TopLogprob(token_id, render_bytes(raw), logprob, raw))
        raw = decoder.token_raw(sampled.token_id)
        return [TokenLogprob(sampled.token_id, render_bytes(raw), sampled.logprob, top, raw)]
