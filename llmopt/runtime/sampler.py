"""Pick one token per row of a batch of logits, each row with its own options.

Greedy rows take ``argmax`` (first index on ties), exactly what Hugging Face's
greedy search picks. Sampled rows go through temperature, then top-k, then
top-p (nucleus), all rows together on one sort; only the final draw is per
row, so that a row with a seed draws from its own generator and gets the same
tokens whatever else shares the batch. A batch of greedy rows is one argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmopt.runtime.sampling_params import SamplingParams


def new_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The request's own generator, seeded with ``params.seed``; None (the global RNG) without one."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token id per row of ``logits`` (N, V); row i uses ``params[i]`` and ``generators[i]``."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be 2-D (num_rows, vocab_size), got shape {tuple(logits.shape)}")
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"sample: need one SamplingParams and one generator per row of logits: "
                         f"{logits.shape[0]} rows, {len(params)} params, {len(generators)} generators")
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled_rows) < len(params):
        # fp32 and bf16/fp16 order the same values the same way: no cast needed.
        # max(dim) returns argmax's indices (the first maximum), faster than argmax
        # on CPU (docs/PERFORMANCE.md).
        tokens = logits.max(dim=-1).indices.tolist()
    else:
        tokens = [0] * len(params)
    if sampled_rows:
        rows = [params[i] for i in sampled_rows]
        probs, order = _probs(logits[sampled_rows].float(), rows)
        draws = _draw(probs, order, [generators[i] for i in sampled_rows])
        for i, token in zip(sampled_rows, draws):
            tokens[i] = token
    return tokens


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution ``sample`` draws row i from (temperature, top-k, top-p), normalised,
    one column per token id: (N, V) fp32. Rows must not be greedy."""
    probs, order = _probs(logits.float(), params)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if order is None:
        return probs
    return torch.empty_like(probs).scatter_(1, order, probs)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from the distribution ``probs`` (V,), from ``generator`` (None: global RNG)."""
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def logprob_entry(logprobs: torch.Tensor, token: int, top: int | None) -> tuple:
    """A token's entry of ``CompletionOutput.logprobs``: (token id, its log-probability, the
    ``top`` most likely (token id, log-probability) pairs) from one row of log-probabilities."""
    pairs = []
    if top:
        values, ids = logprobs.topk(top)
        pairs = list(zip(ids.tolist(), values.tolist()))
    return int(token), float(logprobs[int(token)]), pairs


def _probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Filtered, unnormalised probabilities, and the token id of each column (None: column = token)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if all(k == vocab for k in top_k) and all(p == 1.0 for p in top_p):
        return logits.softmax(dim=-1), None
    # Stable, so that equal logits keep one order whatever the batch is.
    logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=device)
    logits = logits.masked_fill(rank >= torch.tensor(top_k, device=device)[:, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    # Drop a token when the more likely ones already reach top_p; the top
    # token (nothing before it) always stays. top_p == 1 rows keep all.
    top_p_t = torch.tensor(top_p, device=device)[:, None]
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p_t) & (top_p_t < 1.0), 0.0)
    return probs, order


def _draw(probs: torch.Tensor, order: torch.Tensor | None,
          generators: Sequence[torch.Generator | None]) -> list[int]:
    """One draw per row: rows with a generator one by one, the rest in one call."""
    columns = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        columns[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            columns[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    if order is not None:
        columns = order.gather(1, columns[:, None]).squeeze(1)
    return columns.tolist()
