"""Group-wise asymmetric int4: choosing each group's grid, and rounding onto it.

A group of ``g`` weights along the input features gets a 16-level grid
``low + q * scale`` (``q`` in 0..15). Four ways to get there:

* ``"rtn"``: the grid spans the group's min..max and every weight rounds to
  its nearest level.
* ``"mse"``: the grid minimises the group's (optionally importance-weighted)
  squared rounding error. Candidates shrink the min and the max towards zero
  independently (clipping a rare outlier makes the step finer for the rest);
  the winner's levels are then refitted by weighted least squares (the best
  scale and low for those levels, as llama.cpp's k-quants do). With
  calibration the importance of input feature ``j`` is ``E[x_j^2]``, the
  diagonal of the layer's input Hessian, so the error is measured where the
  layer's output feels it.
* ``"hqq"`` (data-free; not the default: worse than ``"rtn"`` on a held-out
  play, docs/PERFORMANCE.md): the ``"mse"``
  grid, then half-quadratic optimisation (HQQ, Badri & Shaji 2023) of an lp
  (p < 1) rounding error: alternately the error's sparse part (weights the
  grid gives up on) and the least-squares grid for the rest
  (:func:`hqq_grid`).
* ``"gptq"``: the ``"mse"`` grids, then GPTQ (Frantar et al., 2022) rounds the
  columns one at a time, largest ``E[x_j^2]`` first, and spreads each column's
  rounding error over the columns not rounded yet, through the inverse of
  the input Hessian ``H = sum x x^T``, so that ``X W^T`` moves as little as
  possible. The grids stay those chosen from the original weights ("static
  groups"), which is what lets the column order differ from the storage order.

:func:`refit_grids` re-solves a row's grids for fixed levels under the full
Hessian (the exact least-squares optimum of GPTQ's objective); it lowers that
objective by a few percent but did not lower SmolLM2's perplexity
(docs/PERFORMANCE.md), so no method uses it by default. What did help is
tuning the grids end to end (:mod:`llmopt.quantization.tune`).

Each grid is made exact in bfloat16 before any weight is rounded onto it:
the kernels store it as a scale and a zero point ``low + 8 * scale``
(:mod:`llmopt.kernels.quantized_linear`), PyTorch's CPU int4 kernel reads both
in bf16 (fp32 models included), and rounding the zero point there would shift
every weight of the group by the same amount. So the scale and the zero point
are rounded to bf16 first and ``low`` derived from them; the weights are then
rounded onto exactly the grid the kernel applies (bf16 values are exact in
fp32, and in fp16 within its normal range).

Every function here takes the weight already padded to whole groups: the
padding columns copy the last real column (so they leave the last group's
range alone) and get zero importance; the kernels never read them (their
inputs are zero).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

LEVELS = 15  # q in 0..15
# search_grid: shrink factors tried for a group's min and max (all pairs), then
# steps of this size around each group's best pair.
COARSE_SHRINK = (1.0, 0.9, 0.8, 0.7)
FINE_STEP = 0.05
# GPTQ: dampening added to the Hessian's diagonal, as a fraction of its mean;
# the paper's 1% fits this int4 grid less well than 10% on SmolLM2 (docs/PERFORMANCE.md).
DAMP = 0.1
GPTQ_BLOCK = 128  # columns rounded between two updates of all the columns after them
_TINY = 1e-12  # an all-equal group gets a tiny step instead of dividing by zero


def pad_to_groups(weight: Tensor, group_size: int) -> Tensor:
    """``(N, K)`` -> ``(N, Kp)``, Kp a multiple of ``group_size``, padded with copies of the last column."""
    padding = -weight.shape[1] % group_size
    if not padding:
        return weight
    return torch.cat((weight, weight[:, -1:].expand(-1, padding)), dim=1)


def as_bf16(t: Tensor) -> Tensor:
    """``t`` rounded to the nearest bfloat16 value, kept in fp32."""
    return t.to(torch.bfloat16).float()


def exact_grid(scales: Tensor, lows: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest grid whose scale and zero point (``low + 8 * scale``) are bf16 values.

    The zero point (level 8, mid-grid) is rounded where it was, so the scale's
    rounding moves the levels by at most 8 times its error (at the ends),
    where keeping ``low`` would move the top level by 15 times.
    """
    scales = scales.clamp(min=_TINY)
    rounded = as_bf16(scales)
    zeros = as_bf16(lows + 8.0 * scales)
    return rounded, zeros - 8.0 * rounded


def zero_points(scales: Tensor, lows: Tensor) -> Tensor:
    """The kernels' zero points for grids made by :func:`exact_grid`."""
    return lows + 8.0 * scales


def round_to_grid(weight: Tensor, scales: Tensor, lows: Tensor) -> Tensor:
    """Levels ``q`` (same shape as ``weight``) for a grid given per weight or broadcastable."""
    return torch.round((weight - lows) / scales).clamp_(0, LEVELS)


def minmax_grid(groups: Tensor) -> tuple[Tensor, Tensor]:
    """The grid spanning each group: ``groups`` ``(N, G, g)`` -> scales, lows ``(N, G)``."""
    low, high = torch.aminmax(groups, dim=-1)
    return _grid(low, high)


def _grid(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    return exact_grid((high - low) / LEVELS, low)


def search_grid(groups: Tensor, importance: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The grid of least (importance-weighted) squared error per group.

    ``groups`` ``(N, G, g)``; ``importance`` ``(G, g)`` (non-negative, one per
    input feature; None weighs all alike). Returns scales, lows ``(N, G)``.

    Candidates shrink the group's min and max towards zero by separate
    factors: a coarse grid of factors for every group, then the eight
    neighbours of each group's best pair, then one least-squares refit of the
    winner. The min..max grid is a candidate and a candidate replaces the best
    only when its error is lower, so the result is never worse than RTN's.
    """
    weights = torch.ones_like(groups[0]) if importance is None else importance.float().to(groups.device)
    low, high = torch.aminmax(groups, dim=-1)
    ones = torch.ones_like(low)
    best = _Best(groups, weights, ones, ones, *_grid(low, high))
    for shrink_low in COARSE_SHRINK:
        for shrink_high in COARSE_SHRINK:
            best.offer(ones * shrink_low, ones * shrink_high, *_grid(low * shrink_low, high * shrink_high))
    centre_low, centre_high = best.shrink_low.clone(), best.shrink_high.clone()
    for step_low in (-FINE_STEP, 0.0, FINE_STEP):
        for step_high in (-FINE_STEP, 0.0, FINE_STEP):
            if step_low or step_high:
                a, b = centre_low + step_low, centre_high + step_high
                best.offer(a, b, *_grid(low * a, high * b))
    levels = round_to_grid(groups, best.scales[..., None], best.lows[..., None])
    best.offer(best.shrink_low, best.shrink_high, *_refit(groups, weights, levels, best.scales, best.lows))
    return best.scales, best.lows


class _Best:
    """Per group, the grid of least error offered so far (and the shrink factors that made it)."""

    def __init__(self, groups: Tensor, weights: Tensor, shrink_low: Tensor, shrink_high: Tensor,
                 scales: Tensor, lows: Tensor):
        self.groups, self.weights = groups, weights
        self.shrink_low, self.shrink_high, self.scales, self.lows = shrink_low, shrink_high, scales, lows
        self.error = _error(groups, weights, scales, lows)

    def offer(self, shrink_low: Tensor, shrink_high: Tensor, scales: Tensor, lows: Tensor) -> None:
        error = _error(self.groups, self.weights, scales, lows)
        better = error < self.error
        self.error = torch.where(better, error, self.error)
        self.scales = torch.where(better, scales, self.scales)
        self.lows = torch.where(better, lows, self.lows)
        self.shrink_low = torch.where(better, shrink_low, self.shrink_low)
        self.shrink_high = torch.where(better, shrink_high, self.shrink_high)


def _error(groups: Tensor, weights: Tensor, scales: Tensor, lows: Tensor) -> Tensor:
    """Weighted squared rounding error per group: sum of w_j (q_j - t_j)^2 s^2, t the unrounded level."""
    t = (groups - lows[..., None]).div_(scales[..., None])
    levels = torch.round(t).clamp_(0, LEVELS)
    return levels.sub_(t).square_().mul_(weights).sum(-1) * scales.square()


def _refit(groups: Tensor, weights: Tensor, levels: Tensor, scales: Tensor, lows: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted least-squares scale and low for fixed levels (kept where that is degenerate)."""
    sw = weights.sum(-1)
    wq = weights * levels
    sq, sqq = wq.sum(-1), (wq * levels).sum(-1)
    sx, sqx = (weights * groups).sum(-1), (wq * groups).sum(-1)
    det = sw * sqq - sq * sq
    solvable = det > 1e-12 * sw * sqq.clamp(min=_TINY)  # at least two distinct levels
    safe = torch.where(solvable, det, torch.ones_like(det))
    new_scales = (sw * sqx - sq * sx) / safe
    new_lows = (sx - new_scales * sq) / sw.clamp(min=_TINY)
    keep = solvable & (new_scales > _TINY)
    return exact_grid(torch.where(keep, new_scales, scales), torch.where(keep, new_lows, lows))


# ---------------------------------------------------------------- GPTQ


def gptq(weight: Tensor, hessian: Tensor, scales: Tensor, lows: Tensor, group_size: int,
         damp: Optional[float] = None) -> Tensor:
    """Levels ``q`` ``(N, Kp)`` for ``weight`` ``(N, Kp)`` on the given grids ``(N, Kp/g)``.

    ``hessian`` is ``sum x x^T`` over the calibration inputs, ``(K, K)`` with
    ``K <= Kp``: padding columns have no inputs, so they get zero rows, are
    rounded last and (being uncoupled from the rest) move nothing. Rows are
    independent, so layers that share their inputs (and so their Hessian) can
    be stacked and rounded in one call.
    """
    n, kp = weight.shape
    hessian = torch.nn.functional.pad(hessian.double(), (0, kp - hessian.shape[0], 0, kp - hessian.shape[0]))
    # Largest E[x_j^2] first ("act order"); ties (unseen inputs, padding) in storage order.
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    u = _inverse_cholesky(hessian[order][:, order], DAMP if damp is None else damp)
    group = order // group_size
    # Row i of `wt` is the i-th column rounded (contiguous: each step reads and writes whole rows).
    wt = weight[:, order].t().float().contiguous()
    row_scales, row_lows = scales[:, group].t().contiguous(), lows[:, group].t().contiguous()
    for start in range(0, kp, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, kp)
        errors = torch.empty(end - start, n, device=wt.device)
        for i in range(start, end):
            column = wt[i]
            rounded = round_to_grid(column, row_scales[i], row_lows[i]).mul_(row_scales[i]).add_(row_lows[i])
            error = errors[i - start]
            torch.sub(column, rounded, out=error).div_(u[i, i])
            column.copy_(rounded)  # on the grid now: its level is read back at the end
            wt[i + 1:end].addr_(u[i, i + 1:end], error, alpha=-1)
        # The columns after this block get all of its errors in one product.
        wt[end:].sub_(u[start:end, end:].t() @ errors)
    levels = round_to_grid(wt, row_scales, row_lows).t()
    result = torch.empty_like(levels)
    result[:, order] = levels
    return result


def _inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, fp32.

    Inputs never seen in calibration (zero rows) are covered by the dampening;
    an all-zero Hessian becomes the identity (plain rounding).
    """
    h = hessian.double()
    mean = torch.diagonal(h).mean()
    extra = damp * mean if mean > 0 else torch.ones((), dtype=h.dtype)
    h = h + extra * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


# ---------------------------------------------------------------- grid refit under the Hessian


def output_error(weight: Tensor, dequantized: Tensor, hessian: Tensor) -> Tensor:
    """Per row, ``(w - w_hat)^T H (w - w_hat)``: the squared output error over the calibration inputs."""
    d = (weight - dequantized).double()
    return ((d @ hessian.double()) * d).sum(-1)


def refit_grids(weight: Tensor, hessian: Tensor, levels: Tensor, scales: Tensor, lows: Tensor,
                group_size: int, damp: float = 0.0) -> tuple[Tensor, Tensor]:
    """The grids that, for the fixed ``levels``, minimise each row's output error.

    For row ``w`` with levels ``q``, the weight ``w_hat_j = s_g q_j + low_g``
    (``g`` the group of column ``j``) is linear in the row's ``2G`` grid
    parameters, so ``(w - w_hat)^T H (w - w_hat)`` is minimised by one
    ``2G x 2G`` linear system per row (batched). The grids are then made
    bf16-exact again, and a row keeps its old grids unless its error (under
    ``H``) went down. ``damp`` adds ``damp * mean(diag H)`` to the diagonal
    (a pull towards the plain weight error). Shapes as :func:`gptq`.
    """
    n, kp = weight.shape
    groups = kp // group_size
    h = torch.nn.functional.pad(hessian.double(), (0, kp - hessian.shape[0], 0, kp - hessian.shape[0]))
    if damp:
        h = h + damp * torch.diagonal(h).mean() * torch.eye(kp, dtype=h.dtype, device=h.device)
    q = levels.double().reshape(n, groups, group_size)
    hb = h.reshape(groups, group_size, groups, group_size)
    w = weight.double()
    # Blocks of A^T H A for A (Kp x 2G): column a holds q on group a's columns, column G+a ones there.
    hq = torch.einsum("aibj,nbj->naib", hb, q)  # (H diag-block-wise times q), (n, G, g, G)
    ss = torch.einsum("nai,naib->nab", q, hq)
    sl = torch.einsum("nai,aib->nab", q, hb.sum(-1))
    ll = hb.sum((1, 3)).expand(n, groups, groups)
    system = torch.cat((torch.cat((ss, sl), 2), torch.cat((sl.transpose(1, 2), ll), 2)), 1)
    hw = (w @ h).reshape(n, groups, group_size)
    rhs = torch.cat(((q * hw).sum(-1), hw.sum(-1)), 1)
    # A tiny ridge towards the current grids keeps degenerate rows (one level in a
    # group, inputs never seen) solvable without moving them.
    old = torch.cat((scales, lows), 1).double()
    ridge = 1e-9 * torch.diagonal(system, dim1=1, dim2=2).mean(-1).clamp(min=_TINY)[:, None]
    system = system + torch.diag_embed(ridge.expand(n, 2 * groups))
    theta = torch.linalg.solve(system, (rhs + ridge * old)[..., None])[..., 0]
    new_scales, new_lows = theta[:, :groups].float(), theta[:, groups:].float()
    valid = torch.isfinite(theta).all(1) & (new_scales > _TINY).all(1)
    new_scales = torch.where(valid[:, None], new_scales, scales)
    new_lows = torch.where(valid[:, None], new_lows, lows)
    new_scales, new_lows = exact_grid(new_scales, new_lows)

    def dequantized(s: Tensor, l: Tensor) -> Tensor:
        return (q.float() * s[..., None] + l[..., None]).reshape(n, kp)

    better = output_error(weight, dequantized(new_scales, new_lows), h) < \
        output_error(weight, dequantized(scales, lows), h)
    return torch.where(better[:, None], new_scales, scales), torch.where(better[:, None], new_lows, lows)


# ---------------------------------------------------------------- HQQ (data-free)

# Half-quadratic optimisation (HQQ, Badri & Shaji 2023): the lp "norm" with
# p < 1 of the rounding error rewards grids where most weights round well and a
# few outliers round badly, which a squared error does not; beta is the
# splitting's penalty, growing by kappa each step. Values: HQQ's, checked on
# SmolLM2 (docs/PERFORMANCE.md).
HQQ_P = 0.7
HQQ_BETA = 10.0
HQQ_KAPPA = 1.01
HQQ_ITERS = 20
HQQ_TOLERANCE = 1e-4  # stop once an iteration lowers the summed error by less than this fraction


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """The generalised soft threshold: ``argmin_e  beta/2 |x - e|^2 + |e|^p`` (elementwise, approximately)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=_TINY).pow(p - 1.0) / beta)


def hqq_grid(groups: Tensor, mask: Optional[Tensor] = None, iters: int = HQQ_ITERS, p: float = HQQ_P,
             beta: float = HQQ_BETA, kappa: float = HQQ_KAPPA, fit_scale: bool = True,
             level_units: bool = True, init: str = "mse") -> tuple[Tensor, Tensor]:
    """Grids minimising each group's lp (p < 1) rounding error, without data: ``(N, G, g)`` -> scales, lows.

    Starting from :func:`search_grid`'s grid (``init="mse"``; ``"minmax"``:
    RTN's), alternate (1) round to the grid, (2) the error's sparse part
    ``e = shrink_lp(w - w_hat)`` (the outliers the grid gives up on; with
    ``level_units`` measured in steps of the grid, so that ``beta`` means the
    same for every layer's scale of weights: in raw units, weights of ~0.02
    put every residual under the threshold and the step does nothing), (3)
    the grid that best fits ``w - e`` for the rounded levels in least
    squares: its scale and low (``fit_scale``; else the low only, HQQ's
    zero-point step). A group keeps the grid of its lowest mean absolute
    error seen, the starting grid included, so it never does worse than that
    grid in that measure. ``mask`` ``(G, g)``: 1 for real columns, 0 for
    padding (None: all real).
    """
    ones = torch.ones_like(groups[0]) if mask is None else mask.float().to(groups.device)
    if init == "mse":
        scales, lows = search_grid(groups, ones)
    else:
        low, high = torch.aminmax(groups, dim=-1)
        scales = ((high - low) / LEVELS).clamp(min=_TINY)
        lows = low.clone()
    count = ones.sum(-1).clamp(min=1.0)

    def abs_error(s: Tensor, l: Tensor) -> Tensor:
        q = round_to_grid(groups, s[..., None], l[..., None])
        return (groups - (q * s[..., None] + l[..., None])).abs().mul_(ones).sum(-1) / count

    best_scales, best_lows = exact_grid(scales, lows)
    best_error = abs_error(best_scales, best_lows)
    for _ in range(iters):
        levels = round_to_grid(groups, scales[..., None], lows[..., None])
        residual = groups - (levels * scales[..., None] + lows[..., None])
        if level_units:
            sparse = shrink_lp(residual / scales[..., None], beta, p) * scales[..., None]
        else:
            sparse = shrink_lp(residual, beta, p)
        target = groups - sparse
        if fit_scale:
            scales, lows = _least_squares(target, ones, levels, scales, lows)
        else:
            lows = (target - levels * scales[..., None]).mul_(ones).sum(-1) / count
        beta *= kappa
        s, l = exact_grid(scales, lows)
        error = abs_error(s, l)
        better = error < best_error
        before = best_error.sum()
        best_error = torch.where(better, error, best_error)
        best_scales = torch.where(better, s, best_scales)
        best_lows = torch.where(better, l, best_lows)
        if before - best_error.sum() <= HQQ_TOLERANCE * before:  # converged: the rest is time
            break
    return best_scales, best_lows


def _least_squares(groups: Tensor, weights: Tensor, levels: Tensor, scales: Tensor,
                   lows: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_refit` without the bf16 rounding: the exact weighted least-squares grid for fixed levels."""
    sw = weights.sum(-1)
    wq = weights * levels
    sq, sqq = wq.sum(-1), (wq * levels).sum(-1)
    sx, sqx = (weights * groups).sum(-1), (wq * groups).sum(-1)
    det = sw * sqq - sq * sq
    solvable = det > 1e-12 * sw * sqq.clamp(min=_TINY)
    safe = torch.where(solvable, det, torch.ones_like(det))
    new_scales = (sw * sqx - sq * sx) / safe
    new_lows = (sx - new_scales * sq) / sw.clamp(min=_TINY)
    keep = solvable & (new_scales > _TINY)
    return torch.where(keep, new_scales, scales), torch.where(keep, new_lows, lows)
