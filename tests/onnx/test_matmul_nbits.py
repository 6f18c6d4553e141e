"""llmopt's int4/int8 weights converted to ONNX Runtime's MatMulNBits format.

Two checks: the conversion (``NBitsWeight.linear``: ``llmopt::matmul_nbits``'s
PyTorch implementation, which dequantizes with MatMulNBits's formula, plus
the int4 block offsets) against llmopt's own ``llmopt::linear_int4`` /
``linear_int8`` on the same inputs, for every weight layout llmopt installs;
and ONNX Runtime's MatMulNBits, run on the converted tensors in a one-node
model, against that same PyTorch implementation (so the formula we converted
to is the one ONNX Runtime computes).

Weights are ``N(0, 1/K)`` and inputs ``N(0, 1)``, so outputs are O(1).
"""

import pytest
import torch

import llmopt.kernels.quantized_linear as ql
from llmopt.onnx.matmul_nbits import block_offsets, from_llmopt_int4, from_llmopt_int8
from llmopt.quantization import quantize_weight

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# fp32 throughout. The converted weight is llmopt's exactly; the products are
# summed in a different order (int4: the zeros through block sums): observed
# <= 1e-6 on these O(1) outputs; 2e-5 leaves room and still catches a
# misplaced nibble or block (errors of O(0.1)).
ATOL = RTOL = 2e-5


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def _x(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def _llmopt_int4(weight, group_size, layout):
    q = quantize_weight(weight, "int4", group_size)
    qweight, scales_zeros = q.tensors["qweight"], q.tensors["scales_zeros"]
    if layout == "cpu_tiled":
        qweight = ql.to_cpu_int4_layout(qweight)
    return qweight, scales_zeros


@pytest.mark.parametrize("layout", ["nibble", "cpu_tiled"])
@pytest.mark.parametrize("n,k,group_size", [(32, 64, 32), (48, 200, 64)])  # 200: K padded to whole groups
def test_int4_conversion_matches_llmopt_linear_int4(layout, n, k, group_size):
    qweight, scales_zeros = _llmopt_int4(_weight(n, k), group_size, layout)
    x, bias = _x(5, k), torch.randn(n)
    # fp32 arithmetic, as the export asks for (kernels.quant_cpu_dtype="float32")
    expected = ql.linear_int4(x, qweight, scales_zeros, group_size, layout, bias, compute_dtype=torch.float32)
    w = from_llmopt_int4(qweight, scales_zeros, group_size, layout, k, torch.float32)
    assert w.b.shape == (n, -(-k // group_size), group_size // 2) and w.b.dtype == torch.uint8
    assert w.zero_points is None  # the default, 8; llmopt's float zeros are the block offsets
    torch.testing.assert_close(w.linear(x, bias), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("k", [64, 72])  # 72: the CPU layout pads to 80 columns, blocks pad to 128
def test_int8_conversion_matches_llmopt_linear_int8(k):
    n = 24
    q = quantize_weight(_weight(n, k), "int8")
    qweight = ql.pad_int8_for_cpu(q.tensors["qweight"])
    x = _x(3, k)
    expected = ql.linear_int8(x, qweight, q.tensors["scales"], compute_dtype=torch.float32)
    w = from_llmopt_int8(qweight, q.tensors["scales"], k, torch.float32)
    assert w.zero_points is None and w.offsets is None  # 8-bit: the default zero point, 128
    torch.testing.assert_close(w.linear(x), expected, atol=ATOL, rtol=RTOL)


def _run_onnx_matmul_nbits(x, w, bias):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w.b.numpy(), "B"), numpy_helper.from_array(w.scales.numpy(), "scales"),
             numpy_helper.from_array(bias.numpy(), "bias")]
    zero_points = ""
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points.numpy(), "zero_points"))
        zero_points = "zero_points"
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", zero_points, "", "bias"], ["Y"],
                            domain="com.microsoft", K=w.in_features, N=w.out_features, bits=w.bits,
                            block_size=w.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", w.in_features])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", w.out_features])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"A": x.numpy()})[0])


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_onnxruntime_matmul_nbits_computes_the_converted_formula(mode):
    n, k = 32, 200
    weight, x, bias = _weight(n, k), _x(4, k), torch.randn(n)
    if mode == "int4":
        qweight, scales_zeros = _llmopt_int4(weight, 32, "nibble")
        w = from_llmopt_int4(qweight, scales_zeros, 32, "nibble", k, torch.float32)
    else:
        q = quantize_weight(weight, "int8")
        w = from_llmopt_int8(q.tensors["qweight"], q.tensors["scales"], k, torch.float32)
    got = _run_onnx_matmul_nbits(x, w, bias)
    if w.offsets is not None:  # in the exported graph: ReduceSum and MatMul nodes, not this node
        got = got + block_offsets(x, w.offsets, w.block_size)
    torch.testing.assert_close(got, w.linear(x, bias), atol=ATOL, rtol=RTOL)
