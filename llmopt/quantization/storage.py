"""Quantized weights of a whole model, saved and loaded as safetensors.

A file holds each layer's tensors as ``"<layer path>.<tensor name>"`` (e.g.
``model.layers.0.mlp.up_proj.qweight``) in the saved formats of
:mod:`llmopt.kernels.quantized_linear` (int4 in the nibble layout, scales in
fp32), and its metadata says the format, mode, group size and each layer's
shape (and, since the int4 methods, how the weights were rounded: files
without it load as well). Loading reads the tensors back as they are:
nothing is re-quantized.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

from llmopt.quantization.config import check_mode
from llmopt.quantization.layers import QuantizedLinear, QuantizedWeights

FORMAT = "llmopt-quantized"
VERSION = "1"


def save_quantized(weights: QuantizedWeights, path: Union[str, os.PathLike]) -> None:
    """Write ``weights`` to a safetensors file at ``path``."""
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for name, layer in weights.layers.items():
        shapes[name] = [layer.out_features, layer.in_features]
        for key, tensor in layer.tensors.items():
            tensors[f"{name}.{key}"] = tensor.detach().contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "mode": weights.mode,
        "group_size": str(weights.group_size or 0),
        "layers": json.dumps(shapes),
        "method": weights.method or "",
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_quantized(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> QuantizedWeights:
    """Read a file written by :func:`save_quantized`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not an llmopt quantized-weights file "
                             f"(metadata format {meta.get('format')!r}, expected {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{os.fspath(path)!r}: format version {meta.get('version')!r}, "
                             f"this llmopt reads {VERSION!r}")
        mode, group_size = meta["mode"], int(meta["group_size"]) or None
        check_mode(mode)
        layers = {}
        keys = set(f.keys())
        for name, (out_features, in_features) in json.loads(meta["layers"]).items():
            prefix = name + "."
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in keys
                       if k.startswith(prefix) and "." not in k[len(prefix):]}
            layers[name] = QuantizedLinear(mode, in_features, out_features, tensors, group_size)
    return QuantizedWeights(mode, group_size, layers, method=meta.get("method") or None)


def weight_bytes(obj: Union[QuantizedWeights, QuantizedLinear, nn.Module]) -> int:
    """Bytes of linear-layer weights: the quantized tensors (scales included), or,
    for a float ``nn.Module``, the weights of its ``nn.Linear`` layers (each shared
    tensor counted once)."""
    if isinstance(obj, (QuantizedWeights, QuantizedLinear)):
        return obj.nbytes
    seen, total = set(), 0
    for module in obj.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel() * module.weight.element_size()
    return total
