"""Weight quantization of linear layers: configs, quantizers, calibration, storage.

``torch.compile(model, backend="llmopt", options={"quantize": "int4"})``
quantizes while compiling (``passes/quantize_linear.py``), without data: int4
g32 min..max grids, round to nearest (QuantConfig's data-free default). To quantize once and
reuse the result at every start (with calibration text, int4 uses GPTQ)::

    batches = token_batches(tokenizer(text, return_tensors="pt").input_ids[0][:2048])
    weights = quantize_weights(model, QuantConfig("int4", group_size=128, skip=("lm_head",)),
                               calibration=batches)
    save_quantized(weights, "model.int4.safetensors")
    torch.compile(model, backend="llmopt",
                  options={"quantize": "int4", "quantize_skip": ["lm_head"],
                           "quantized_weights": "model.int4.safetensors"})

``QuantConfig(..., tune_steps=48)`` then also tunes the int4 grids against the
float model (:mod:`llmopt.quantization.tune`; give it ~25k calibration tokens,
each window seen once). (A layer missing from the saved weights and not skipped is quantized while
compiling, by the data-free default: the compiler has no calibration data.)

``apply_activation_scaling(model, batches, group_size=128)`` (AWQ-style
equivalent scaling, :mod:`llmopt.quantization.awq`) rewrites the float model
in place, same function, before ``quantize_weights``; compile that model.
"""

from llmopt.quantization.awq import ScalingReport, apply_activation_scaling
from llmopt.quantization.calibration import LayerStatistics, collect_statistics, token_batches
from llmopt.quantization.config import GROUP_SIZES, METHODS, MODES, QuantConfig
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
    "LayerStatistics",
    "METHODS",
    "MODES",
    "QuantConfig",
    "QuantizedLinear",
    "QuantizedWeights",
    "ScalingReport",
    "apply_activation_scaling",
    "calibrate",
    "collect_statistics",
    "load_quantized",
    "quantize_weight",
    "quantize_weights",
    "save_quantized",
    "smoothing_factors",
    "token_batches",
    "weight_bytes",
]
