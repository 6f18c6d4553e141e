"""The error the ONNX export raises for anything the user can act on."""


class OnnxExportError(RuntimeError):
    """The model (or an op in its rewritten graph) cannot be exported to ONNX; the
    message names what and, where known, where in the model."""
