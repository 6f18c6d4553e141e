"""A mask built from shapes alone that is causal becomes the fused call's causal offset;
any other mask (an input, a random one, a non-causal constant) stays a mask. Outputs
equal eager either way (fp64)."""

import torch
import torch.nn.functional as F

import llmopt
from llmopt.models import random_llama


def _compiled(module, *inputs, **kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="llmopt", options={"lower": "eager"})
    out = compiled(*inputs, **kwargs)
    return out, [r.detail for r in llmopt.last_report().rewrites("attention")]


class ShapeMask(torch.nn.Module):
    """SDPA with a boolean mask made of arange comparisons on the inputs' sizes."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        rows = torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
        cols = torch.arange(k.shape[2])[None, :]
        if self.kind == "causal":
            mask = cols <= rows
        elif self.kind == "window":  # causal but only the last 3 keys: not the causal mask
            mask = (cols <= rows) & (cols > rows - 3)
        else:  # random: never a constant
            mask = (cols <= rows) & (torch.rand(q.shape[2], k.shape[2]) < 2.0)
        mask = mask[None, None].expand(q.shape[0], 1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(q_len=6, k_len=6):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, n, 8, generator=gen, dtype=torch.float64) for n in (q_len, k_len, k_len)]


def test_constant_causal_mask_is_folded_into_the_causal_offset():
    for q_len, k_len in ((6, 6), (3, 7)):  # also a query block after a prefix (offset 4)
        q, k, v = _qkv(q_len, k_len)
        out, details = _compiled(ShapeMask("causal"), q, k, v)
        assert details == ["sdpa, 4q/4kv heads, causal (constant mask proven causal)"], details
        torch.testing.assert_close(out, ShapeMask("causal")(q, k, v), atol=1e-12, rtol=0)


def test_other_masks_stay_masks():
    q, k, v = _qkv()
    for kind in ("window", "random"):
        out, details = _compiled(ShapeMask(kind), q, k, v)
        assert len(details) == 1 and "bool mask" in details[0] and "proven causal" not in details[0], (kind, details)
        torch.testing.assert_close(out, ShapeMask(kind)(q, k, v), atol=1e-12, rtol=0)


def test_hugging_face_mask_is_folded_only_without_an_attention_mask_input():
    model = random_llama(num_layers=2, hidden_size=64, vocab_size=128).double()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = model(input_ids=ids).logits
    out, details = _compiled(model, input_ids=ids, use_cache=False)
    assert len(details) == 2 and all(d.endswith("(constant mask proven causal)") for d in details), details
    torch.testing.assert_close(out.logits, reference, atol=1e-12, rtol=0)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0  # left padding: the mask reads an input, it is not a constant
    out, details = _compiled(model, input_ids=ids, attention_mask=padded, use_cache=False)
    assert len(details) == 2 and all("bool mask" in d for d in details), details
    torch.testing.assert_close(out.logits[1], model(input_ids=ids, attention_mask=padded).logits[1],
                               atol=1e-12, rtol=0)
