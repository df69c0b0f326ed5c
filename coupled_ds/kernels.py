"""The Coupled Adam update, as pure functions on local tensors. No ranks, no engines.

For one coupled matrix E [V, H] the step is (DESIGN §2)::

    m      <- beta1 m + (1 - beta1) g                  # per element
    v      <- beta2 v + (1 - beta2) g^2                # per element, kept full size
    vbar_j  = s * mean_{i < vocab} v[i, j]              # one value per hidden column j
    p      <- p (1 - lr wd) - lr / bc1 * m / (sqrt(vbar_j / bc2) + eps)

A step is split in three phases because the column means need every piece of the matrix:

1. :func:`update_moments_` updates m and v of the local pieces;
2. :func:`accumulate_column_sums_` adds this rank's [H] partial sums of v (the caller all-reduces
   them across ranks, see :mod:`coupled_ds.reduce`);
3. :func:`apply_coupled_update_` applies decay and the update with the shared [H] denominator.

Each phase has a plain reference form (``*_reference``) that the tests treat as ground truth and
a blocked form that walks the matrix in row chunks that stay in cache, so each tensor crosses
memory about once per phase.
"""

from __future__ import annotations

import torch

from coupled_ds.geometry import RowPiece, ShardGeometry

__all__ = [
    "CHUNK_ELEMENTS",
    "accumulate_column_sums_",
    "apply_coupled_update_",
    "column_denominator",
    "owned_view",
    "update_moments_",
]

# Elements per chunk in the blocked kernels: 4 tensors x 64k fp32 = 1 MiB, about an L2 cache.
CHUNK_ELEMENTS = 1 << 16


def owned_view(tensor: torch.Tensor, geometry: ShardGeometry) -> torch.Tensor:
    """The 1-D view [N] of the elements ``geometry`` owns (engine padding excluded)."""
    flat = tensor.view(-1)
    return flat[geometry.offset_local : geometry.offset_local + geometry.numel]


def update_moments_(
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    beta1: float,
    beta2: float,
    maximize: bool,
) -> None:
    """m <- beta1 m + (1-beta1) g;  v <- beta2 v + (1-beta2) g^2, in place, element-wise.

    All lists hold 1-D views of equal length per index (the owned elements).
    """
    if not exp_avgs:
        return
    if maximize:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=-(1.0 - beta1))
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)


def _chunks(piece: RowPiece, cols: int) -> list[tuple[int, int, int]]:
    """Split a piece into (start_local, length, rows) chunks of about CHUNK_ELEMENTS elements."""
    if piece.rows == 0:
        return [(piece.start_local, piece.length, 0)]
    rows_per_chunk = max(1, CHUNK_ELEMENTS // cols)
    out = []
    for row in range(0, piece.rows, rows_per_chunk):
        rows = min(rows_per_chunk, piece.rows - row)
        out.append((piece.start_local + row * cols, rows * cols, rows))
    return out


def accumulate_column_sums_(
    col_sum_H: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    geometry: ShardGeometry,
    *,
    rows_limit: int,
) -> None:
    """Add the column sums of v over the owned elements of rows ``< rows_limit`` to ``col_sum_H``.

    Args:
        col_sum_H: [H] float32 accumulator.
        exp_avg_sq: The local second-moment tensor (any shape; read through its flat view).
        geometry: Where the local elements sit in the full matrix.
        rows_limit: Rows at or beyond it (padded vocabulary) are left out of the sum.
    """
    flat = exp_avg_sq.view(-1)
    H = geometry.cols
    for piece in geometry.pieces(rows_limit):
        run = flat[piece.start_local : piece.start_local + piece.length]
        if piece.rows == 0:
            col_sum_H[piece.col_start : piece.col_start + piece.length] += run.float()
        else:
            col_sum_H += run.view(piece.rows, H).sum(0, dtype=torch.float32)


def column_denominator(
    col_sum_H: torch.Tensor,
    *,
    count: int,
    avg_scale: float,
    bias_correction2: float,
    eps: float,
) -> torch.Tensor:
    """[H] denominator sqrt(s * mean_i v[i, j] / bc2) + eps, in the form torch's AdamW uses."""
    col_mean_H = col_sum_H * (avg_scale / count)
    return col_mean_H.sqrt_().div_(bias_correction2**0.5).add_(eps)


def apply_coupled_update_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    denom_H: torch.Tensor,
    geometry: ShardGeometry,
    *,
    step_size: float,
    decay: float,
    blocked: bool = True,
) -> None:
    """p <- p * decay - step_size * m / denom[col], over every owned element (padded vocabulary
    rows included: only the mean leaves them out).

    Args:
        param: Local parameter tensor, updated in place.
        exp_avg: Local first moment, same shape as ``param``.
        denom_H: [H] shared denominator from :func:`column_denominator`.
        geometry: Where the local elements sit in the full matrix.
        step_size: lr / (1 - beta1^t).
        decay: 1 - lr * weight_decay.
        blocked: Walk whole rows in cache-sized chunks (the fast path) or in one go (reference).
    """
    p_flat, m_flat = param.view(-1), exp_avg.view(-1)
    H = geometry.cols
    denom_H = denom_H.to(param.dtype)
    for piece in geometry.pieces():
        spans = _chunks(piece, H) if blocked else [(piece.start_local, piece.length, piece.rows)]
        for start, length, rows in spans:
            p = p_flat[start : start + length]
            m = m_flat[start : start + length]
            if rows == 0:
                denom = denom_H[piece.col_start : piece.col_start + length]
            else:
                p, m, denom = p.view(rows, H), m.view(rows, H), denom_H
            if decay != 1.0:
                p.mul_(decay)
            p.addcdiv_(m, denom, value=-step_size)
