"""llmopt::paged_attention_layer outside the serving runtime: a clear error, not torch's
"could not run ... with arguments from the 'CPU' backend"."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from llmopt.kernels.paged_layer import OUTSIDE_RUNTIME

# A fresh interpreter that never imports llmopt.runtime (this test process may have, through
# other tests): a paged graph compiled and called directly, as a user would.
_OUTSIDE = textwrap.dedent("""
    import sys, torch
    import llmopt
    from llmopt.kernels.paged_layer import PagedGraphOutsideRuntime
    from llmopt.models import random_llama

    model = random_llama(heads="gqa", num_layers=2)

    def forward(input_ids, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    compiled = torch.compile(forward, backend="llmopt", options={OPTIONS})
    try:
        compiled(torch.tensor([[4, 5, 6]]), torch.tensor([[0, 1, 2]]))
        print("RAN")
    except PagedGraphOutsideRuntime as error:
        print("ERROR", error)
    print("PAGED", llmopt.last_report().count("paged_attention"))
    print("RUNTIME", sorted(m for m in sys.modules if m.startswith("llmopt.runtime")))
""")


def test_paged_graph_outside_the_runtime_says_where_it_runs():
    code = _OUTSIDE.replace("{OPTIONS}", repr({"paging": {"enabled": True}, "lower": "eager"}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["RUNTIME"] == "[]"  # the runtime's implementation was never loaded
    assert lines["PAGED"] == "2"  # both attentions were paged, so the error is the op's
    assert lines["ERROR"].startswith(OUTSIDE_RUNTIME)
    assert "llmopt.LLM" in lines["ERROR"] and "'G.model.model.layers.0.self_attn'" in lines["ERROR"]


def test_the_runtime_implementation_takes_precedence_over_the_default():
    from llmopt.runtime.paged_context import PagedKVCache, PagedStep, paged_step

    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cache = PagedKVCache(num_blocks=1, block_size=4)
    step = PagedStep(torch.tensor([0, 1, 2]), torch.tensor([[0]]), torch.tensor([3]),
                     torch.tensor([0, 3]), 3, 3)
    with paged_step(cache, step):
        out = torch.ops.llmopt.paged_attention_layer(q, k, v, "layer", 8 ** -0.5, "torch")
    # the runtime's op wrote the cache and attended causally: row i sees keys 0..i
    torch.testing.assert_close(cache.layers["layer"][0][0, :3], k)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk.double()) * 8 ** -0.5
    scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
