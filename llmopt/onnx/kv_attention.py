"""``llmopt::attention_kv_cache``: causal attention that appends to a key/value cache.

The export form of ``llmopt::attention`` (see ``kv_cache_pass.py``), with the
contract of ONNX Runtime's ``com.microsoft::GroupQueryAttention`` that it is
translated to:

* ``q`` ``(B, Hq, T, D)``, ``k``/``v`` ``(B, Hkv, T, D)``: the step's new tokens;
  ``past_key``/``past_value`` ``(B, Hkv, P, D)``: what earlier steps cached
  (``P`` may be 0).
* ``present_key = cat(past_key, k)`` along the length axis (likewise values),
  ``(B, Hkv, P + T, D)``.
* Query ``i`` sits at position ``P + i`` and attends the present keys
  ``j <= P + i`` (causal, bottom-right aligned), and with ``window > 0`` only
  the last ``window`` of them (``P + i - j < window``, sliding-window models
  such as Mistral); query head ``h`` reads KV head ``h // (Hq / Hkv)``.
* Returns ``(out, present_key, present_value)``, ``out`` like ``q``.

Every row of the batch has the same length: there is no padding mask.
The PyTorch implementation runs ``llmopt::attention`` on the present cache,
so the exported graph can be checked in PyTorch before it is translated.
"""

from __future__ import annotations

import torch
from torch import Tensor

import llmopt.kernels.attention  # noqa: F401  (registers llmopt::attention)


@torch.library.custom_op("llmopt::attention_kv_cache", mutates_args=())
def attention_kv_cache(
    q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, scale: float, window: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    present_key = torch.cat((past_key, k), dim=2)
    present_value = torch.cat((past_value, v), dim=2)
    past, total = past_key.shape[2], present_key.shape[2]
    mask = None
    if window > 0:
        rows = torch.arange(past, total, device=q.device)[:, None]
        mask = rows - torch.arange(total, device=q.device)[None, :] < window
    out, _ = torch.ops.llmopt.attention(q, present_key, present_value, mask, past, scale)
    return out, present_key, present_value


@attention_kv_cache.register_fake
def _(q, k, v, past_key, past_value, scale, window=-1):
    total = past_key.shape[2] + k.shape[2]
    present_shape = (k.shape[0], k.shape[1], total, k.shape[3])
    return q.new_empty(q.shape), k.new_empty(present_shape), v.new_empty(present_shape)
