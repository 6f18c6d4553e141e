"""ONNX translations of llmopt's export-form ops, for ``torch.onnx.export``'s
``custom_translation_table``.

Each function is traced by the exporter: it receives the op's tensor inputs as
ONNX values (with the shapes of the exported program) and its non-tensor
arguments as Python values, and builds ONNX nodes.

* ``llmopt::attention_kv_cache`` -> ``com.microsoft::GroupQueryAttention``
  (BSH query/key/value, BNSH past/present, ``seqlens_k = P + T - 1`` per row,
  ``total_sequence_length = P + T``, a sliding window as ``local_window_size``),
  with the layout changes around it.
* ``llmopt::matmul_nbits`` -> ``com.microsoft::MatMulNBits``.
"""

from __future__ import annotations

from typing import Callable

import onnx
import torch
from onnxscript import opset18 as op

import llmopt.onnx.kv_attention  # noqa: F401  (registers the ops translated here)
import llmopt.onnx.matmul_nbits  # noqa: F401
from llmopt.onnx.contrib_ops import GroupQueryAttention, MatMulNBits

_INT32 = onnx.TensorProto.INT32
_BSND = [0, 2, 1, 3]  # (B, H, T, D) <-> (B, T, H, D), its own inverse


def attention_kv_cache(q, k, v, past_key, past_value, scale: float, window: int = -1):
    q_heads, head_dim = _static_dim(q, 1), _static_dim(q, 3)
    kv_heads = _static_dim(k, 1)
    merge_heads = op.Constant(value_ints=[0, 0, -1])
    query = op.Reshape(op.Transpose(q, perm=_BSND), merge_heads)
    key = op.Reshape(op.Transpose(k, perm=_BSND), merge_heads)
    value = op.Reshape(op.Transpose(v, perm=_BSND), merge_heads)
    total = op.Add(op.Shape(past_key, start=2, end=3), op.Shape(k, start=2, end=3))  # (1,) int64
    last = op.Sub(total, op.Constant(value_ints=[1]))
    seqlens_k = op.Cast(op.Expand(last, op.Shape(q, start=0, end=1)), to=_INT32)  # (B,)
    total_sequence_length = op.Squeeze(op.Cast(total, to=_INT32))  # scalar
    # local_window_size counts the query's own key too (checked against Mistral's mask in the tests).
    window_attrs = {"local_window_size": window} if window > 0 else {}
    out, present_key, present_value = GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
        num_heads=q_heads, kv_num_heads=kv_heads, scale=float(scale), **window_attrs,
    )
    split_heads = op.Constant(value_ints=[0, 0, q_heads, head_dim])
    return op.Transpose(op.Reshape(out, split_heads), perm=_BSND), present_key, present_value


def matmul_nbits_translation(accuracy_level: int = 0) -> Callable:
    """``llmopt::matmul_nbits`` -> ``MatMulNBits``; ``accuracy_level`` 4 lets ONNX Runtime
    quantize the activations to int8 (faster, less exact; 0 computes in A's dtype)."""

    def matmul_nbits(a, b, scales, zero_points, in_features: int, out_features: int, bits: int,
                     block_size: int, bias=None):
        return MatMulNBits(a, b, scales, zero_points, None, bias, K=in_features, N=out_features,
                           bits=bits, block_size=block_size, accuracy_level=accuracy_level)

    return matmul_nbits


def translation_table(accuracy_level: int = 0) -> dict:
    return {
        torch.ops.llmopt.attention_kv_cache.default: attention_kv_cache,
        torch.ops.llmopt.matmul_nbits.default: matmul_nbits_translation(accuracy_level),
    }


def _static_dim(value, axis: int) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"GroupQueryAttention needs a static head count and head size; "
                         f"axis {axis} of {value.name} is {dim!r}")
    return dim
