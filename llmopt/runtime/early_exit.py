"""Early-exit decoding (CALM-style, lossy, opt-in): finish a token at an intermediate layer.

A decode token runs the decoder layer by layer. After ``min_layer`` layers,
and then every ``check_every`` layers (never after the last, which is the
normal output), its hidden state goes through the model's own final norm
and ``lm_head``; the token exits there when the criterion passes:

* ``"max_prob"``: the largest softmax probability is ``>= threshold``;
* ``"margin"``: top-1 minus top-2 probability is ``>= threshold``.

A threshold above 1 never exits (plain greedy decoding, token for token).

**The skipped layers' KV.** Later tokens attend to this token at every
layer, so the layers it skipped still need its K/V. ``kv_fill="copy"`` is
CALM's state propagation: the exit layer's hidden state is copied forward
as the input of every skipped layer, and each skipped layer's K/V is that
layer's own ``k_proj`` / ``v_proj`` (after its input norm and RoPE) of the
copied state. Chosen because it is cheap (two small projections per skipped
layer, about 6% of a SmolLM2 layer's multiply-adds against the full layer)
and needs nothing recomputed later; its quality cost is that later tokens
see K/V computed from a shallower state than the full model would have
produced. ``kv_fill="full"`` runs the skipped layers anyway (for their K/V
only): exact KV, no saving; it isolates the cost of the exit decision alone
from the cost of the KV approximation (bench/early_exit.py measures both).
Lazy recomputation (running a token's skipped layers in a later step) was
not chosen: decoding one sequence, the next step would run every layer
again for the pending token, so no step would be cheaper than plain
decoding.

**Scope.** This is a standalone generation loop, not the serving engine:
the engine runs the whole model as one compiled paged graph, and exiting
per token needs the decoder cut into per-layer segments (not done), so
``LLM(..., early_exit=...)`` does not exist. Here the model runs eager
(no torch.compile), one sequence at a time (batch 1: no rule for a batch
whose tokens want different exit layers is needed), on its own Hugging Face
``DynamicCache``; the prompt is prefilled through every layer (no exits),
and exits apply to the decoded tokens. Llama-family decoders
(``model.model.layers`` with ``self_attn.k_proj`` / ``v_proj``, RoPE) are
supported: Llama, Mistral, Qwen2 (SmolLM2 is a Llama).

:func:`generate` decodes; :func:`score` runs teacher-forced over a text
with the same per-token exit decisions (each position's NLL comes from its
exit logits, and the KV of exited positions is filled as in decoding), for
agreement and perplexity; :func:`calibrate_threshold` picks the lowest
threshold whose teacher-forced agreement with the full model meets a target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmopt.errors import LLMOptConfigError, check_choice, checked_fields

__all__ = [
    "CRITERIA",
    "KV_FILLS",
    "EarlyExitDecodeConfig",
    "ExitStats",
    "ScoreResult",
    "calibrate_threshold",
    "confidence",
    "generate",
    "score",
    "score_thresholds",
]

CRITERIA = ("max_prob", "margin")
KV_FILLS = ("copy", "full")
GROUP = "early_exit"


@dataclass(frozen=True)
class EarlyExitDecodeConfig:
    """Early-exit decoding options (see the module docstring).

    Attributes:
        threshold: exit when the criterion's value is ``>= threshold`` (a finite number
            ``>= 0``; above 1 never exits).
        min_layer: decoder layers every token runs before its first exit check
            (``1 .. num_layers - 1``).
        criterion: ``"max_prob"`` or ``"margin"``.
        check_every: layers between two checks after the first (each check costs an
            ``lm_head`` product, which on SmolLM2 weighs as much as ~8 decoder layers).
        kv_fill: ``"copy"`` (CALM's state propagation) or ``"full"`` (run the skipped
            layers for their K/V: exact, no saving; a quality reference).
    """

    threshold: float
    min_layer: int
    criterion: str = "max_prob"
    check_every: int = 1
    kv_fill: str = "copy"

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise LLMOptConfigError(f"{GROUP} option 'threshold' must be a finite number >= 0 "
                                    f"(above 1 never exits), got {t!r}")
        for name in ("min_layer", "check_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LLMOptConfigError(f"{GROUP} option {name!r} must be an integer >= 1, got {value!r}")
        check_choice("criterion", self.criterion, CRITERIA, group=GROUP)
        check_choice("kv_fill", self.kv_fill, KV_FILLS, group=GROUP)
        object.__setattr__(self, "threshold", float(t))

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | EarlyExitDecodeConfig") -> "EarlyExitDecodeConfig":
        if isinstance(options, EarlyExitDecodeConfig):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(f"early_exit options must be a dict or an EarlyExitDecodeConfig, "
                                    f"got {type(options).__name__}")
        missing = [name for name in ("threshold", "min_layer") if name not in options]
        if missing:
            raise LLMOptConfigError(f"early_exit needs {missing} (e.g. {{'threshold': 0.9, 'min_layer': 8}})")
        return cls(**checked_fields(cls, options, "early_exit option"))

    def check_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layer counts after which a token may exit, for a model of ``num_layers`` layers."""
        if self.min_layer >= num_layers:
            raise LLMOptConfigError(f"{GROUP} option 'min_layer' is {self.min_layer}, but the model has "
                                    f"{num_layers} decoder layers: exits are checked after 1 to "
                                    f"{num_layers - 1} of them")
        return tuple(range(self.min_layer, num_layers, self.check_every))


def confidence(logits: Tensor, criterion: str) -> Tensor:
    """The criterion's value per row of ``logits`` (``(N, V)``): max prob or top-1 minus top-2."""
    probs = torch.softmax(logits.float(), dim=-1)
    if criterion == "max_prob":
        return probs.max(dim=-1).values
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@dataclass
class ExitStats:
    """Per decoded (or scored) token: how many decoder layers it ran in full."""

    layers_used: list[int] = field(default_factory=list)
    num_layers: int = 0
    num_checks: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def mean_layers(self) -> float:
        return sum(self.layers_used) / len(self.layers_used) if self.layers_used else float(self.num_layers)

    @property
    def exit_fraction(self) -> float:
        """Share of tokens that exited before the last layer."""
        used = self.layers_used
        return sum(u < self.num_layers for u in used) / len(used) if used else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = len(self.layers_used) - 1  # the first token comes from the prefill
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0


# ---------------------------------------------------------------- the layer-by-layer forward


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LayerwiseDecoder:
    """A Llama-family causal LM run one decoder layer at a time over its own DynamicCache."""

    def __init__(self, model: nn.Module):
        model = getattr(model, "_orig_mod", model)
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(layers, nn.ModuleList) or not hasattr(body, "norm") or \
                not hasattr(body, "rotary_emb") or head is None or \
                not all(hasattr(getattr(layer, "self_attn", None), "k_proj") for layer in layers):
            raise LLMOptConfigError(f"early exit decoding needs a Llama-family Hugging Face model "
                                    f"(model.layers with self_attn.k_proj/v_proj, rotary embeddings), "
                                    f"got {type(model).__name__}")
        for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(model.config, attr, None) not in (None, 1, 1.0):
                raise LLMOptConfigError(f"early exit decoding: {type(model).__name__} post-processes its "
                                        f"logits ({attr}), which the exit logits would miss")
        self.model, self.body, self.layers, self.head = model, body, layers, head
        self.num_layers = len(layers)
        self.config = model.config
        self.device = next(model.parameters()).device

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def embed(self, token_ids: Sequence[int], start: int):
        ids = torch.tensor([list(token_ids)], device=self.device)
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        hidden = self.body.embed_tokens(ids)
        rope = self.body.rotary_emb(hidden, position_ids=positions)
        # Only a multi-token forward needs a mask (a causal one over a cache that is
        # empty or ends where these tokens start); one token attends to everything.
        mask = None
        if ids.shape[1] > 1:
            past = start
            total = past + ids.shape[1]
            allowed = torch.ones(ids.shape[1], total, dtype=torch.bool, device=self.device).tril(past)
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=self.device)
            mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]
        return hidden, positions, rope, mask

    def run_layer(self, index: int, hidden: Tensor, positions, rope, mask, cache) -> Tensor:
        out = self.layers[index](hidden, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.body.norm(hidden)).float()

    def fill_kv(self, index: int, hidden: Tensor, rope, cache) -> None:
        """Write layer ``index``'s K/V of ``hidden`` (its input, copied forward) into ``cache``."""
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape)
        if hasattr(attn, "k_norm"):  # Qwen3-style per-head norm
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = rope
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        k = k * cos + _rotate_half(k) * sin
        cache.update(k, v, index)

    def forward_full(self, token_ids: Sequence[int], start: int, cache) -> Tensor:
        """Every layer for ``token_ids`` at positions ``start...``; logits ``(T, V)``."""
        hidden, positions, rope, mask = self.embed(token_ids, start)
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, positions, rope, mask, cache)
        return self.logits(hidden)[0]

    def forward_exit(self, token_id: int, position: int, cache, config: EarlyExitDecodeConfig,
                     checks: frozenset[int], stats: ExitStats) -> tuple[Tensor, int]:
        """One token; returns (its logits ``(V,)``, decoder layers it ran in full)."""
        hidden, positions, rope, mask = self.embed([token_id], position)
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, positions, rope, mask, cache)
            done = index + 1
            if done not in checks:
                continue
            logits = self.logits(hidden)[0, -1]
            stats.num_checks += 1
            if float(confidence(logits[None], config.criterion)[0]) < config.threshold:
                continue
            for skipped in range(done, self.num_layers):
                if config.kv_fill == "copy":
                    self.fill_kv(skipped, hidden, rope, cache)
                else:  # "full": exact K/V; the layer's output is carried on but not used
                    hidden = self.run_layer(skipped, hidden, positions, rope, mask, cache)
            return logits, done
        return self.logits(hidden)[0, -1], self.num_layers


def _config(early_exit) -> EarlyExitDecodeConfig | None:
    return None if early_exit is None else EarlyExitDecodeConfig.from_options(early_exit)


def _prompt_list(prompt_ids) -> list[int]:
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    prompt = list(prompt_ids)
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt_ids must be a non-empty list (or 1-D tensor) of token ids")
    return prompt


# ---------------------------------------------------------------- decoding


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids, max_tokens: int, early_exit=None, *,
             eos_token_ids=(), stats: ExitStats | None = None, cache=None) -> tuple[list[int], ExitStats]:
    """Greedy decoding of one prompt with early exit; returns (new token ids, stats).

    ``early_exit``: an :class:`EarlyExitDecodeConfig` or its dict (``{"threshold": t,
    "min_layer": l, "criterion": "max_prob" | "margin"}``); None runs every layer (the same
    layer loop without checks, the speed reference). Stops after a token in
    ``eos_token_ids`` (default: none) or ``max_tokens`` tokens. The first token comes
    from the prompt's full forward; ``stats.layers_used`` has one entry per new token.
    ``cache``: an empty transformers ``DynamicCache`` to decode into (to inspect the KV
    afterwards); None: a new one.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    config = _config(early_exit)
    decoder = _LayerwiseDecoder(model)
    checks = frozenset(config.check_layers(decoder.num_layers)) if config else frozenset()
    stop = set(eos_token_ids or ())
    prompt = _prompt_list(prompt_ids)
    stats = stats if stats is not None else ExitStats()
    stats.num_layers, stats.prompt_tokens = decoder.num_layers, len(prompt)
    cache = decoder.new_cache() if cache is None else cache
    start = time.perf_counter()
    token = int(decoder.forward_full(prompt, 0, cache)[-1].argmax())
    stats.prefill_s = time.perf_counter() - start
    tokens = [token]
    stats.layers_used.append(decoder.num_layers)
    start = time.perf_counter()
    while len(tokens) < max_tokens and token not in stop:
        position = len(prompt) + len(tokens) - 1
        if config is None:
            logits, used = decoder.forward_full([token], position, cache)[-1], decoder.num_layers
        else:
            logits, used = decoder.forward_exit(token, position, cache, config, checks, stats)
        token = int(logits.argmax())
        tokens.append(token)
        stats.layers_used.append(used)
    stats.decode_s = time.perf_counter() - start
    return tokens, stats


# ---------------------------------------------------------------- teacher-forced scoring


@dataclass
class ScoreResult:
    """Teacher-forced early exit over a text: per scored position (the ones after the context)."""

    nll: list[float]  # -log p(next true token) from the exit logits
    argmax: list[int]  # the exit logits' argmax
    stats: ExitStats

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll))

    def agreement(self, reference: "ScoreResult | Sequence[int]") -> float:
        """Share of positions whose argmax equals ``reference``'s (e.g. the full model's)."""
        ref = reference.argmax if isinstance(reference, ScoreResult) else list(reference)
        if len(ref) != len(self.argmax):
            raise ValueError(f"reference has {len(ref)} positions, this result {len(self.argmax)}")
        return sum(a == b for a, b in zip(self.argmax, ref)) / len(ref)


@torch.inference_mode()
def score(model: nn.Module, token_ids, early_exit=None, *, context: int = 32,
          sequential: bool = False) -> ScoreResult:
    """Teacher-forced early exit over ``token_ids``.

    The first ``context`` tokens are prefilled through every layer; each later token is
    fed one at a time (the true token, whatever the exit predicted), exits as in
    :func:`generate` and fills the KV of the layers it skipped, so later positions see
    the same approximated cache decoding would. Scores the positions ``context - 1 ..
    len - 2`` (each predicts the next true token). ``early_exit=None``: the full model
    (its argmaxes are the reference for :meth:`ScoreResult.agreement`).

    With no exits, or with ``kv_fill="full"`` (every layer's K/V exact, so every hidden
    state is the full model's), one parallel forward over the text is the same
    computation and is used instead (``sequential=True`` forces the token loop).
    """
    ids = _prompt_list(token_ids)
    if not 1 <= context < len(ids):
        raise ValueError(f"context must be in [1, {len(ids) - 1}] for {len(ids)} tokens, got {context}")
    config = _config(early_exit)
    decoder = _LayerwiseDecoder(model)
    checks = config.check_layers(decoder.num_layers) if config else ()
    if not sequential and (config is None or config.kv_fill == "full"):
        criterion = config.criterion if config else "max_prob"
        table = _exit_table(decoder, ids, checks, criterion, context)
        return _decide(table, config.threshold if config else None, decoder.num_layers, context)
    stats = ExitStats(num_layers=decoder.num_layers, prompt_tokens=context)
    cache = decoder.new_cache()
    nll, argmax = [], []

    def record(logits: Tensor, target: int, used: int) -> None:
        nll.append(float(-torch.log_softmax(logits, dim=-1)[target]))
        argmax.append(int(logits.argmax()))
        stats.layers_used.append(used)

    start = time.perf_counter()
    logits = decoder.forward_full(ids[:context], 0, cache)
    record(logits[-1], ids[context], decoder.num_layers)
    for position in range(context, len(ids) - 1):
        logits, used = decoder.forward_exit(ids[position], position, cache, config, frozenset(checks), stats)
        record(logits, ids[position + 1], used)
    stats.decode_s = time.perf_counter() - start
    return ScoreResult(nll, argmax, stats)


@dataclass
class _ExitTable:
    """Per scored position and per exit point (the check layers, then the last layer):
    the criterion's value, the argmax and the true next token's NLL, from exact states."""

    layer_counts: list[int]
    confidence: Tensor  # (exits + 1, positions)
    argmax: Tensor
    nll: Tensor
    seconds: float


def _exit_table(decoder: _LayerwiseDecoder, ids: list[int], checks, criterion: str, context: int,
                rows_per_chunk: int = 256) -> _ExitTable:
    start = time.perf_counter()
    hidden, positions, rope, mask = decoder.embed(ids[:-1], 0)
    states = {}
    wanted = set(checks) | {decoder.num_layers}
    for index in range(decoder.num_layers):
        hidden = decoder.run_layer(index, hidden, positions, rope, mask, None)
        if index + 1 in wanted:
            states[index + 1] = hidden[0, context - 1:]
    targets = torch.tensor(ids[context:], device=decoder.device)
    counts = [*checks, decoder.num_layers]
    conf, top, nll = (torch.empty(len(counts), len(targets), dtype=dtype)
                      for dtype in (torch.float32, torch.long, torch.float32))
    for row, count in enumerate(counts):
        for chunk in torch.arange(len(targets)).split(rows_per_chunk):
            logits = decoder.logits(states[count][chunk])
            conf[row, chunk] = confidence(logits, criterion).cpu()
            top[row, chunk] = logits.argmax(-1).cpu()
            logp = torch.log_softmax(logits, dim=-1)
            nll[row, chunk] = -logp.gather(1, targets[chunk][:, None])[:, 0].cpu()
    return _ExitTable(counts, conf, top, nll, time.perf_counter() - start)


def _decide(table: _ExitTable, threshold: float | None, num_layers: int, context: int) -> ScoreResult:
    """:func:`score`'s result for one threshold (None: no exits) from the table."""
    exits = len(table.layer_counts) - 1
    positions = table.confidence.shape[1]
    if threshold is None or exits == 0:
        choice = torch.full((positions,), exits, dtype=torch.long)
        num_checks = 0
    else:
        passed = table.confidence[:exits] >= threshold
        passed[:, 0] = False  # position context - 1 comes from the full prefill, as in the token loop
        passed = torch.cat([passed, torch.ones(1, positions, dtype=torch.bool)])
        choice = passed.to(torch.int8).argmax(0).long()  # the first exit that passes
        num_checks = int(torch.clamp(choice[1:] + 1, max=exits).sum())
    pick = choice[None]
    used = torch.tensor(table.layer_counts)[choice]
    stats = ExitStats(layers_used=used.tolist(), num_layers=num_layers, num_checks=num_checks,
                      prompt_tokens=context, decode_s=table.seconds)
    return ScoreResult(table.nll.gather(0, pick)[0].tolist(), table.argmax.gather(0, pick)[0].tolist(), stats)


@torch.inference_mode()
def score_thresholds(model: nn.Module, token_ids, thresholds: Sequence[float], *, min_layer: int,
                     criterion: str = "max_prob", check_every: int = 1,
                     context: int = 32) -> tuple[ScoreResult, dict[float, ScoreResult]]:
    """:func:`score` with exact KV (``kv_fill="full"``) at many thresholds from one forward.

    Returns (the full model's result, {threshold: result}). Every threshold's exit
    decisions read the same exact hidden states, so one forward and one ``lm_head`` pass
    per check layer serve them all.
    """
    ids = _prompt_list(token_ids)
    if not 1 <= context < len(ids):
        raise ValueError(f"context must be in [1, {len(ids) - 1}] for {len(ids)} tokens, got {context}")
    configs = [EarlyExitDecodeConfig(t, min_layer, criterion, check_every, "full") for t in thresholds]
    decoder = _LayerwiseDecoder(model)
    checks = configs[0].check_layers(decoder.num_layers) if configs else \
        EarlyExitDecodeConfig(1.0, min_layer, criterion, check_every).check_layers(decoder.num_layers)
    table = _exit_table(decoder, ids, checks, criterion, context)
    full = _decide(table, None, decoder.num_layers, context)
    return full, {c.threshold: _decide(table, c.threshold, decoder.num_layers, context) for c in configs}


# ---------------------------------------------------------------- calibration


@dataclass
class Calibration:
    threshold: float | None  # None: no candidate met the target
    agreement: float | None
    tried: list[dict]  # per candidate: threshold, agreement, mean_layers, perplexity


DEFAULT_CANDIDATES = (0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def calibrate_threshold(model: nn.Module, token_ids, *, target_agreement: float = 0.95, min_layer: int,
                        criterion: str = "max_prob", check_every: int = 1, kv_fill: str = "copy",
                        candidates: Sequence[float] = DEFAULT_CANDIDATES, context: int = 32) -> Calibration:
    """The lowest threshold whose teacher-forced agreement with the full model meets the target.

    Agreement: the share of positions of the calibration text ``token_ids`` where the
    early-exit argmax (:func:`score`, KV filled as in decoding) equals the full model's
    greedy token. Candidates are tried from the highest (the safest) down and the search
    stops at the first that misses the target (agreement is not strictly monotone in the
    threshold, so a lower one that passes after a failure is not trusted). Use a text the
    evaluation does not score. Cost: with ``kv_fill="copy"`` (what decoding does), one
    token-by-token :func:`score` per candidate tried; with ``"full"`` (exact KV: the
    exit decision's cost only, an optimistic estimate), one forward for all candidates.
    """
    if not 0 < target_agreement <= 1:
        raise LLMOptConfigError(f"target_agreement must be in (0, 1], got {target_agreement!r}")
    if not candidates:
        raise LLMOptConfigError("calibrate_threshold needs at least one candidate threshold")
    ordered = sorted(candidates, reverse=True)
    exact = {}
    if kv_fill == "full":  # every candidate from one forward
        reference, exact = score_thresholds(model, token_ids, ordered, min_layer=min_layer, criterion=criterion,
                                            check_every=check_every, context=context)
    else:
        reference = score(model, token_ids, None, context=context)
    best, best_agreement, tried = None, None, []
    for threshold in ordered:
        config = EarlyExitDecodeConfig(threshold, min_layer, criterion, check_every, kv_fill)
        result = exact.get(config.threshold) or score(model, token_ids, config, context=context)
        agreement = result.agreement(reference)
        tried.append({"threshold": threshold, "agreement": agreement,
                      "mean_layers": result.stats.mean_layers, "perplexity": result.perplexity})
        if agreement < target_agreement:
            break
        best, best_agreement = threshold, agreement
    return Calibration(best, best_agreement, tried)
