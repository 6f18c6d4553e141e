"""Weight quantization of linear layers: configs, quantizers, calibration, storage.

``torch.compile(model, backend="llmopt", options={"quantize": "int4", "group_size": 128})``
quantizes while compiling (``passes/quantize_linear.py``). To quantize once and
reuse the result at every start::

    weights = quantize_weights(model, QuantConfig("int4", group_size=128, skip=("lm_head",)))
    save_quantized(weights, "model.int4.safetensors")
    torch.compile(model, backend="llmopt",
                  options={"quantize": "int4", "quantized_weights": "model.int4.safetensors"})
"""

from llmopt.quantization.config import GROUP_SIZES, MODES, QuantConfig
from llmopt.quantization.quantize import (
    QuantizedLinear,
    calibrate,
    quantize_weight,
    quantize_weights,
    smoothing_factors,
)
from llmopt.quantization.storage import QuantizedWeights, load_quantized, save_quantized, weight_bytes

__all__ = [
    "GROUP_SIZES",
    "MODES",
    "QuantConfig",
    "QuantizedLinear",
    "QuantizedWeights",
    "calibrate",
    "load_quantized",
    "quantize_weight",
    "quantize_weights",
    "save_quantized",
    "smoothing_factors",
    "weight_bytes",
]
