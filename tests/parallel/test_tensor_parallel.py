"""Tensor parallelism on CPU processes joined by gloo: the sharded graph against one process.

Tolerance: the ranks compute the same fp32 products as one process, summed in
another order (each row-parallel layer sums K/N terms per rank, then the
all-reduce sums N partials). Reordering a length-K fp32 dot product moves it by
at most about K * 2^-24 * sum|x_i w_i|; for these widths (K <= 128) and
logits of order 1-10 that is below 1e-4, so atol = rtol = 1e-4 is a bound a
wrong shard (a head or a row off by one, a missing reduction) exceeds by
orders of magnitude (logits of order 1). Observed: about 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.config import LLMOptConfig
from llmopt.errors import LLMOptConfigError
from llmopt.models.random_models import random_llama

from llmopt.parallel.launch import RankFailed, run_ranks
from . import workers

TOL = dict(atol=1e-4, rtol=1e-4)


def _close(result):
    torch.testing.assert_close(result["got"], result["reference"], **TOL)
    assert torch.equal(result["got"].argmax(-1), result["reference"].argmax(-1))


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failed_or_stuck_rank_leaves_no_process_behind(mode):
    """The launcher's contract the other tests rely on: a rank's exception (with its traceback) or
    the deadline fails the call, and every rank, including one blocked in a collective, is gone."""
    import multiprocessing

    expected = (RankFailed, "rank 1 fails on purpose") if mode == "raise" else (TimeoutError, "after 10 s")
    with pytest.raises(expected[0], match=expected[1]):
        run_ranks(workers.fail_or_hang, 2, mode, timeout=10 if mode == "hang" else 120)
    assert multiprocessing.active_children() == []


def test_option_group_is_validated():
    assert LLMOptConfig.from_options({"tensor_parallel": 2}).tensor_parallel.size == 2
    assert LLMOptConfig().tensor_parallel is None
    with pytest.raises(LLMOptConfigError, match="'vocab_parallel', 'replicated'"):
        LLMOptConfig.from_options({"tensor_parallel": {"size": 2, "lm_head": "gathered"}})
    with pytest.raises(LLMOptConfigError, match="valid options are 'size', 'lm_head', 'embedding'"):
        LLMOptConfig.from_options({"tensor_parallel": {"ranks": 2}})
    with pytest.raises(LLMOptConfigError, match="positive int"):
        LLMOptConfig.from_options({"tensor_parallel": {"size": 0}})


def test_without_a_process_group_it_is_an_error():
    model = random_llama("gqa", num_layers=1)
    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", "tensor_parallel": 2})
    with pytest.raises(Exception, match="needs an initialised torch.distributed process group"):
        with torch.no_grad():
            compiled(torch.tensor([[1, 2, 3]]), use_cache=False)


SIZE_2 = [
    # GQA: 4 query heads, 2 KV heads -> 2q/1kv per rank; lm_head vocab-parallel (gather)
    ("logits_against_one_process", {"heads": "gqa"}, {"size": 2}),
    # MQA: 1 KV head, replicated on both ranks; vocab-parallel embedding, replicated lm_head
    ("logits_against_one_process", {"heads": "mqa", "num_layers": 1},
     {"size": 2, "lm_head": "replicated", "embedding": "vocab_parallel"}),
    # shard first, then quantize each shard (int8, fp32 activations: the exactness mode)
    ("logits_against_one_process", {"heads": "gqa", "num_layers": 1}, {"size": 2}, (2, 7),
     {"quantize": "int8", "kernels": {"quant_cpu_dtype": "float32"}}),
    ("logits_against_one_process", {"heads": "gqa", "num_layers": 1}, None, (2, 7),
     {"quantize": "int8", "kernels": {"quant_cpu_dtype": "float32"}}),
    # paging after sharding: the rank's cache holds its KV heads (8q/4kv: 2 KV heads a rank, so the
    # dead KV repeat fuse_attention leaves, expand(.., 4, 2, ..), must not be re-shaped)
    ("paged_against_one_process", {"heads": "gqa", "num_layers": 1, "hidden_size": 128, "num_attention_heads": 8,
                                   "num_key_value_heads": 4}, {"size": 2}),
    # bf16 on gloo: the partial sums are reduced in fp32
    ("logits_against_one_process", {"heads": "gqa", "num_layers": 1, "dtype": torch.bfloat16}, {"size": 2}),
    # refusals, naming the head counts
    ("expect_error", {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 3, "num_layers": 1},
     {"size": 2}),
    ("expect_error", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "num_layers": 1},
     {"size": 2}),
]


@pytest.fixture(scope="module")
def size_2():
    return [[case["value"] for case in rank] for rank in run_ranks(workers.cases, 2, SIZE_2, timeout=300)]


def test_gqa_size_2_matches_one_process_and_halves_the_sharded_bytes(size_2):
    for rank, results in enumerate(size_2):
        result = results[0]
        _close(result)
        assert "4q/2kv heads -> 2q/1kv per rank" in result["notes"][0]
        sizes = result["bytes"]
        # 2 layers x (q, k, v, o, gate, up, down) + lm_head: exactly half of them on each rank
        model = random_llama("gqa")
        sharded = sum(p.numel() * 4 for n, p in model.named_parameters()
                      if n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj", "lm_head"))
        replicated = (sum(p.numel() * 4 for p in model.parameters()) - sharded
                      + model.model.rotary_emb.inv_freq.numel() * 4)  # the one buffer the graph reads
        assert sizes == {"sharded_full": sharded, "sharded": sharded // 2, "replicated": replicated,
                         "read": sharded // 2 + replicated}
    # the ranks hold different halves: rank 1's q_proj rows start where rank 0's end
    assert dict(size_2[0][0]["rewrites"])["model.layers.0.self_attn.q_proj"].startswith("column-parallel, rows 0..31")
    assert dict(size_2[1][0]["rewrites"])["model.layers.0.self_attn.q_proj"].startswith("column-parallel, rows 32..63")


def test_one_kv_head_is_replicated_and_the_embedding_vocab_parallel(size_2):
    for results in size_2:
        result = results[1]
        _close(result)
        assert "4q/1kv heads -> 2q/1kv per rank (KV heads replicated)" in result["notes"][0]
        rewrites = dict(result["rewrites"])
        assert rewrites["model.layers.0.self_attn.k_proj"].startswith("column-parallel, rows 0..15")
        assert "vocab-parallel embedding" in rewrites["model.embed_tokens"]
        assert "lm_head" not in rewrites  # replicated


def test_int8_quantizes_each_shard(size_2):
    for results in size_2:
        tp, one = results[2], results[3]
        # the shards were quantized: q_proj's int8 call has half the rows
        quantized = [detail for layer, detail in tp["rewrites"] if layer == "model.layers.0.self_attn.q_proj"
                     and detail.startswith("int8")]
        assert quantized and quantized[0].startswith("int8, 8192 -> ")  # 32 of 64 rows x 64 x fp32
        # Row-parallel shards get their own per-row scales, so TP-int8 is not bit-equal to one-process
        # int8; both are within int8 rounding of fp32, and of each other.
        err_tp = (tp["got"] - tp["reference"]).abs().max()
        err_one = (one["got"] - one["reference"]).abs().max()
        assert 0 < err_tp < 0.1 and 0 < err_one < 0.1
        torch.testing.assert_close(tp["got"], one["got"], atol=0.1, rtol=0)


def test_paged_cache_holds_the_ranks_kv_heads(size_2):
    for results in size_2:
        result = results[4]
        assert result["paged_sites"] == 1 and result["cache_kv_heads"] == [2]  # 4 KV heads, 2 ranks
        _close(result)


def test_head_counts_the_size_cannot_split_are_refused(size_2):
    for results in size_2:
        assert "does not divide the 3 query heads of model.layers.0.self_attn" in results[6]
        assert "tensor_parallel size 2 and the 3 KV heads of model.layers.0.self_attn (6 query heads)" in results[7]


def test_bf16_partials_are_reduced_in_fp32_on_gloo(size_2):
    """bf16 model: each all-reduce casts to fp32 and back. One process rounds every product sum in
    bf16 once; the ranks round two half-sums and then their fp32 sum, so logits (of order 1-10) may
    differ by a few bf16 ulps (2^-8 relative): atol 0.1, rtol 0.02, and the same argmax for nearly
    all tokens."""
    for results in size_2:
        result = results[5]
        assert result["got"].dtype == torch.bfloat16
        rewrites = dict(result["rewrites"])
        assert "then all-reduce in float32" in rewrites["model.layers.0.mlp.down_proj"]
        assert "then all-reduce in float32" in rewrites["model.layers.0.self_attn.o_proj"]
        torch.testing.assert_close(result["got"].float(), result["reference"].float(), atol=0.1, rtol=0.02)
        agree = (result["got"].argmax(-1) == result["reference"].argmax(-1)).float().mean()
        assert agree >= 0.9


def test_mha_size_4_matches_one_process():
    results = run_ranks(workers.cases, 4, [("logits_against_one_process", {"heads": "mha", "num_layers": 1},
                                            {"size": 4})], timeout=240)
    for rank, (case,) in enumerate(results):
        result = case["value"]
        _close(result)
        assert "4q/4kv heads -> 1q/1kv per rank" in result["notes"][0]
        assert result["bytes"]["sharded"] * 4 == result["bytes"]["sharded_full"]


@pytest.mark.slow
@pytest.mark.parametrize("num_layers", [3, pytest.param(None, marks=pytest.mark.long)], ids=["first-3-layers", "whole"])
def test_smollm2_size_3_matches_one_process(num_layers):
    """SmolLM2-135M: 9 query heads and 3 KV heads over 3 ranks (3q/1kv each), K up to 1536: the fp32
    reordering bound gives about 1e-3 on logits of order 10-20. The default suite runs its first 3
    layers (real weights and head layout, 31 s); the whole 30-layer model is the long case."""
    results = run_ranks(workers.smollm2_against_one_process, 3, {"size": 3}, "The capital of France is",
                        num_layers, timeout=900)
    for result in results:
        assert "9q/3kv heads -> 3q/1kv per rank" in result["notes"][0]
        assert result["max_diff"] < 2e-3 and result["argmax_equal"], result["max_diff"]
        sizes = result["bytes"]
        assert sizes["sharded"] * 3 == sizes["sharded_full"]


@pytest.mark.slow
def test_inductor_compiles_the_collectives():
    """lower="inductor": the functional all-reduce / all-gather go through AOTAutograd and Inductor."""
    results = run_ranks(workers.cases, 2, [("logits_against_one_process", {"heads": "gqa", "num_layers": 1},
                                            {"size": 2}, (2, 7), {"lower": "inductor"})], timeout=500)
    for (case,) in results:
        _close(case["value"])
