"""Scheduler: token budget, chunked prefill, ordering, preemption, fairness, abort.

``FakeModel`` stands in for the model runner. It keeps a simulated paged KV
cache: for every scheduled token it writes, into the token's slot, a key
that depends on the token and on every token before it (as real K/V does),
then reads the whole context back through the block table and checks it.
Any block shared, reused or recomputed wrongly shows up as a mismatch. It
"samples" the next token from the last key, so a request's output depends on
its prompt alone and can be checked against a plain reference loop.
"""

import random

import pytest

from llmopt.runtime.scheduler import Scheduler, SchedulerConfig
from llmopt.runtime.sequence import FinishReason, Sequence, SequenceStatus

VOCAB = 64
STOP_TOKEN = 0


def next_key(key, token):
    return hash((key, token))


def prefix_keys(tokens):
    keys, key = [], 0
    for token in tokens:
        key = next_key(key, token)
        keys.append(key)
    return keys


def sample(key):
    return (key * 2654435761 + 12345) % (2**61 - 1) % VOCAB


def stop_on_token(seq):
    return FinishReason.STOP if seq.output_token_ids[-1] == STOP_TOKEN else None


def reference_output(prompt, max_tokens, stop=True):
    """What the request must produce: greedy 'decoding' with no cache at all."""
    key, out = prefix_keys(prompt)[-1], []
    while len(out) < max_tokens:
        token = sample(key)
        out.append(token)
        if stop and token == STOP_TOKEN:
            break
        key = next_key(key, token)
    return out


class FakeModel:
    def __init__(self, scheduler, check_cache=True):
        bm = scheduler.block_manager
        self.bm = bm
        self.kv = [None] * (bm.num_blocks * bm.block_size)
        self.check_cache = check_cache
        self.scheduled_tokens = {}  # request id -> tokens computed, recomputation included

    def step(self, output):
        sampled = {}
        for item in output.scheduled:
            seq = item.seq
            rid = seq.request_id
            self.scheduled_tokens[rid] = self.scheduled_tokens.get(rid, 0) + item.num_scheduled_tokens
            assert item.token_ids == seq.all_token_ids[item.start:item.end]
            keys = prefix_keys(seq.token_ids(0, item.end))
            for pos, slot in zip(item.positions, item.slot_mapping, strict=True):
                self.kv[slot] = keys[pos]
            if self.check_cache:
                context = [self.kv[s] for s in self.bm.slot_mapping(seq, 0, item.end)]
                assert context == keys, f"{rid}: the cache does not hold this sequence's prefix"
            if item.samples:
                sampled[rid] = sample(keys[-1])
        return sampled


def check_step(scheduler, output, running_before):
    """Invariants that must hold after every step."""
    config, bm = scheduler.config, scheduler.block_manager
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    assert all(item.num_scheduled_tokens >= 1 for item in output.scheduled)
    ids = [item.request_id for item in output.scheduled]
    assert len(ids) == len(set(ids)) <= config.max_num_seqs
    assert len(scheduler.running) <= config.max_num_seqs
    if output.preempted:
        # Preempting means no new admissions, and only sequences newer than
        # every one that ran.
        assert all(item.seq in running_before for item in output.scheduled)
        newest_run = max((item.seq.arrival_index for item in output.scheduled), default=-1)
        assert all(p.arrival_index > newest_run for p in output.preempted)
    bm.check_invariants()
    # The same from the outside: ref counts match the block tables.
    held = {}
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        for block in seq.block_table:
            held[block] = held.get(block, 0) + 1
    for seq in scheduler.waiting:
        assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert sum(bm.ref_count(b) for b in range(bm.num_blocks)) == sum(held.values())
    assert all(bm.ref_count(b) == held.get(b, 0) for b in range(bm.num_blocks))
    assert bm.num_free_blocks == bm.num_blocks - len(held)
    # Running, then waiting, is arrival order: the running sequences are the
    # oldest, and preempted ones go back to the front of the queue.
    arrivals = [seq.arrival_index for seq in [*scheduler.running, *scheduler.waiting]]
    assert arrivals == sorted(arrivals)


def run_step(scheduler, model):
    running_before = list(scheduler.running)
    output = scheduler.schedule()
    finished = scheduler.update(output, model.step(output))
    check_step(scheduler, output, running_before)
    return output, finished


def make_scheduler(num_blocks=64, finish_check=stop_on_token, **config):
    config.setdefault("block_size", 4)
    return Scheduler(SchedulerConfig(**config), num_blocks=num_blocks, finish_check=finish_check)


def test_chunked_prefill_splits_a_long_prompt_within_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=16, finish_check=None)
    model = FakeModel(scheduler)
    seq = Sequence("long", list(range(1, 41)), max_tokens=3)
    scheduler.add(seq)
    steps = []
    while scheduler.has_unfinished():
        output, _ = run_step(scheduler, model)
        (item,) = output.scheduled
        steps.append((item.start, item.num_scheduled_tokens, item.samples, seq.num_output_tokens))
    assert steps == [
        (0, 16, False, 0), (16, 16, False, 0), (32, 8, True, 1),  # prefill in 3 chunks
        (40, 1, True, 2), (41, 1, True, 3),  # decodes
    ]
    assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 3, stop=False)
    assert seq.finish_reason is FinishReason.LENGTH


def test_long_prefill_threshold_lets_prompts_share_a_step():
    scheduler = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=8)
    for name in "ab":
        scheduler.add(Sequence(name, list(range(1, 21)), max_tokens=2))
    output = scheduler.schedule()
    assert [(i.request_id, i.num_scheduled_tokens) for i in output.scheduled] == [("a", 8), ("b", 8)]


def test_decodes_are_scheduled_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=10, finish_check=None)
    model = FakeModel(scheduler)
    scheduler.add(Sequence("a", [1, 2, 3], max_tokens=20))
    scheduler.add(Sequence("b", [4, 5, 6], max_tokens=20))
    run_step(scheduler, model)  # both prefills
    scheduler.add(Sequence("c", list(range(1, 31)), max_tokens=20))
    output, _ = run_step(scheduler, model)
    assert [(i.request_id, i.num_scheduled_tokens) for i in output.scheduled] == [
        ("a", 1), ("b", 1), ("c", 8)]


def test_max_num_seqs_is_respected():
    scheduler = make_scheduler(max_num_seqs=2, finish_check=None)
    model = FakeModel(scheduler)
    seqs = [Sequence(f"r{i}", [i + 1, 7], max_tokens=3) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    output, _ = run_step(scheduler, model)
    assert [i.request_id for i in output.scheduled] == ["r0", "r1"]
    started = []
    while scheduler.has_unfinished():
        output, _ = run_step(scheduler, model)
        assert len(output.scheduled) <= 2
        started += [i.request_id for i in output.scheduled if i.start == 0]
    assert started == ["r2", "r3", "r4"]  # admitted in arrival order
    assert all(seq.num_output_tokens == 3 for seq in seqs)


def test_without_chunked_prefill_the_queue_head_waits_whole():
    scheduler = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    for name, length in (("a", 10), ("b", 10), ("c", 2)):
        scheduler.add(Sequence(name, list(range(1, length + 1)), max_tokens=4))
    output = scheduler.schedule()
    # b does not fit the 6 tokens left and is not split; c may not overtake it.
    assert [(i.request_id, i.num_scheduled_tokens) for i in output.scheduled] == [("a", 10)]
    with pytest.raises(ValueError, match="the prompt has 17 tokens but at most 16 fit"):
        scheduler.add(Sequence("too long", list(range(17))))


def test_preemption_by_recompute_in_a_tiny_pool():
    # 6 blocks of 4 = 24 slots; each request needs up to 8 + 12 - 1 = 19.
    scheduler = make_scheduler(num_blocks=6, max_num_batched_tokens=32, finish_check=None)
    model = FakeModel(scheduler)
    old = Sequence("old", list(range(1, 9)), max_tokens=12)
    new = Sequence("new", list(range(11, 19)), max_tokens=12)
    scheduler.add(old)
    scheduler.add(new)
    preemptions, finish_order = [], []
    while scheduler.has_unfinished():
        output, finished = run_step(scheduler, model)
        finish_order += [s.request_id for s in finished]
        for victim in output.preempted:
            preemptions.append(victim.request_id)
            # Blocks freed, back to the front of the queue, to recompute from scratch.
            assert victim.status is SequenceStatus.PREEMPTED and victim.block_table == []
            assert victim.num_computed_tokens == 0 and scheduler.waiting[0] is victim
    assert preemptions and set(preemptions) == {"new"}  # the older one is never the victim
    assert finish_order == ["old", "new"]
    assert new.num_preemptions == len(preemptions)
    for seq in (old, new):
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 12, stop=False)
        # Every token but the last sampled one went through the cache ...
        assert seq.num_computed_tokens == seq.num_tokens - 1 == 8 + 12 - 1
    # ... and the preempted one paid for its recomputation.
    assert model.scheduled_tokens["old"] == 19
    assert model.scheduled_tokens["new"] > 19
    assert scheduler.block_manager.num_free_blocks == 6


def test_abort_frees_blocks_whether_waiting_or_running():
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    model = FakeModel(scheduler)
    running = Sequence("running", list(range(1, 10)), max_tokens=50)
    waiting = Sequence("waiting", list(range(1, 10)), max_tokens=50)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler, model)
    assert scheduler.block_manager.num_free_blocks == 5
    assert scheduler.abort("running") is running
    assert running.finish_reason is FinishReason.ABORT and running.block_table == []
    assert scheduler.block_manager.num_free_blocks == 8
    assert scheduler.abort("waiting") is waiting and scheduler.abort("nobody") is None
    assert not scheduler.has_unfinished()
    scheduler.block_manager.check_invariants()


def test_abort_between_schedule_and_update():
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    scheduler.add(Sequence("a", [1, 2, 3], max_tokens=5))
    scheduler.add(Sequence("b", [4, 5, 6], max_tokens=5))
    output = scheduler.schedule()
    sampled = model.step(output)
    scheduler.abort("a")
    scheduler.update(output, sampled)
    assert [s.request_id for s in scheduler.running] == ["b"]
    assert scheduler.get("b").num_output_tokens == 1
    scheduler.block_manager.check_invariants()


def test_finish_reasons():
    scheduler = make_scheduler(num_blocks=4, finish_check=None)  # pool: 16 tokens
    model = FakeModel(scheduler)
    capped = Sequence("capped", list(range(1, 13)))  # no max_tokens: stops at the pool's size
    scheduler.add(capped)
    while scheduler.has_unfinished():
        run_step(scheduler, model)
    assert capped.finish_reason is FinishReason.LENGTH and capped.num_tokens == 16

    prompt = next(p for p in ([i, i + 1] for i in range(1, 500))
                  if STOP_TOKEN in reference_output(p, 10, stop=False)[1:])
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    stopped = Sequence("stopped", prompt, max_tokens=10)
    scheduler.add(stopped)
    while scheduler.has_unfinished():
        run_step(scheduler, model)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.output_token_ids == reference_output(prompt, 10)
    assert stopped.output_token_ids[-1] == STOP_TOKEN


def test_clear_errors_for_misuse():
    with pytest.raises(ValueError, match="max_model_len=100 does not fit.*4 blocks x 4 = 16"):
        make_scheduler(num_blocks=4, max_model_len=100)
    with pytest.raises(ValueError, match="needs enable_chunked_prefill"):
        SchedulerConfig(enable_chunked_prefill=False, long_prefill_token_threshold=8)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    scheduler = make_scheduler(num_blocks=4)
    with pytest.raises(ValueError, match="17 tokens but at most 16 fit"):
        scheduler.add(Sequence("big", list(range(17))))
    scheduler.add(Sequence("a", [1, 2]))
    with pytest.raises(ValueError, match="already being served"):
        scheduler.add(Sequence("a", [1, 2]))
    with pytest.raises(ValueError, match="empty"):
        Sequence("empty", [])
    output = scheduler.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        scheduler.schedule()
    with pytest.raises(ValueError, match="no token was sampled"):
        scheduler.update(output, {})
    with pytest.raises(ValueError, match=r"not scheduled in this step: \['zzz'\]"):
        scheduler.update(output, {"a": 5, "zzz": 1})
    # A rejected result changed nothing: the step can still be recorded.
    scheduler.update(output, {"a": 5})
    assert scheduler.get("a").output_token_ids == [5]


def run_workload(seed, config, num_blocks, num_requests=40, check_cache=True):
    """Random prompts (many sharing system prompts), random lengths, staggered arrivals."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=num_blocks, **config)
    model = FakeModel(scheduler, check_cache=check_cache)
    systems = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    pending = []
    for i in range(num_requests):
        system = rng.choice(systems + [[]])
        prompt = system + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))]
        pending.append(Sequence(f"r{i}", prompt, max_tokens=rng.randrange(1, 40)))
    requests = list(pending)
    first_scheduled, steps = [], 0
    while pending or scheduler.has_unfinished():
        for _ in range(rng.randrange(0, 3)):
            if pending:
                scheduler.add(pending.pop(0))
        output, _ = run_step(scheduler, model)
        first_scheduled += [i.request_id for i in output.scheduled
                            if i.seq.num_preemptions == 0 and i.start == i.seq.num_prefix_hit_tokens]
        steps += 1
        assert steps < 5000, "the workload did not finish: something starves"
    return scheduler, requests, first_scheduled


WORKLOAD_CONFIGS = {
    "chunked": dict(max_num_batched_tokens=24, max_num_seqs=6),
    "chunked, threshold": dict(max_num_batched_tokens=32, max_num_seqs=8,
                               long_prefill_token_threshold=8),
    "whole prompts": dict(max_num_batched_tokens=96, max_num_seqs=6, enable_chunked_prefill=False),
    "no prefix caching": dict(max_num_batched_tokens=24, max_num_seqs=6, enable_prefix_caching=False),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", WORKLOAD_CONFIGS)
def test_random_workload_finishes_everything_correctly(name, seed):
    scheduler, requests, first_scheduled = run_workload(seed, WORKLOAD_CONFIGS[name], num_blocks=24)
    for seq in requests:
        assert seq.is_finished and seq.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        expected = reference_output(seq.prompt_token_ids, seq.max_tokens)
        assert seq.output_token_ids == expected, seq.request_id
        assert seq.num_output_tokens == seq.max_tokens or seq.output_token_ids[-1] == STOP_TOKEN
    # FIFO: requests are first admitted in the order they arrived.
    assert first_scheduled == [seq.request_id for seq in requests]
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    # The pool is small enough to force preemptions, and prompts share prefixes.
    assert sum(seq.num_preemptions for seq in requests) > 0
    if scheduler.config.enable_prefix_caching:
        assert bm.stats.hit_tokens > 0


def test_kv_waste_stays_under_5_percent_with_16_token_blocks():
    rng = random.Random(0)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=16, block_size=16),
                          num_blocks=1024, finish_check=None)
    model = FakeModel(scheduler, check_cache=False)
    for i in range(32):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(100, 400))]
        scheduler.add(Sequence(f"r{i}", prompt, max_tokens=rng.randrange(50, 200)))
    wasted = held = 0.0
    while scheduler.has_unfinished():
        run_step(scheduler, model)
        slots = scheduler.block_manager.num_used_blocks * 16
        wasted += scheduler.block_manager.kv_waste_fraction() * slots
        held += slots
    assert wasted / held < 0.05
