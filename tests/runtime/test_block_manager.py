"""KV block pool: accounting, ref counts, prefix caching, LRU eviction, waste, budget."""

import pytest
import torch

from llmopt.runtime import kv_budget
from llmopt.runtime.block_manager import BlockManager, hash_block
from llmopt.runtime.sequence import Sequence

BS = 4  # block size used throughout: small, so hand-made examples stay readable


def make_seq(request_id, tokens):
    return Sequence(request_id, list(tokens))


def compute(bm, seq, num_tokens=None):
    """Allocate for and 'compute' the next ``num_tokens`` tokens (all pending by default)."""
    if num_tokens is None:
        num_tokens = seq.num_tokens - bm.get_computed_prefix(seq)
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.mark_full_blocks_cached(seq)
    bm.check_invariants()


def test_allocate_and_free_accounting():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq("a", range(10))
    assert bm.can_allocate(seq, 10)
    compute(bm, seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(0.3)
    assert [bm.ref_count(b) for b in seq.block_table] == [1, 1, 1]
    assert bm.block_table(seq) == seq.block_table
    table = seq.block_table
    assert bm.slot_mapping(seq, 0, 10) == [table[p // BS] * BS + p % BS for p in range(10)]
    assert bm.slot_mapping(seq, 9, 1) == [table[2] * BS + 1]

    # Decoding: positions 10 and 11 fit the third block, position 12 needs a fourth.
    seq.output_token_ids += [50, 51]
    compute(bm, seq, 1)
    compute(bm, seq, 1)
    assert len(seq.block_table) == 3
    seq.output_token_ids.append(52)
    compute(bm, seq, 1)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 6

    held = list(seq.block_table)
    bm.free(seq)
    bm.check_invariants()
    assert seq.block_table == []
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in held)


def test_impossible_request_names_the_numbers():
    bm = BlockManager(num_blocks=2, block_size=BS)
    with pytest.raises(ValueError, match=r"needs 3 KV blocks.*9 tokens.*pool has 2"):
        bm.can_allocate(make_seq("big", range(9)), 9)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=BS)


def test_allocate_without_room_fails_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq("a", range(8))
    compute(bm, a)
    b = make_seq("b", range(100, 108))
    assert not bm.can_allocate(b, 8)
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.check_invariants()


def test_slot_mapping_outside_the_allocated_blocks_raises():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq("a", range(5))
    compute(bm, seq)
    with pytest.raises(ValueError, match="allocate them first"):
        bm.slot_mapping(seq, 6, 3)


def test_shared_system_prompt_reuses_full_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=BS)
    system = list(range(1, 11))  # 10 tokens: 2 full blocks and 2 more
    first = make_seq("first", system + [100, 101, 102])  # blocks: s s | s s | s s 100 101 | 102
    compute(bm, first)
    assert [bm.is_cached(b) for b in first.block_table] == [True, True, True, False]

    second = make_seq("second", system + [200, 201, 202, 203])
    assert bm.get_computed_prefix(second) == 8
    bm.allocate(second, second.num_tokens - 8)
    assert second.num_computed_tokens == 8 and second.num_prefix_hit_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert [bm.ref_count(b) for b in second.block_table[:2]] == [2, 2]
    assert second.block_table[2] not in first.block_table
    assert bm.stats.queried_tokens == 13 + 14 and bm.stats.hit_tokens == 8
    assert bm.stats.hit_rate == pytest.approx(8 / 27)
    bm.check_invariants()

    # The partial last block of ``first`` is never shared, even with a sequence
    # that continues exactly its tokens.
    third = make_seq("third", first.all_token_ids + [7])
    assert bm.get_computed_prefix(third) == 12
    bm.allocate(third, 2)
    assert third.block_table[:3] == first.block_table[:3]
    assert third.block_table[3] != first.block_table[3]
    assert bm.ref_count(first.block_table[3]) == 1
    bm.check_invariants()

    for seq in (first, second, third):
        bm.free(seq)
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_at_least_one_token_is_computed():
    bm = BlockManager(num_blocks=8, block_size=BS)
    first = make_seq("first", range(8))  # exactly two full blocks
    compute(bm, first)
    assert bm.num_cached_blocks == 2

    same = make_seq("same", range(8))
    # Everything is cached, but the model must see a token to produce logits:
    # the whole last block is recomputed into a block of its own.
    assert bm.get_computed_prefix(same) == 4
    compute(bm, same)
    assert same.block_table[0] == first.block_table[0]
    assert same.block_table[1] != first.block_table[1]
    # One block per hash: the recomputed copy stays unregistered ...
    assert not bm.is_cached(same.block_table[1])
    duplicate = same.block_table[1]
    bm.free(same)
    bm.check_invariants()
    # ... so freeing it returns a plain block and the cache is unchanged.
    assert bm.num_cached_blocks == 2 and not bm.is_cached(duplicate)

    one_token = make_seq("one", [0])
    assert bm.get_computed_prefix(one_token) == 0


def test_hash_chaining_needs_the_same_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    first = make_seq("first", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, first)
    # Block 1 holds the same tokens (5..8) but after a different block 0: its
    # K/V differs, so it is not a hit.
    other = make_seq("other", [9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.get_computed_prefix(other) == 0

    root = hash_block(b"", [1, 2, 3, 4])
    assert hash_block(root, [5, 6, 7, 8]) == hash_block(hash_block(b"", [1, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(root, [5, 6, 7, 8]) != hash_block(hash_block(b"", [9, 9, 9, 9]), [5, 6, 7, 8])
    assert first.block_hashes[1] == hash_block(root, [5, 6, 7, 8])


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq("a", list(range(8)) + [0])  # two full blocks (the third is partial)
    b = make_seq("b", list(range(100, 108)) + [0])
    compute(bm, a)
    compute(bm, b)
    a0, a1, a_tail = a.block_table
    b0, b1, b_tail = b.block_table
    bm.free(a)
    bm.free(b)
    bm.check_invariants()
    # Freed, but their content is still findable.
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    assert bm.get_computed_prefix(make_seq("a again", a.all_token_ids)) == 8

    # A hit revives b's blocks from the LRU list (they are not evicted below).
    revived = make_seq("b again", b.all_token_ids)
    compute(bm, revived)
    assert revived.block_table[:2] == [b0, b1]
    assert bm.ref_count(b0) == 1 and bm.num_free_blocks == 3

    # Fresh blocks come from never-registered ones first (the partial tails),
    # then by evicting the least recently freed: a's tail block a1 first
    # (a sequence's blocks are freed last to first).
    plain_left = {a_tail, b_tail} - set(revived.block_table)
    c = make_seq("c", range(200, 207))  # its second block stays partial: unregistered
    compute(bm, c)
    assert c.block_table == [*plain_left, a1]
    assert not bm.is_cached(a1) and bm.is_cached(a0)
    assert bm.get_computed_prefix(make_seq("a again", a.all_token_ids)) == 4

    d = make_seq("d", range(300, 303))
    compute(bm, d)
    assert d.block_table == [a0] and not bm.is_cached(a0)
    assert bm.get_computed_prefix(make_seq("a again", a.all_token_ids)) == 0
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(make_seq("e", [1]), 1)
    bm.check_invariants()


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=6, block_size=BS)
    kept = make_seq("kept", range(5))
    gone = make_seq("gone", range(10, 15))
    compute(bm, kept)
    compute(bm, gone)
    bm.free(gone)
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.num_cached_blocks == 1 and bm.is_cached(kept.block_table[0])
    assert bm.get_computed_prefix(make_seq("x", gone.all_token_ids)) == 0
    assert bm.get_computed_prefix(make_seq("y", kept.all_token_ids)) == 4


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq("a", range(9))
    compute(bm, a)
    b = make_seq("b", range(9))
    assert bm.get_computed_prefix(b) == 0
    compute(bm, b)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_cached_blocks == 0 and bm.stats.queried_tokens == 0


def test_kv_waste_fraction_counts_empty_slots_of_held_blocks_once():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.kv_waste_fraction() == 0.0
    a = make_seq("a", range(5))  # 2 blocks, 3 empty slots
    compute(bm, a)
    assert bm.kv_waste_fraction() == pytest.approx(3 / 8)
    b = make_seq("b", [0, 1, 2, 3, 9, 9])  # shares a's first block, 2 empty slots in its own
    compute(bm, b)
    assert b.block_table[0] == a.block_table[0]
    assert bm.kv_waste_fraction() == pytest.approx((3 + 2) / 12)
    bm.free(a)
    bm.free(b)
    assert bm.kv_waste_fraction() == 0.0


def test_invariant_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq("a", range(5))
    compute(bm, seq)
    bm._ref_count[seq.block_table[0]] += 1  # a leaked reference
    with pytest.raises(RuntimeError, match="ref count"):
        bm.check_invariants()


# ---- kv_budget ---------------------------------------------------------------


def test_bytes_and_blocks_for_a_budget():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp16, 16-token blocks.
    per_block = 2 * 30 * 16 * 3 * 64 * 2
    assert kv_budget.bytes_per_block(30, 3, 64, 16, torch.float16) == per_block == 368_640
    assert kv_budget.num_blocks_for_budget(kv_budget.GIB, 30, 3, 64, 16, torch.float16) == 2912
    assert kv_budget.num_blocks_for_budget(per_block * 3 - 1, 30, 3, 64, 16, "float16") == 2
    assert kv_budget.num_blocks_for_budget(per_block * 3, 30, 3, 64, 16, torch.float32) == 1
    with pytest.raises(ValueError, match=r"holds no block.*368640 bytes"):
        kv_budget.num_blocks_for_budget(per_block - 1, 30, 3, 64, 16, torch.float16)
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        kv_budget.num_blocks_for_budget(10**9, 30, 3, 64, 16, "float17")
    # Short names (dtype="bf16") are the same dtypes as torch's names.
    assert [kv_budget.as_dtype(n) for n in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16, torch.float16, torch.float32]
    assert kv_budget.bytes_per_block(30, 3, 64, 16, "bf16") == per_block


def test_cpu_and_gpu_budgets(monkeypatch):
    assert kv_budget.cpu_budget_bytes(1.5) == 3 * kv_budget.GIB // 2
    with pytest.raises(ValueError):
        kv_budget.cpu_budget_bytes(0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kv_budget.gpu_budget_bytes(1.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000))
    assert kv_budget.gpu_budget_bytes(0.5) == 5_000
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="cpu_budget_bytes"):
        kv_budget.gpu_budget_bytes(0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_budget_on_a_real_device():
    free, _ = torch.cuda.mem_get_info()
    assert 0 < kv_budget.gpu_budget_bytes(0.5) <= free
