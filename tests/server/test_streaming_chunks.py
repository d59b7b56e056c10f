"""The streaming chunk writer's fast path gives the same JSON as the general one, and coalesce
hands a lone output through unchanged."""
from __future__ import annotations

import json

import pytest

from parallm.engine.types import RequestOutput
from parallm.server.streaming import ChunkWriter, coalesce

TEXTS = ["", "hello", ' "quoted" \\ back\nslash', "héllo wörld 你好 🙂", "\u0000\u001f"]


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("text", TEXTS + [None])
@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
def test_text_chunk_is_the_general_chunk(kind, text, finish_reason):
    writer = ChunkWriter("id-\"1\"", "model/with \"quotes\"", kind)
    fast = writer.text_chunk(3, text, finish_reason)
    general = writer.chunk([writer.choice(3, text, finish_reason)])
    assert json.loads(fast) == json.loads(general)
    assert "\\u" not in fast or text == "\u0000\u001f"  # non-ASCII text goes out as UTF-8, as before


def test_coalesce_passes_a_lone_output_through_and_merges_several():
    one = RequestOutput("r", index=1, text="a", token_ids=[5])
    assert coalesce([(2, one)], n=2) == [(5, one)]
    assert coalesce([(2, one)], n=2)[0][1] is one
    more = RequestOutput("r", index=1, text="b", token_ids=[6], finish_reason="stop")
    merged = coalesce([(0, one), (0, more)], n=2)
    assert len(merged) == 1 and merged[0][0] == 1
    assert merged[0][1].text == "ab" and merged[0][1].token_ids == [5, 6] and merged[0][1].finish_reason == "stop"
    assert one.text == "a" and one.token_ids == [5]  # the inputs are not changed by merging
