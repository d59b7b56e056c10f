"""StopMatcher: stop strings are never emitted, even in part, however the text is split."""
from __future__ import annotations

import random

import pytest

from parallm.engine.stop import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    emitted, result = [], None
    for piece in pieces:
        result = m.feed(piece)
        emitted.append(result.emit)
        if result.stopped:
            return "".join(emitted), result.stop, m
    return "".join(emitted) + m.flush(), None, m


def reference(stops, text):
    """Text before the stop occurrence that ends first (longest among those ending together)."""
    best = None  # (end, -len, stop)
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop)
        if i >= 0:
            cand = (i + len(stop), -len(stop), stop)
            best = cand if best is None or cand < best else best
    if best is None:
        return text, None
    end, neg_len, stop = best
    return text[: end + neg_len], stop


def all_splits(text, rng, n=30):
    yield [text]
    yield list(text)
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 5))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("stops,text", [
    (("END",), "hello world END and more"),
    (("\n\n",), "line one\nline two\n\nnext"),
    (("abcd", "bc"), "xxabcdyy"),  # the shorter stop ends first
    (("aab",), "aaaab tail"),  # overlapping partial matches
    (("abab", "bab"), "xababab"),
    (("stop", "top"), "nonstop"),
    (("<|im_end|>", "Human:"), "Sure! <|im_end"),  # a prefix at the end: released by flush
    (("😀x",), "smile 😀 😀x done"),
    (("zzz",), "no stop here at all"),
])
def test_matches_reference_for_every_split(stops, text):
    rng = random.Random(0)
    want_text, want_stop = reference(stops, text)
    for pieces in all_splits(text, rng):
        got_text, got_stop, _ = run(stops, pieces)
        assert (got_text, got_stop) == (want_text, want_stop), pieces


def test_partial_prefix_is_held_back_until_decided():
    m = StopMatcher(("STOP",))
    assert m.feed("abc ST").emit == "abc "
    assert m.held_text == "ST"
    r = m.feed("O")
    assert r.emit == "" and not r.stopped
    r = m.feed("RM")  # not a stop after all: everything held comes out
    assert r.emit == "STORM" and not r.stopped
    assert m.held_text == ""


def test_nothing_after_a_stop_and_flush_after_stop_is_empty():
    m = StopMatcher(("x",))
    r = m.feed("abxcd")
    assert (r.emit, r.stopped, r.stop) == ("ab", True, "x")
    assert m.feed("more").emit == "" and m.feed("more").stopped
    assert m.flush() == ""


def test_no_stops_passes_text_through():
    m = StopMatcher(())
    assert m.feed("anything").emit == "anything"
    assert m.flush() == ""
    assert StopMatcher(("",)).feed("abc").emit == "abc"  # empty stop strings are ignored


def test_many_stop_strings_hold_back_at_most_longest_minus_one():
    rng = random.Random(1)
    alphabet = "abcdef"
    stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(6, 12))) for _ in range(1000))
    longest = max(map(len, stops))
    text = "".join(rng.choice(alphabet + " ") for _ in range(3000))
    want_text, want_stop = reference(stops, text)
    assert len(want_text) > 100  # a long stretch of partial matches before any stop
    m = StopMatcher(stops)
    emitted = []
    for ch in text:
        r = m.feed(ch)
        emitted.append(r.emit)
        assert len(m.held_text) <= longest - 1
        if r.stopped:
            break
    got = "".join(emitted) + ("" if m.stopped else m.flush())
    assert (got, m.stop) == (want_text, want_stop)
