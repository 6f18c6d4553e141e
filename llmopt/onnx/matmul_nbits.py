"""``llmopt::matmul_nbits``: ONNX Runtime's ``MatMulNBits`` as a PyTorch op, and the
conversions from llmopt's quantized weights to its format.

``MatMulNBits`` (``com.microsoft``) computes ``A @ W.T (+ bias)`` with ``W``
``(N, K)`` quantized block-wise along K:

* ``B`` uint8 ``(N, n_blocks, block_size * bits / 8)``, ``n_blocks = ceil(K / block_size)``;
  4-bit values two per byte, the first in the low nibble;
* ``scales`` ``(N, n_blocks)`` in A's dtype; ``zero_points`` optional, by
  default ``2 ** (bits - 1)`` (8 for 4 bits);
* ``W[n, k] = (q[n, k] - zero_points[n, j]) * scales[n, j]`` for ``k`` in block ``j``.

llmopt's int4 format (``kernels/quantized_linear.py``) is
``W = (q - 8) * s + z``: the default zero point, plus a per-block float offset
``z``. Folding ``z`` into a float zero point (``8 - z / s``) is exact but takes
ONNX Runtime's CPU kernel off its fast path (slower than the fp32 MatMul;
docs/PERFORMANCE.md), and an integer zero point would change the
weights. So a converted layer is ``MatMulNBits(x)`` (default zero point) plus
``block_offsets(x) = (x summed over each block) @ z.T``, a ``(.., n_blocks) x
(n_blocks, N)`` product: exact, and small next to the layer. The nibble
layout is already ``B``'s (byte ``k // 2``, low nibble even ``k``, whole
groups along K); weights the CPU kernel repacked (``"cpu_tiled"``) are read
back through that same kernel, and llmopt's C kernel's ``"cpu_native"`` tile
order is undone by reordering. llmopt's int8 (symmetric per row, ``W = q * s``)
is 8-bit ``MatMulNBits`` with ``q + 128`` and the default zero point, 128.

The PyTorch implementation dequantizes with that formula, so a converted
layer can be checked against llmopt's own kernel before export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmopt.kernels.quantized_linear import from_cpu_native_int4_layout, pack_int4, unpack_int4


@torch.library.custom_op("llmopt::matmul_nbits", mutates_args=())
def matmul_nbits(
    a: Tensor,
    b: Tensor,
    scales: Tensor,
    zero_points: Optional[Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    block_size: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    weight = dequantize(b, scales, zero_points, in_features, bits, block_size).to(a.dtype)
    out = a @ weight.t()
    return out if bias is None else out + bias.to(out.dtype)


@matmul_nbits.register_fake
def _(a, b, scales, zero_points, in_features, out_features, bits, block_size, bias=None):
    return a.new_empty((*a.shape[:-1], out_features))


def dequantize(b: Tensor, scales: Tensor, zero_points: Optional[Tensor], in_features: int, bits: int,
               block_size: int) -> Tensor:
    """``MatMulNBits``'s weight ``(N, K)`` in fp32 (no zero points: ``2 ** (bits - 1)``)."""
    n = b.shape[0]
    q = unpack_int4(b.reshape(n, -1)) if bits == 4 else b.reshape(n, -1)
    q = q.float()
    if zero_points is None:
        zeros = torch.full((), 2.0 ** (bits - 1))
    else:
        zeros = zero_points.float().repeat_interleave(block_size, dim=1)
    steps = scales.float().repeat_interleave(block_size, dim=1)
    return ((q - zeros) * steps)[:, :in_features]


def block_offsets(a: Tensor, offsets: Tensor, block_size: int) -> Tensor:
    """``a @ Z.T`` for ``Z[n, k] = offsets[n, k // block_size]`` (``offsets`` ``(N, n_blocks)``):
    ``a`` summed over each block of K (zero-padded to whole blocks), times ``offsets.T``."""
    blocks = offsets.shape[1]
    padding = blocks * block_size - a.shape[-1]
    if padding:
        a = F.pad(a, (0, padding))
    return a.unflatten(-1, (blocks, block_size)).sum(-1) @ offsets.t()


@dataclass
class NBitsWeight:
    """One layer's ``MatMulNBits`` inputs and attributes, and its block offsets."""

    b: Tensor
    scales: Tensor
    zero_points: Optional[Tensor]  # None: the default, 2 ** (bits - 1)
    in_features: int
    out_features: int
    bits: int
    block_size: int
    offsets: Optional[Tensor] = None  # (N, n_blocks), added through block_offsets; None: none

    def linear(self, a: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """The converted layer in PyTorch (what the export computes)."""
        out = matmul_nbits(a, self.b, self.scales, self.zero_points, self.in_features, self.out_features,
                           self.bits, self.block_size, bias)
        return out if self.offsets is None else out + block_offsets(a, self.offsets, self.block_size)


def from_llmopt_int4(qweight: Tensor, scales_zeros: Tensor, group_size: int, layout: str,
                     in_features: int, dtype: torch.dtype) -> NBitsWeight:
    """llmopt's int4 weight (``llmopt::linear_int4`` inputs) -> ``MatMulNBits``, 4 bits."""
    n = qweight.shape[0]
    if layout == "cpu_native":  # llmopt's own tile order: unpacked by reordering (bf16 scales, exact)
        qweight, scales_zeros = from_cpu_native_int4_layout(qweight, scales_zeros)
    nibbles = _nibbles_from_cpu_tiled(qweight, scales_zeros.shape[0], group_size) if layout == "cpu_tiled" else qweight
    blocks = scales_zeros.shape[0]
    b = nibbles.reshape(n, blocks, group_size // 2).contiguous()
    scales = scales_zeros[..., 0].t().to(dtype).contiguous()
    offsets = scales_zeros[..., 1].t().to(dtype).contiguous()  # (q - 8) * s + z: z is the offset
    return NBitsWeight(b, scales, None, in_features, n, 4, group_size, offsets)


def from_llmopt_int8(qweight: Tensor, scales: Tensor, in_features: int, dtype: torch.dtype,
                     block_size: int = 128) -> NBitsWeight:
    """llmopt's int8 weight (``llmopt::linear_int8`` inputs) -> ``MatMulNBits``, 8 bits.

    The per-row scale is repeated for every block; padding columns (CPU
    layouts pad to 16) and the last block's tail hold 128, i.e. zero weights.
    """
    n = qweight.shape[0]
    block_size = min(block_size, max(16, 1 << (in_features - 1).bit_length()))
    blocks = -(-in_features // block_size)
    q = torch.full((n, blocks * block_size), 128, dtype=torch.uint8)
    q[:, :in_features] = (qweight[:, :in_features].to(torch.int16) + 128).to(torch.uint8)
    steps = scales.double()[:, None].expand(n, blocks)
    return NBitsWeight(q.reshape(n, blocks, block_size), steps.to(dtype).contiguous(), None,
                       in_features, n, 8, block_size)


def _nibbles_from_cpu_tiled(packed: Tensor, groups: int, group_size: int) -> Tensor:
    """The nibble layout of a weight that ``aten._convert_weight_to_int4pack_for_cpu`` repacked.

    The tiled order is the kernel's own business, so ask the kernel: with every
    scale 1 and every zero 8 it computes ``W = (q - 8) * 1 + 8 = q``, and
    multiplying the identity by ``W.T`` reads ``q`` back. In bf16, which holds
    0..15 and the one-term sums exactly and runs the kernel's fast path (its
    fp32 path is far slower: docs/PERFORMANCE.md); in row
    chunks, to bound the identity's size.
    """
    n = packed.shape[0]
    padded_k = groups * group_size
    unit = torch.stack((torch.ones(groups, n), torch.full((groups, n), 8.0)), dim=-1).to(torch.bfloat16)
    rows = []
    for start in range(0, padded_k, 1024):
        eye = torch.eye(padded_k, dtype=torch.bfloat16)[start:start + 1024]
        rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, unit))
    q = torch.cat(rows).t().to(torch.uint8)  # (N, Kp), exact integers
    return pack_int4(q)
