"""PrefixCache: K/V of prompt prefixes already computed, reused instead of recomputed.

A prompt is cut into blocks of `block_size` tokens. Block i's key is a hash chained over the
adapter id and blocks 0..i, so a key names a whole prefix (and the adapter: LoRA changes K/V).
An *entry* keeps the K/V of one stored prefix (per layer [H, T, D] copies, taken from the slot
of the sequence that computed them); every block boundary of that prefix points at the entry.
A lookup walks the new prompt's block keys and takes the longest boundary that is present and
whose tokens really match (hashes are checked against the stored tokens).

Entries live in LRU order under a byte budget; storing a prefix evicts the least recently used
entries. Matching is plain Python (the scheduler calls it); K/V copies happen in the runner.

*Exact* mode is for models whose cache does not keep every position (sliding-window rings,
recurrent state): an entry holds the cache rows as they were after exactly its n tokens, so only
a hit of exactly n tokens can use it; only its last boundary is registered, and a lookup takes the
longest registered boundary anywhere in the prompt. The scheduler cuts prompts' prefill at their
last full block so that such a moment exists (SchedulerConfig.align_prefill_to).

What an entry holds (`rows`) is opaque here: the runner's BatchedKVCache reads and writes it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    adapter: Optional[str]
    rows: list[mx.array]  # BatchedKVCache.read_rows of the prefix
    nbytes: int
    block_keys: list[int] = field(default_factory=list)


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = 16, exact: bool = False):
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.exact = exact
        self.nbytes = 0
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()  # id -> entry, LRU first
        self._by_block: dict[int, tuple[int, int]] = {}  # block key -> (entry id, tokens)
        self._next_id = 0

    def _block_keys(self, token_ids: list[int], adapter: Optional[str], max_tokens: int) -> list[int]:
        keys, h = [], hash(("parallm-prefix", adapter))
        bs = self.block_size
        for end in range(bs, max_tokens + 1, bs):
            h = hash((h, tuple(token_ids[end - bs:end])))
            keys.append(h)
        return keys

    def _find(self, token_ids, adapter, max_tokens) -> tuple[Optional[_Entry], int, Optional[int]]:
        best: tuple[Optional[_Entry], int, Optional[int]] = (None, 0, None)
        for key in self._block_keys(token_ids, adapter, max_tokens):
            hit = self._by_block.get(key)
            if hit is None:
                if self.exact:  # exact entries register their last boundary only: look further
                    continue
                break
            entry_id, n = hit
            entry = self._entries[entry_id]
            if entry.adapter != adapter or entry.tokens[:n] != tuple(token_ids[:n]):
                if self.exact:
                    continue
                break
            best = (entry, n, entry_id)
        return best

    def match(self, token_ids: list[int], adapter: Optional[str], max_tokens: int) -> int:
        """Leading tokens (a block multiple, <= max_tokens) whose K/V are stored. Touches LRU."""
        entry, n, entry_id = self._find(token_ids, adapter, max_tokens)
        if entry_id is not None:
            self._entries.move_to_end(entry_id)
        return n

    def load(self, token_ids: list[int], adapter: Optional[str], num_tokens: int) -> list[mx.array]:
        """The stored rows of the first num_tokens, which `match` just reported."""
        entry, n, _ = self._find(token_ids, adapter, num_tokens)
        if entry is None or n < num_tokens:
            raise KeyError("prefix entry vanished between match and load")
        return entry.rows

    def wants(self, token_ids: list[int], adapter: Optional[str]) -> int:
        """Tokens worth storing for this prompt: its full blocks, if not already all stored."""
        n = (len(token_ids) // self.block_size) * self.block_size
        if n == 0 or self._find(token_ids, adapter, n)[1] >= n:
            return 0
        return n

    def store(self, token_ids: list[int], adapter: Optional[str], num_tokens: int, rows: list[mx.array]) -> None:
        """Keep `rows` (the cache rows after the first num_tokens, a block multiple) for reuse."""
        n = num_tokens
        nbytes = sum(a.nbytes for a in rows)
        if n == 0 or nbytes > self.budget_bytes:
            return
        while self.nbytes + nbytes > self.budget_bytes and self._entries:
            self._evict_oldest()
        entry_id, self._next_id = self._next_id, self._next_id + 1
        keys = self._block_keys(token_ids, adapter, n)
        entry = _Entry(tuple(token_ids[:n]), adapter, rows, nbytes, keys[-1:] if self.exact else keys)
        self._entries[entry_id] = entry
        for i, key in enumerate(keys):
            if not self.exact or i == len(keys) - 1:
                self._by_block[key] = (entry_id, (i + 1) * self.block_size)
        self.nbytes += nbytes

    def _evict_oldest(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        for key in entry.block_keys:
            if self._by_block.get(key, (None,))[0] == entry_id:
                del self._by_block[key]

    def clear(self) -> None:
        self._entries.clear()
        self._by_block.clear()
        self.nbytes = 0
