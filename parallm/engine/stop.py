"""StopMatcher: find stop strings in streamed text without ever emitting one, even in part.

Matching is an Aho-Corasick automaton over characters, built once per request: each character
fed costs a few dict lookups whatever the number of stop strings, and the state carries over
between `feed` calls, so stops that span token boundaries need no re-scan.

Invariants:
- held-back text is exactly the longest suffix of the text so far that is a proper prefix of
  some stop string (so at most max(len(stop)) - 1 characters);
- the text before a stop is the text up to the start of the occurrence that ENDS first (the
  longest one among those ending at the same character). That choice does not depend on how
  the text was split into feeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class StopResult:
    emit: str  # text that is now final and free of any stop string
    stopped: bool  # a stop string was found; nothing after it is ever emitted
    stop: Optional[str] = None  # which stop string ended the text


class _Automaton:
    """Trie of the stop strings plus failure links (Aho-Corasick)."""

    def __init__(self, stops: Iterable[str]):
        self.goto: list[dict[str, int]] = [{}]
        self.fail: list[int] = [0]
        self.depth: list[int] = [0]
        self.match: list[Optional[str]] = [None]  # longest stop ending at this state (via fail chain)
        for stop in stops:
            self._insert(stop)
        self._link()

    def _insert(self, stop: str) -> None:
        state = 0
        for ch in stop:
            nxt = self.goto[state].get(ch)
            if nxt is None:
                nxt = len(self.goto)
                self.goto[state][ch] = nxt
                self.goto.append({})
                self.fail.append(0)
                self.depth.append(self.depth[state] + 1)
                self.match.append(None)
            state = nxt
        self.match[state] = stop

    def _link(self) -> None:
        queue = list(self.goto[0].values())
        head = 0
        while head < len(queue):
            state = queue[head]
            head += 1
            for ch, child in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                target = self.goto[f].get(ch, 0)
                self.fail[child] = target if target != child else 0
                if self.match[child] is None:
                    # A shorter stop that is a suffix of this path ends here too.
                    self.match[child] = self.match[self.fail[child]]
                queue.append(child)

    def step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)


class StopMatcher:
    """Per-choice stop-string filter. Empty strings in `stops` are ignored."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self._automaton = _Automaton(self.stops) if self.stops else None
        self._state = 0
        self._held = ""  # == the text of the current state: a proper prefix of some stop
        self._stopped: Optional[str] = None

    @property
    def stopped(self) -> bool:
        return self._stopped is not None

    @property
    def stop(self) -> Optional[str]:
        """The stop string that ended the text, or None."""
        return self._stopped

    @property
    def held_text(self) -> str:
        return self._held

    def feed(self, text: str) -> StopResult:
        if self._stopped is not None:
            return StopResult("", True, self._stopped)
        if self._automaton is None:
            return StopResult(text, False)
        ac = self._automaton
        state = self._state
        pending = self._held + text  # all of it not yet emitted
        start_of_text = len(self._held)
        for i, ch in enumerate(text):
            state = ac.step(state, ch)
            stop = ac.match[state]
            if stop is not None:
                end = start_of_text + i + 1
                self._stopped = stop
                self._held = ""
                self._state = 0
                return StopResult(pending[: end - len(stop)], True, stop)
        self._state = state
        keep = ac.depth[state]
        self._held = pending[len(pending) - keep:] if keep else ""
        return StopResult(pending[: len(pending) - keep], False)

    def flush(self) -> str:
        """The text held back as a possible stop prefix, released when generation ends otherwise."""
        if self._stopped is not None:
            return ""
        held, self._held, self._state = self._held, "", 0
        return held
