"""Run an exported model (``export_onnx(..., kv_cache=True)``) with ONNX Runtime.

Only onnxruntime and numpy do the work here (no torch calls), so this is
also how to drive the model from a deployment without PyTorch: a step feeds
``input_ids``, ``position_ids`` and the previous step's ``present.*`` as
``past_key_values.*`` (an empty past, length 0, on the first step).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GreedyStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # every step after the prefill

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.new_tokens - 1  # the first new token comes from the prefill
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0


@dataclass
class _CacheInput:
    name: str
    kv_heads: int
    head_dim: int
    dtype: type


@dataclass
class OnnxCausalLM:
    """An ONNX Runtime session over an exported causal LM."""

    path: str
    providers: Optional[Sequence[str]] = None
    threads: Optional[int] = None  # intra-op threads (default: onnxruntime's choice)
    # onnxruntime's worker threads spin while waiting for work (its default): fastest on
    # an idle machine, slow on a busy one (docs/PERFORMANCE.md).
    spin: bool = True
    session: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = list(self.providers or _default_providers(ort))
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self._cache_inputs = [_cache_input(i) for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self._cache_inputs.sort(key=lambda c: _layer_order(c.name))
        self._output_names = [o.name for o in self.session.get_outputs()]

    @property
    def num_layers(self) -> int:
        return len(self._cache_inputs) // 2

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """The first step's past: length 0 for every layer's key and value."""
        return [np.zeros((batch, c.kv_heads, 0, c.head_dim), dtype=c.dtype) for c in self._cache_inputs]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray,
                past: Optional[list[np.ndarray]] = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``(batch, tokens, vocab)`` and the present cache (the next step's past)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        feeds = {"input_ids": input_ids, "position_ids": np.asarray(position_ids, dtype=np.int64)}
        past = self.empty_cache(input_ids.shape[0]) if past is None else past
        feeds.update({c.name: p for c, p in zip(self._cache_inputs, past)})
        logits, *present = self.session.run(self._output_names, feeds)
        return logits, present

    def generate_greedy(self, prompt_ids: Iterable[int], max_new_tokens: int,
                        eos_token_ids: Iterable[int] = (), stats: Optional[GreedyStats] = None) -> list[int]:
        """Greedy new tokens for one prompt (stops after an end token if given)."""
        prompt = np.asarray(list(prompt_ids), dtype=np.int64)[None]
        stop = set(eos_token_ids)
        stats = stats if stats is not None else GreedyStats()
        stats.prompt_tokens, stats.new_tokens = prompt.shape[1], 0
        tokens: list[int] = []
        start = time.perf_counter()
        logits, past = self.forward(prompt, np.arange(prompt.shape[1])[None])
        position = prompt.shape[1]
        while True:
            token = int(np.argmax(logits[0, -1]))
            tokens.append(token)
            stats.new_tokens += 1
            now = time.perf_counter()
            if len(tokens) == 1:
                stats.prefill_s = now - start
            else:
                stats.decode_s += now - start
            if len(tokens) >= max_new_tokens or token in stop:
                return tokens
            start = time.perf_counter()
            logits, past = self.forward(np.array([[token]]), np.array([[position]]), past)
            position += 1


def _default_providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _cache_input(node) -> _CacheInput:
    _, kv_heads, _, head_dim = node.shape
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"{node.name}: expected fixed KV heads and head size, got shape {node.shape}")
    if node.type not in _NUMPY_TYPES:
        raise ValueError(f"{node.name}: unsupported cache type {node.type}")
    return _CacheInput(node.name, kv_heads, head_dim, _NUMPY_TYPES[node.type])


def _layer_order(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"past_key_values\.(\d+)\.(key|value)", name)
    if match is None:
        raise ValueError(f"unexpected cache input {name!r}")
    return int(match.group(1)), 0 if match.group(2) == "key" else 1
