"""``llmopt::paged_attention`` (CPU path and Triton kernels) against an fp64 reference.

On a CPU-only machine the Triton kernels run under the interpreter (TRITON_INTERPRET=1,
set below before triton is imported), driven both through the op
(``impl="triton"``) and through the launchers of
``llmopt.kernels.triton_paged``. On a CUDA machine with ``TRITON_INTERPRET=0`` the
Triton tests run on the GPU instead.

Every batch uses a shuffled (random permutation) block assignment, a cache pre-filled
with random values (stale data the kernels must not read past a sequence's length),
garbage in the unused block-table entries, sequence lengths that are not block multiples
and some ``-1`` slots. The reference gathers each sequence's keys/values from a
reference copy of the cache in fp64, materialises the repeated kv heads and applies the
bottom-right causal mask.
"""

import math
import os

import pytest
import torch

# Interpreter on CPU-only machines; real kernels where CUDA is present (as in tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmopt.kernels import paged_attention as pa  # noqa: E402, F401  (registers the op)

triton = pytest.importorskip("triton")
from llmopt.kernels import triton_paged as tp  # noqa: E402

INTERPRET = tp._INTERPRET
HAVE_TRITON_DEVICE = INTERPRET or torch.cuda.is_available()
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(not HAVE_TRITON_DEVICE, reason="triton imported without the interpreter and no GPU")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# The interpreter has no bf16 tl.dot.
TRITON_DTYPES = [F32, F16] if INTERPRET else [F32, F16, BF16]

# (atol, rtol), elementwise |out - ref| <= atol + rtol * |ref|, against the unrounded fp64
# reference computed from the same (already rounded) inputs. Values are O(1): inputs
# ~ N(0, 1), scores ~ N(0, 1) after the 1/sqrt(D) scale, outputs are convex combinations
# of values, |out| <~ 3, sequences <= ~80 keys.
TOL = {
    # fp32 operands, fp32 accumulation and softmax statistics: rounding in sums of <= 256
    # products and in exp2/log2 (~1e-7 relative each); observed max error ~6e-7. 2e-5 keeps
    # 30x headroom and still catches any indexing / masking bug (those are O(0.1..1)).
    F32: (2e-5, 1e-4),
    # fp16: P is rounded to fp16 before P@V and the output is rounded to fp16 (eps 2^-11,
    # half an ulp is <= 9.8e-4 for |out| < 4); observed max error ~1e-3 at |out| ~ 2.
    F16: (2e-3, 2e-3),
    # bf16 (CPU path; GPU): eps 2^-8, i.e. 8x the fp16 rounding.
    BF16: (1.6e-2, 1.6e-2),
}

# (Hq, Hkv, D, block_size): GQA, MQA, MHA; D = 16, 64, 80 (not a power of two).
HEADS = [(6, 2, 64, 16), (4, 1, 80, 32), (3, 3, 16, 16)]

# Implementations that run on CPU tensors (the op's impl argument): "native" is the CPU
# default (decode rows in the native C kernel where it builds, chunks through PyTorch's
# flash kernel); "torch" is the PyTorch-only CPU path; "gather_sdpa" is the CUDA default
# (plain PyTorch), checked here on CPU.
CPU_IMPLS = ["native", "torch", "gather_sdpa"]


# (q_lens, seq_lens) of each batch.
DECODE = ([1, 1, 1, 1], [1, 17, 40, 71])
# decode (prefix 36), chunked prefill with a 35-token prefix, fresh prefill (q_len == seq_len),
# fresh single-token prefill, another decode at a block boundary.
MIXED = ([1, 5, 23, 1, 1], [37, 40, 23, 1, 33])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ----------------------------------------------------------------------------- batch builder


def make_batch(q_lens, seq_lens, hq, hkv, d, block_size, dtype, device="cpu", skip_slots=(), cache_view=False):
    """Random step of continuous batching. ``skip_slots``: packed token indices whose
    slot is -1 (their K/V is not written). ``cache_view``: caches are non-contiguous
    views (k and v interleaved in one allocation)."""
    n = len(q_lens)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 5  # some blocks nobody owns
    perm = torch.randperm(num_blocks)
    # Unused table entries hold garbage: ids far out of range.
    block_tables = torch.full((n, max_blocks), 1 << 20, dtype=torch.int32)
    j = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = perm[j:j + nb].to(torch.int32)
        j += nb
    total = sum(q_lens)
    q = torch.randn(total, hq, d, dtype=dtype)
    k = torch.randn(total, hkv, d, dtype=dtype)
    v = torch.randn(total, hkv, d, dtype=dtype)
    if cache_view:
        both = torch.randn(num_blocks, block_size, 2, hkv, d, dtype=dtype)
        k_cache, v_cache = both[:, :, 0], both[:, :, 1]
    else:
        k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
        v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype)
    slots = []
    for i, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        for r in range(ql):
            p = sl - ql + r
            slots.append(int(block_tables[i, p // block_size]) * block_size + p % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    for t in skip_slots:
        slot_mapping[t] = -1
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    tensors = [q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens_t, query_start_loc]
    return [t.to(device) for t in tensors] if device != "cpu" else tensors


def reference(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale=None):
    """Returns (out fp64, k_cache after the write, v_cache after the write); inputs untouched."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    kc, vc = k_cache.detach().cpu().clone(), v_cache.detach().cpu().clone()
    slots = slot_mapping.cpu().long()
    bs = kc.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // bs, s % bs] = k[t]
            vc[s // bs, s % bs] = v[t]
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        if q1 == q0:
            continue
        pos = torch.arange(seq_len)
        blocks = block_tables[i].cpu().long()[pos // bs]
        kk = kc[blocks, pos % bs].double().repeat_interleave(group, 1)  # (L, Hq, D)
        vv = vc[blocks, pos % bs].double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), kk) * scale
        qpos = seq_len - (q1 - q0) + torch.arange(q1 - q0)
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
    return out, kc, vc


def assert_close(out, ref, dtype, rows=None):
    atol, rtol = TOL[dtype]
    out = out.detach().cpu().double()
    if rows is not None:
        out, ref = out[rows], ref[rows]
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    bound = atol + rtol * ref.abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, max err/bound {(err / bound).max().item():.2f}"


def run_op(batch, q_lens, seq_lens, scale=None, impl="auto"):
    return torch.ops.llmopt.paged_attention(*batch, max(q_lens), max(seq_lens), scale, impl=impl)


def check_step(batch, q_lens, seq_lens, dtype, out, ref):
    r_out, r_kc, r_vc = ref
    assert out.dtype == dtype and out.shape == batch[0].shape
    assert_close(out, r_out, dtype)
    # The cache write is a plain copy: bit-exact, and nothing else changed.
    assert torch.equal(batch[3].cpu(), r_kc)
    assert torch.equal(batch[4].cpu(), r_vc)


# ----------------------------------------------------------------------------- through the op


@pytest.mark.parametrize("impl", [*CPU_IMPLS, pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "hq{}-hkv{}-d{}-bs{}".format(*h))
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_op(impl, dtype, heads, kind):
    q_lens, seq_lens = DECODE if kind == "decode" else MIXED
    hq, hkv, d, bs = heads
    device = "cpu"
    if impl == "triton":
        if dtype not in TRITON_DTYPES:
            pytest.skip("the Triton interpreter has no bf16 tl.dot")
        device = TRITON_DEVICE
        if INTERPRET and kind == "decode":  # several splits, so the reduction kernel runs
            assert tp.decode_num_splits(len(q_lens), hkv, max(seq_lens)) == (3, 32)
    skip = (2,) if kind == "decode" else (3, 20)  # a decode token; an append and a prefill token
    batch = make_batch(q_lens, seq_lens, hq, hkv, d, bs, dtype, device=device, skip_slots=skip)
    ref = reference(*batch)
    out = run_op(batch, q_lens, seq_lens, impl=impl)
    check_step(batch, q_lens, seq_lens, dtype, out, ref)


@pytest.mark.parametrize("impl", [*CPU_IMPLS, pytest.param("triton", marks=needs_triton)])
def test_op_scale_and_cache_views(impl, monkeypatch):
    """Explicit scale, non-contiguous cache views (k/v interleaved), a sequence without new
    tokens in the batch (its output rows don't exist, its cache is only read by nobody)."""
    seq_lens = [50, 12, 29]
    device = "cpu"
    if impl == "triton":
        device = TRITON_DEVICE
    for q_lens in ([3, 0, 1], [1, 0, 1]):  # prefill kernel, decode kernel
        batch = make_batch(q_lens, seq_lens, 6, 2, 64, 16, F32, device=device, cache_view=True)
        assert not batch[3].is_contiguous()
        ref = reference(*batch, scale=0.3)
        out = run_op(batch, q_lens, seq_lens, scale=0.3, impl=impl)
        check_step(batch, q_lens, seq_lens, F32, out, ref)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_cpu_dtypes_decode_and_prefill(dtype, impl):
    for q_lens, seq_lens in (DECODE, MIXED, ([24], [24]), ([9], [10])):
        batch = make_batch(q_lens, seq_lens, 4, 2, 32, 16, dtype)
        ref = reference(*batch)
        check_step(batch, q_lens, seq_lens, dtype, run_op(batch, q_lens, seq_lens, impl=impl), ref)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_many_decode_sequences(impl):
    """40 decode rows of scattered lengths (the PyTorch path sorts them into several padded
    groups; the native kernel reads each in place): each row must still see exactly its own
    keys, and a prefill rides along."""
    g = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 120, (40,), generator=g).tolist() + [30]
    q_lens = [1] * 40 + [7]
    batch = make_batch(q_lens, seq_lens, 6, 2, 32, 16, F32)
    ref = reference(*batch)
    check_step(batch, q_lens, seq_lens, F32, run_op(batch, q_lens, seq_lens, impl=impl), ref)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("heads", [(8, 1, 72, 32), (32, 1, 64, 16), (5, 5, 24, 64), (12, 4, 128, 128)],
                         ids=lambda h: "hq{}-hkv{}-d{}-bs{}".format(*h))
def test_native_decode_kernel(dtype, heads, monkeypatch):
    """The native C decode kernel itself: built here, used by the op, and right for MQA with
    a 32-query group (its largest), MHA, head dims that are not powers of two or vector
    widths, block sizes up to its 128 limit and sequences of one to several hundred keys."""
    from llmopt.kernels import native

    if native.load("paged_decode") is None:
        pytest.skip("no C compiler here: the native kernel is not built (the PyTorch path is tested)")
    hq, hkv, d, bs = heads
    q = torch.empty(1, hq, d, dtype=dtype)
    assert pa._native_decode_fn(q, torch.empty(2, bs, hkv, d, dtype=dtype)) is not None
    g = torch.Generator().manual_seed(2)
    seq_lens = [1, bs, bs + 1, 3 * bs - 1] + torch.randint(1, 400, (5,), generator=g).tolist()
    q_lens = [1] * len(seq_lens)
    batch = make_batch(q_lens, seq_lens, hq, hkv, d, bs, dtype, skip_slots=(1,))
    ref = reference(*batch)
    check_step(batch, q_lens, seq_lens, dtype, run_op(batch, q_lens, seq_lens), ref)


def test_native_decode_kernel_limits_fall_back(monkeypatch):
    """Shapes past the kernel's fixed buffers (a 64-query group) take the PyTorch path."""
    assert pa._native_decode_fn(torch.empty(1, 64, 16), torch.empty(2, 16, 1, 16)) is None
    assert pa._native_decode_fn(torch.empty(1, 4, 16, dtype=F16), torch.empty(2, 16, 1, 16, dtype=F16)) is None
    seq_lens, q_lens = [20, 33], [1, 1]
    batch = make_batch(q_lens, seq_lens, 64, 1, 16, 16, F32)
    ref = reference(*batch)
    check_step(batch, q_lens, seq_lens, F32, run_op(batch, q_lens, seq_lens), ref)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "hq{}-hkv{}-d{}-bs{}".format(*h))
def test_short_append_rows_equal_single_decodes(dtype, heads):
    """A short causal append (a speculative verification step) gives each row, bit for bit,
    the output of decoding that token alone after the ones before it (what plain greedy
    decoding computes), for appends that cross block boundaries and ride along with other
    decodes; and stays right against the fp64 reference. Longer appends, fresh prefills and
    token trees keep the chunk path."""
    from llmopt.kernels import native

    if native.load("paged_decode") is None:
        pytest.skip("no C compiler here: the native decode kernel is not built")
    hq, hkv, d, bs = heads
    q_lens = [5, 9, 1, 3, pa._APPEND_AS_DECODE, 2]
    seq_lens = [bs + 3, 2 * bs + 7, 20, bs + 1, 3 * bs - 1, 2]  # the last: a fresh prefill of 2
    batch = make_batch(q_lens, seq_lens, hq, hkv, d, bs, dtype)
    ref = reference(*batch)
    out = run_op(batch, q_lens, seq_lens)
    check_step(batch, q_lens, seq_lens, dtype, out, ref)
    q, k, v, k_cache, v_cache, _, block_tables, _, query_start_loc = batch
    starts = query_start_loc.tolist()
    for i, (q_len, seq_len) in enumerate(zip(q_lens[:-1], seq_lens[:-1])):
        for r in range(q_len):
            t = starts[i] + r
            alone = torch.ops.llmopt.paged_attention(  # the cache already holds the step's keys: no write
                q[t:t + 1], k[t:t + 1], v[t:t + 1], k_cache, v_cache, torch.tensor([-1]), block_tables[i:i + 1],
                torch.tensor([seq_len - q_len + r + 1]), torch.tensor([0, 1]), 1, seq_len)
            assert torch.equal(alone[0], out[t]), f"sequence {i} row {r}"
    plan = pa.plan_cpu_step(block_tables, torch.tensor(seq_lens), query_start_loc, bs, k_cache.shape[0],
                            q.shape[0], dtype)
    assert [(p.q0, p.q1) for p in plan.prefills] == [(starts[-2], starts[-1])]  # only the fresh prefill
    longer = pa.plan_cpu_step(torch.zeros((1, 4), dtype=torch.int32), torch.tensor([50]),
                              torch.tensor([0, pa._APPEND_AS_DECODE + 1]), 16, 4, 17, dtype)
    tree = pa.plan_cpu_step(torch.zeros((1, 4), dtype=torch.int32), torch.tensor([50]),
                            torch.tensor([0, 3]), 16, 4, 3, dtype, append_masks={0: torch.eye(3, dtype=torch.bool)})
    assert len(longer.prefills) == 1 and len(tree.prefills) == 1
    assert longer.native_decode is None and tree.native_decode is None


# ----------------------------------------------------------------------------- launchers


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_decode_split_kv(dtype, num_splits):
    """Forced split counts: 3 splits of 24 keys (ragged tiles inside each split), 7 of 11
    keys (splits shorter than a key tile, empty splits for the short sequences)."""
    q_lens, seq_lens = DECODE
    batch = make_batch(q_lens, seq_lens, 6, 2, 80, 16, dtype, device=TRITON_DEVICE)
    ref = reference(*batch)
    q, k, v, kc, vc, slots, bt, sl, qsl = batch
    tp.write_kv_cache(k, v, kc, vc, slots)
    out = tp.paged_decode(q, kc, vc, bt, sl, qsl, max(seq_lens), num_splits=num_splits)
    check_step(batch, q_lens, seq_lens, dtype, out, ref)


@needs_triton
def test_decode_num_splits_policy():
    if INTERPRET:
        assert tp.decode_num_splits(4, 2, 64, interpret_split_tokens=64) == (1, 64)
        assert tp.decode_num_splits(4, 2, 65, interpret_split_tokens=64) == (2, 64)
        assert tp.decode_num_splits(4, 2, 65) == (3, tp.INTERPRET_SPLIT_TOKENS)
        assert tp.decode_num_splits(4, 2, 65, interpret_split_tokens=4) == (5, 16)  # at least 16
    else:
        splits, tokens = tp.decode_num_splits(1, 1, 100, torch.device("cuda"))
        assert splits == 1  # short sequence
        splits, tokens = tp.decode_num_splits(1, 1, 32768, torch.device("cuda"))
        assert splits > 1 and tokens % tp.DECODE_SPLIT_ALIGN == 0 and splits * tokens >= 32768


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "hq{}-hkv{}-d{}-bs{}".format(*h))
def test_prefill_launcher(dtype, heads):
    """Prefill/append kernel directly, including on the decode rows of a mixed batch and a
    chunk longer than one query tile spanning several key tiles."""
    q_lens, seq_lens = [1, 5, 23, 40], [37, 40, 23, 70]
    hq, hkv, d, bs = heads
    batch = make_batch(q_lens, seq_lens, hq, hkv, d, bs, dtype, device=TRITON_DEVICE)
    ref = reference(*batch)
    q, k, v, kc, vc, slots, bt, sl, qsl = batch
    tp.write_kv_cache(k, v, kc, vc, slots)
    out = tp.paged_prefill(q, kc, vc, bt, sl, qsl, max(q_lens))
    check_step(batch, q_lens, seq_lens, dtype, out, ref)


@needs_triton
@pytest.mark.parametrize("cache_view", [False, True])
def test_write_kv_cache(cache_view):
    q_lens, seq_lens = [2, 7, 1], [9, 7, 30]
    batch = make_batch(q_lens, seq_lens, 4, 4, 80, 32, F16, device=TRITON_DEVICE, skip_slots=(0, 5),
                       cache_view=cache_view)
    _, r_kc, r_vc = reference(*batch)
    q, k, v, kc, vc, slots, *_ = batch
    before = kc.clone()
    tp.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc.cpu(), r_kc) and torch.equal(vc.cpu(), r_vc)
    # -1 slots were not written: token 0's slot still holds the old data.
    pos = 9 - 2  # token 0 is position 7 of sequence 0
    blk = int(batch[6][0, pos // 32])
    assert torch.equal(kc[blk, pos % 32].cpu(), before[blk, pos % 32].cpu())


# ----------------------------------------------------------------------------- op plumbing


def test_opcheck_cpu(monkeypatch):
    q_lens, seq_lens = MIXED
    batch = make_batch(q_lens, seq_lens, 6, 2, 16, 16, F32, skip_slots=(4,))
    torch.library.opcheck(torch.ops.llmopt.paged_attention.default, (*batch, max(q_lens), max(seq_lens), None))
    q_lens, seq_lens = DECODE
    batch = make_batch(q_lens, seq_lens, 4, 1, 16, 32, F32)
    torch.library.opcheck(torch.ops.llmopt.paged_attention.default, (*batch, 1, max(seq_lens), 0.5))


def test_fake_and_compile(monkeypatch):
    q_lens, seq_lens = MIXED
    batch = make_batch(q_lens, seq_lens, 6, 2, 16, 16, F32)
    ref = reference(*batch)

    @torch.compile(backend="eager", fullgraph=True)
    def step(*args):
        return torch.ops.llmopt.paged_attention(*args, max(q_lens), max(seq_lens)) * 1.0

    out = step(*batch)
    check_step(batch, q_lens, seq_lens, F32, out, ref)


def _bad(**changes):
    q_lens, seq_lens = [1, 3], [5, 3]
    q, k, v, kc, vc, slots, bt, sl, qsl = make_batch(q_lens, seq_lens, 4, 2, 16, 16, F32)
    args = dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots, block_tables=bt, seq_lens=sl,
                 query_start_loc=qsl, max_query_len=3, max_seq_len=5, scale=None)
    for key, fn in changes.items():
        args[key] = fn(args[key])
    return args


@pytest.mark.parametrize("changes, match", [
    (dict(q=lambda t: t[0]), "q must be 3-D"),
    (dict(q=lambda t: t.double(), k=lambda t: t.double(), v=lambda t: t.double(),
          k_cache=lambda t: t.double(), v_cache=lambda t: t.double()), "not supported"),
    (dict(k=lambda t: t.half()), "k must have q's dtype"),
    (dict(q=lambda t: t[:, :3]), "must be a multiple"),
    (dict(q=lambda t: t[..., :8], k=lambda t: t[..., :8], v=lambda t: t[..., :8],
          k_cache=lambda t: t[..., :8], v_cache=lambda t: t[..., :8]), "out of the supported range"),
    (dict(k_cache=lambda t: t[:, :12], v_cache=lambda t: t[:, :12]), "power of two"),
    (dict(v_cache=lambda t: t[:-1]), "same shape"),
    (dict(slot_mapping=lambda t: t[:-1]), "one entry per new token"),
    (dict(slot_mapping=lambda t: t.float()), "int32 or int64"),
    (dict(seq_lens=lambda t: t[:1]), "one entry per sequence"),
    (dict(query_start_loc=lambda t: t[:-1]), "N \\+ 1"),
    (dict(max_query_len=lambda x: 9), "cannot exceed"),
    (dict(k=lambda t: t[:, :1], v=lambda t: t[:, :1]), "caches must be"),
])
def test_validation(changes, match, monkeypatch):
    args = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        pa.paged_attention(**args)


def test_validation_cpu_metadata(monkeypatch):
    args = _bad(seq_lens=lambda t: torch.tensor([5, 2], dtype=torch.int32))
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match="new tokens but seq_len"):
        pa.paged_attention(**args)
    assert torch.equal(args["k_cache"], before)  # nothing written by a rejected step
    args = _bad(slot_mapping=lambda t: t + 10_000)
    with pytest.raises(ValueError, match="past the cache"):
        pa.paged_attention(**args)
    args = _bad(block_tables=lambda t: t + 10_000)
    with pytest.raises(ValueError, match="block ids outside"):
        pa.paged_attention(**args)
