"""The KV-cache block pool: block tables, reference counts, prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots; slot
``block_id * block_size + offset`` holds one token's K and V in every layer.
A sequence's ``block_table`` lists its blocks in token order.

Prefix caching. Once a block is full and its K/V computed, it is registered
under a hash of its tokens chained with the previous block's hash, so equal
hashes mean equal tokens *and* equal prefix (K/V depends on every earlier
token). A newly admitted sequence reuses the longest run of registered blocks
that starts its token list (reference count + 1) and computes only the rest.
Only full blocks are shared, so no sequence ever writes into a shared block.

Hash: SHA-256 of the parent digest followed by the block's token ids as
little-endian int64. A collision would silently serve another prompt's K/V,
so a cryptographic hash is worth its cost (about a microsecond a block);
unlike ``hash()`` of strings it is also stable across processes.

Free blocks come in two kinds. Blocks that hold no registered content go on
a plain free list and are handed out first. Blocks whose reference count
drops to 0 while registered keep their hash and wait on an LRU list: a later
prefix hit revives them; when a fresh block is needed and the plain list is
empty, the least recently freed one is evicted (its hash forgotten).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from llmopt.runtime.sequence import Sequence

_ROOT_HASH = b""  # parent of the first block


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: SHA-256(parent digest, int64 tokens)."""
    digest = hashlib.sha256(parent)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass
class PrefixCacheStats:
    """Tokens looked up in the prefix cache at admission, and tokens found."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"the KV pool needs at least one block of at least one token; got "
                f"num_blocks={num_blocks}, block_size={block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block id, registered blocks only
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._holders: dict[str, Sequence] = {}  # request id -> sequence holding blocks
        self._num_registered: dict[str, int] = {}  # leading blocks already offered to the cache

    # ---- queries ---------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can take now, cached-but-unused ones included."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks, in use or waiting on the LRU list."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_count[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._block_hash[block_id] is not None

    def block_table(self, seq: Sequence) -> list[int]:
        return list(seq.block_table)

    def slot_mapping(self, seq: Sequence, start: int, count: int) -> list[int]:
        """Cache slots (``block_id * block_size + offset``) of positions ``[start, start + count)``."""
        size = self.block_size
        if start < 0 or start + count > len(seq.block_table) * size:
            raise ValueError(
                f"request {seq.request_id!r}: positions [{start}, {start + count}) are outside "
                f"its {len(seq.block_table)} blocks of {size} slots; allocate them first"
            )
        table = seq.block_table
        return [table[p // size] * size + p % size for p in range(start, start + count)]

    def get_computed_prefix(self, seq: Sequence) -> int:
        """Leading tokens of ``seq`` whose K/V can be reused.

        For a sequence holding blocks this is its ``num_computed_tokens``. For
        one holding none it is the cached full-block prefix, never the whole
        sequence: the last token must be computed for the model to produce
        logits, so if every block is cached the last one is recomputed.
        """
        if seq.block_table:
            return seq.num_computed_tokens
        return len(self._lookup_prefix(seq)) * self.block_size

    def kv_waste_fraction(self) -> float:
        """Held slots holding no computed token, over all held slots.

        Measure it between steps (after the scheduler's update); during a
        step the slots reserved for the tokens being computed count as waste.
        Shared blocks are full, so all waste sits in blocks owned by one
        sequence and can be summed per sequence.
        """
        held_slots = self.num_used_blocks * self.block_size
        if not held_slots:
            return 0.0
        wasted = sum(len(s.block_table) * self.block_size - s.num_computed_tokens
                     for s in self._holders.values())
        return wasted / held_slots

    # ---- allocation ------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether ``allocate(seq, num_new_tokens)`` would find enough free blocks.

        Raises ValueError if the sequence could not fit even in an empty pool,
        so that a caller never waits for blocks that cannot come.
        """
        if seq.block_table:
            hits, computed = [], seq.num_computed_tokens
        else:
            hits = self._lookup_prefix(seq)
            computed = len(hits) * self.block_size
        revived = sum(1 for b in hits if self._ref_count[b] == 0)  # taken off the LRU list
        needed = self._num_blocks_for(seq, computed + num_new_tokens)
        fresh = needed - len(seq.block_table) - len(hits)
        return fresh + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` blocks for its next ``num_new_tokens`` tokens.

        A sequence holding no blocks first takes its cached prefix, and its
        ``num_computed_tokens`` jumps past it; ``num_new_tokens`` counts the
        tokens after that prefix (see ``get_computed_prefix``).
        """
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError(
                f"request {seq.request_id!r}: not enough free KV blocks for "
                f"{num_new_tokens} more tokens ({self.num_free_blocks} free); "
                "check can_allocate first"
            )
        if not seq.block_table:
            self._adopt_prefix(seq)
        target = self._num_blocks_for(seq, seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < target:
            block_id = self._take_fresh_block()
            self._ref_count[block_id] = 1
            seq.block_table.append(block_id)
        self._holders[seq.request_id] = seq

    def mark_full_blocks_cached(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that became full and computed.

        Call after each step, once ``num_computed_tokens`` has advanced. A
        block whose hash is already registered (another sequence computed the
        same content at the same time) stays unregistered: one block per hash.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        start = self._num_registered.get(seq.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(start, num_full):
            block_id = seq.block_table[i]
            if self._block_hash[block_id] is None and hashes[i] not in self._cached:
                self._cached[hashes[i]] = block_id
                self._block_hash[block_id] = hashes[i]
        self._num_registered[seq.request_id] = num_full

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks that hold positions ``[0, num_tokens)``; release the rest.

        For speculative decoding: blocks past the verified tokens held only
        rejected drafts. They were never registered (only computed full
        blocks are), so they go straight back to the plain free list.
        """
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``; ``num_computed_tokens`` is left to the caller."""
        # Reverse order: a sequence's tail blocks are the least likely to be
        # shared, so they join the LRU list first and are evicted first.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        self._holders.pop(seq.request_id, None)
        self._num_registered.pop(seq.request_id, None)

    def _release(self, block_id: int) -> None:
        """Drop one reference; an unreferenced block joins the plain free list, or the LRU if cached."""
        self._ref_count[block_id] -= 1
        if self._ref_count[block_id] == 0:
            if self._block_hash[block_id] is None:
                self._free_plain.append(block_id)
            else:
                self._free_cached[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every registered block that no sequence holds (for benchmarks)."""
        while self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            self._forget(block_id)
            self._free_plain.append(block_id)

    # ---- checking --------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise RuntimeError if the pool's bookkeeping is inconsistent (for tests)."""
        held: dict[int, int] = {}
        for seq in self._holders.values():
            if len(set(seq.block_table)) != len(seq.block_table):
                _fail(f"request {seq.request_id!r} lists a block twice: {seq.block_table}")
            for block_id in seq.block_table:
                held[block_id] = held.get(block_id, 0) + 1
        plain, cached = set(self._free_plain), set(self._free_cached)
        if len(plain) != len(self._free_plain) or plain & cached or plain & held.keys() \
                or cached & held.keys():
            _fail("a block is in two of: plain free list, LRU list, held")
        if len(plain) + len(cached) + len(held) != self.num_blocks:
            _fail("a block is neither free nor held")
        for block_id in range(self.num_blocks):
            if self._ref_count[block_id] != held.get(block_id, 0):
                _fail(f"block {block_id}: ref count {self._ref_count[block_id]}, "
                      f"held by {held.get(block_id, 0)} sequences")
            block_hash = self._block_hash[block_id]
            if block_hash is not None and self._cached.get(block_hash) != block_id:
                _fail(f"block {block_id} has a hash the cache map does not point back from")
            if block_id in plain and block_hash is not None:
                _fail(f"block {block_id} is registered but on the plain free list")
            if block_id in cached and block_hash is None:
                _fail(f"block {block_id} is on the LRU list without a hash")
        if any(self._block_hash[b] != h for h, b in self._cached.items()):
            _fail("the cache map points at a block registered under another hash")

    # ---- internals -------------------------------------------------------

    def _num_blocks_for(self, seq: Sequence, num_tokens: int) -> int:
        needed = -(-num_tokens // self.block_size)
        if needed > self.num_blocks:
            raise ValueError(
                f"request {seq.request_id!r} needs {needed} KV blocks "
                f"({num_tokens} tokens at block_size {self.block_size}) "
                f"but the whole pool has {self.num_blocks}; give the KV cache more memory "
                "or shorten the request"
            )
        return needed

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached full-block prefix, leaving one token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in self._block_hashes(seq, max_blocks):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of the first ``num_blocks`` full blocks, computed once."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash_block(parent, seq.token_ids(i * size, (i + 1) * size)))
        return hashes[:num_blocks]

    def _adopt_prefix(self, seq: Sequence) -> None:
        hits = self._lookup_prefix(seq)
        for block_id in hits:
            if self._ref_count[block_id] == 0:
                del self._free_cached[block_id]
            self._ref_count[block_id] += 1
        seq.block_table.extend(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_prefix_hit_tokens = seq.num_computed_tokens
        self._num_registered[seq.request_id] = len(hits)
        if self.enable_prefix_caching:
            self.stats.queried_tokens += seq.num_tokens
            self.stats.hit_tokens += seq.num_computed_tokens

    def _take_fresh_block(self) -> int:
        if self._free_plain:
            return self._free_plain.popleft()
        block_id, _ = self._free_cached.popitem(last=False)  # least recently freed
        self._forget(block_id)
        return block_id

    def _forget(self, block_id: int) -> None:
        del self._cached[self._block_hash[block_id]]
        self._block_hash[block_id] = None


def _fail(message: str) -> None:
    raise RuntimeError(f"block manager invariant broken: {message}")
