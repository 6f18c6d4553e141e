"""ONNX Runtime's ``com.microsoft`` operators that the export emits, as onnxscript ops.

The ``onnx`` package knows only the standard operators; onnxscript builds a
node from an operator's schema, so the two contrib operators used here are
declared with the parts of their ONNX Runtime schemas that the export uses
(inputs in order, the optional ones marked, and the attributes set).
"""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

DOMAIN = "com.microsoft"
MICROSOFT = Opset(DOMAIN, 1)

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _op(name: str, inputs, outputs, type_constraints, attributes) -> Op:
    def params(spec):
        return [OpSchema.FormalParameter(n, t, param_option=OpSchema.FormalParameterOption.Optional
                                         if optional else OpSchema.FormalParameterOption.Single)
                for n, t, optional in spec]

    schema = OpSchema(
        name, DOMAIN, 1,
        inputs=params(inputs),
        outputs=params(outputs),
        type_constraints=[(t, allowed, "") for t, allowed in type_constraints],
        attributes=[OpSchema.Attribute(a, kind, "", required=False) for a, kind in attributes],
    )
    return Op(MICROSOFT, name, schema)


GroupQueryAttention = _op(
    "GroupQueryAttention",
    inputs=[
        ("query", "T", False), ("key", "T", True), ("value", "T", True),
        ("past_key", "T", True), ("past_value", "T", True),
        ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
    ],
    outputs=[("output", "T", False), ("present_key", "T", False), ("present_value", "T", False)],
    type_constraints=[("T", _FLOATS), ("M", ["tensor(int32)"])],
    attributes=[("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
                ("scale", OpSchema.AttrType.FLOAT), ("local_window_size", OpSchema.AttrType.INT)],
)

MatMulNBits = _op(
    "MatMulNBits",
    inputs=[
        ("A", "T1", False), ("B", "T2", False), ("scales", "T1", False),
        ("zero_points", "T3", True), ("g_idx", "T4", True), ("bias", "T1", True),
    ],
    outputs=[("Y", "T1", False)],
    type_constraints=[("T1", _FLOATS), ("T2", ["tensor(uint8)"]), ("T3", ["tensor(uint8)", *_FLOATS]),
                      ("T4", ["tensor(int32)"])],
    attributes=[("K", OpSchema.AttrType.INT), ("N", OpSchema.AttrType.INT), ("bits", OpSchema.AttrType.INT),
                ("block_size", OpSchema.AttrType.INT), ("accuracy_level", OpSchema.AttrType.INT)],
)
