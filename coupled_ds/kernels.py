"""The Coupled Adam update, as pure functions on local tensors. No ranks, no engines.

For one coupled matrix E [V, H] the step is (DESIGN §2)::

    m      <- beta1 m + (1 - beta1) g                  # per element
    v      <- beta2 v + (1 - beta2) g^2                # per element, kept full size
    vbar_j  = s * mean_{i < vocab} v[i, j]              # one value per hidden column j
    p      <- p (1 - lr wd) - lr / bc1 * m / (sqrt(vbar_j / bc2) + eps)

A step has two local phases around one collective, because the column means need every piece
of the matrix:

1. moments and this rank's [H] partial column sums of v (the caller all-reduces them across
   ranks, see :mod:`coupled_ds.reduce`);
2. decay and the update with the shared [H] denominator.

Two forms of each phase:

* the reference form, whole-tensor torch ops that read like the math:
  :func:`update_moments_` + :func:`accumulate_column_sums_`, then
  :func:`apply_coupled_update_` with ``blocked=False``. The tests treat it as ground truth.
* the fast form, :func:`moments_and_column_sums_` and :func:`apply_coupled_update_` with
  ``blocked=True``: each tensor crosses memory once per phase, v is summed in the same pass that
  writes it, and no temporary as large as the matrix is made. It runs on the C kernels of
  :mod:`coupled_ds.cpu_kernels` for CPU float32/bf16, on the Triton kernels of
  :mod:`coupled_ds.triton_kernels` for CUDA tensors, and otherwise on torch ops over row chunks
  that stay in cache.

Compact state (``exp_avg_sq`` is None): the matrix keeps only the [H] column mean of v. Because
the mean is linear, mean(v_t) = beta2 mean(v_{t-1}) + (1 - beta2) mean(g^2), so phase 1 then sums
g^2 instead of v, and :func:`column_counts` gives how many counted elements of each column a
piece holds (to weigh the old mean).

Shapes in names: V vocabulary rows, H hidden columns, N local flat elements.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from coupled_ds import cpu_kernels, triton_kernels
from coupled_ds.geometry import RowPiece, ShardGeometry

__all__ = [
    "CHUNK_ELEMENTS",
    "accumulate_column_sums_",
    "apply_coupled_update_",
    "backend_for",
    "column_counts",
    "column_denominator",
    "expand_column_mean",
    "moments_and_column_sums_",
    "owned_view",
    "require_plain_tensors",
    "update_moments_",
]

# Elements per chunk in the row-chunked torch form: 256k fp32 = 1 MiB per tensor, so the three
# tensors of phase 1 stay in a 16 MiB L3 while several ops walk them (measured best on 2 cores:
# 64k-element chunks pay Python overhead per chunk, whole tensors pay memory traffic per op).
CHUNK_ELEMENTS = 1 << 18


def require_plain_tensors(*tensors: torch.Tensor | None) -> None:
    """Raise unless every tensor is a plain ``torch.Tensor`` / ``nn.Parameter``.

    The kernels read raw storage (C via ctypes, Triton) and flat views. A tensor subclass (a
    DTensor under FSDP2 / tensor parallelism, a fake or functional tensor) is a global view whose
    storage is not what its shape says: native code would read past its local shard.
    """
    for t in tensors:
        if t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(
                f"coupled_ds kernels got a {type(t).__module__}.{type(t).__name__} of shape "
                f"{tuple(t.shape)}; they take plain local tensors only. Step DTensors through "
                "CoupledAdam (it derives their shard geometry and passes their local shards), or "
                "pass .to_local() shards with a ShardGeometry.")


def owned_view(tensor: torch.Tensor, geometry: ShardGeometry) -> torch.Tensor:
    """The 1-D view [N] of the elements ``geometry`` owns (engine padding excluded)."""
    flat = tensor.view(-1)
    return flat[geometry.offset_local : geometry.offset_local + geometry.numel]


# ---------------------------------------------------------------------------- reference form
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
    if exp_avg_sqs:
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)


def accumulate_column_sums_(
    col_sum_H: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    geometry: ShardGeometry,
    *,
    rows_limit: int,
    square: bool = False,
) -> None:
    """Add the column sums of v over the owned elements of rows ``< rows_limit`` to ``col_sum_H``.

    Args:
        col_sum_H: [H] float32 accumulator.
        exp_avg_sq: The local second-moment tensor (any shape; read through its flat view).
        geometry: Where the local elements sit in the full matrix.
        rows_limit: Rows at or beyond it (padded vocabulary) are left out of the sum.
        square: Sum the squares of the values instead (compact state sums g^2).
    """
    require_plain_tensors(exp_avg_sq)
    flat = exp_avg_sq.view(-1)
    H = geometry.cols
    for piece in geometry.pieces(rows_limit):
        run = flat[piece.start_local : piece.start_local + piece.length].float()
        if square:
            run = run * run
        if piece.rows == 0:
            col_sum_H[piece.col_start : piece.col_start + piece.length] += run
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


# ---------------------------------------------------------------------------- fast form
def backend_for(*tensors: torch.Tensor | None) -> str:
    """Which fast kernels take these tensors: "triton", "native" (C, CPU) or "torch"."""
    require_plain_tensors(*tensors)
    first = next(t for t in tensors if t is not None)
    if first.is_cuda:
        return "triton" if triton_kernels.supports(*tensors) else "torch"
    return "native" if cpu_kernels.supports(*tensors) else "torch"


def _counted_runs(geometry: ShardGeometry, rows_limit: int) -> Iterator[tuple[RowPiece, int, int]]:
    """Each piece as (piece, rows, rows counted): a partial row is one row of its own width."""
    H = geometry.cols
    to_global = geometry.start_global_flat - geometry.offset_local
    for piece in geometry.pieces():
        row_global = (piece.start_local + to_global) // H
        rows = max(piece.rows, 1)
        yield piece, rows, max(0, min(rows, rows_limit - row_global))


def _phase1_torch(acc_H, m, v, g, *, rows, rows_acc, beta1, beta2, maximize) -> None:
    """Phase 1 on [rows, W] views with torch ops, in row chunks that stay in cache."""
    W = g.shape[1]
    # On a GPU there is no cache to fit and every chunk costs kernel launches: one chunk.
    step = rows if g.is_cuda else max(1, CHUNK_ELEMENTS // W)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        gc, mc = g[r0:r1], m[r0:r1]
        if maximize:
            mc.mul_(beta1).add_(gc, alpha=-(1.0 - beta1))
        else:
            mc.lerp_(gc, 1.0 - beta1)
        n_acc = max(0, min(rows_acc, r1) - r0)
        if v is not None:
            vc = v[r0:r1]
            vc.mul_(beta2).addcmul_(gc, gc, value=1.0 - beta2)
            if n_acc:
                acc_H += vc[:n_acc].sum(0, dtype=torch.float32)
        elif n_acc:
            gf = gc[:n_acc].float()
            acc_H += (gf * gf).sum(0)


def moments_and_column_sums_(
    col_sum_H: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor | None,
    grad: torch.Tensor | None,
    geometry: ShardGeometry,
    *,
    beta1: float,
    beta2: float,
    maximize: bool,
    rows_limit: int,
) -> None:
    """Phase 1 of one local piece in one pass: moments, and its [H] partial column sums.

    With a gradient: m and v (if kept) are updated in place and the new v of rows
    ``< rows_limit`` is added to ``col_sum_H``; with ``exp_avg_sq`` None (compact state) g^2 is
    added instead. Without a gradient (``grad`` None) nothing is updated and the current v is
    added (the other pieces still need this piece's share of the mean).

    Args:
        col_sum_H: [H] float32 accumulator (on the tensors' device).
        exp_avg, exp_avg_sq, grad: Local tensors of the piece (any shape, read flat).
        geometry: Where the local elements sit in the full matrix.
        rows_limit: Rows at or beyond it (padded vocabulary) are updated but not summed.
    """
    if grad is None:
        if exp_avg_sq is not None:
            accumulate_column_sums_(col_sum_H, exp_avg_sq, geometry, rows_limit=rows_limit)
        return
    backend = backend_for(exp_avg, exp_avg_sq, grad)
    flats = [t.view(-1) if t is not None else None for t in (exp_avg, exp_avg_sq, grad)]
    # The C kernels sum in float64 (then added once); the others add into col_sum_H directly,
    # which on a GPU saves two small launches per step.
    native = backend == "native"
    acc_H = (torch.zeros(geometry.cols, dtype=torch.float64, device=col_sum_H.device) if native
             else col_sum_H)
    for piece, rows, rows_acc in _counted_runs(geometry, rows_limit):
        W = piece.length // rows
        m, v, g = (f[piece.start_local : piece.start_local + piece.length].view(rows, W)
                   if f is not None else None for f in flats)
        acc = acc_H[piece.col_start : piece.col_start + W]
        kwargs = dict(rows=rows, rows_acc=rows_acc, beta1=beta1, beta2=beta2, maximize=maximize)
        if native:
            cpu_kernels.phase1_rows_(acc, m, v, g, H=W, **kwargs)
        elif backend == "triton":
            triton_kernels.phase1_rows_(acc, m, v, g, H=W, **kwargs)
        else:
            _phase1_torch(acc, m, v, g, **kwargs)
    if native:
        col_sum_H += acc_H.to(col_sum_H.dtype)


def column_counts(geometry: ShardGeometry, rows_limit: int, device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """[H] float32: how many owned elements of rows ``< rows_limit`` lie in each column."""
    counts_H = torch.zeros(geometry.cols, dtype=torch.float32, device=device)
    for piece in geometry.pieces(rows_limit):
        if piece.rows:
            counts_H += piece.rows
        else:
            counts_H[piece.col_start : piece.col_start + piece.length] += 1
    return counts_H


def expand_column_mean(col_mean_H: torch.Tensor, like: torch.Tensor, geometry: ShardGeometry
                       ) -> torch.Tensor:
    """A full-size v shaped like ``like``: every owned element gets its column's mean, engine
    padding gets 0. What compact state writes into checkpoints as ``exp_avg_sq``."""
    out = torch.zeros_like(like, memory_format=torch.contiguous_format)
    flat = out.view(-1)
    mean_H = col_mean_H.to(out.dtype)
    for piece in geometry.pieces():
        run = flat[piece.start_local : piece.start_local + piece.length]
        if piece.rows:
            run.view(piece.rows, geometry.cols).copy_(mean_H.expand(piece.rows, -1))
        else:
            run.copy_(mean_H[piece.col_start : piece.col_start + piece.length])
    return out


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
        blocked: The fast form (C / Triton kernels, else torch ops on cache-sized row chunks) or
            the reference form (torch ops on whole pieces).
    """
    require_plain_tensors(param, exp_avg)
    backend = backend_for(param, exp_avg) if blocked else "torch"
    if backend != "torch":
        _apply_fused(backend, param, exp_avg, denom_H, geometry, step_size=step_size, decay=decay)
        return
    p_flat, m_flat = param.view(-1), exp_avg.view(-1)
    H = geometry.cols
    denom_H = denom_H.to(param.dtype)
    for piece in geometry.pieces():
        whole = not blocked or param.is_cuda  # chunks only pay off where a CPU cache holds them
        spans = [(piece.start_local, piece.length, piece.rows)] if whole else _chunks(piece, H)
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


def _apply_fused(backend: str, param: torch.Tensor, exp_avg: torch.Tensor, denom_H: torch.Tensor,
                 geometry: ShardGeometry, *, step_size: float, decay: float) -> None:
    """Phase 2 on the C or Triton kernels; the denominator stays float32 (more exact in bf16)."""
    kernel = cpu_kernels.phase2_rows_ if backend == "native" else triton_kernels.phase2_rows_
    p_flat, m_flat = param.view(-1), exp_avg.view(-1)
    denom_H = denom_H.float().contiguous()
    for piece in geometry.pieces():
        rows = max(piece.rows, 1)
        W = piece.length // rows
        span = slice(piece.start_local, piece.start_local + piece.length)
        kernel(p_flat[span], m_flat[span], denom_H[piece.col_start : piece.col_start + W],
               rows=rows, H=W, step_size=step_size, decay=decay)
