"""The GPU fast path: the two phases of the coupled step as Triton kernels, one pass each.

Selected by :func:`coupled_ds.kernels.backend_for` only for CUDA tensors when Triton imports;
anything else (no Triton, CPU tensors, float16/float64) uses the torch form. Importing this
module never imports Triton: that happens on first use, so CPU-only installs and CI are
unaffected.

* phase 1 (:func:`phase1_rows_`): a program owns ``ROWS`` rows x ``BLOCK`` columns; it updates
  m and v row by row and keeps the column sums of the new v (or g^2, compact state) of the
  counted rows in registers, then writes one partial row. The [rows / ROWS, W] partials are
  summed by torch (deterministic, no atomics; 1/64 of the matrix in size).
* phase 2 (:func:`phase2_rows_`): p <- p * decay + (-step_size) * (m / denom[col]); a program
  owns a [ROWS_PHASE2, BLOCK_COLS_PHASE2] tile and loads its denominators once. Tiles, not a
  flat index, because a flat index needs ``index % H`` per element: a 64-bit remainder is a
  software routine on NVIDIA GPUs, tens of instructions for every 12 bytes moved.

Arithmetic is float32 whatever the storage dtype (bf16 is rounded once per stored value).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "phase1_rows_", "phase2_rows_", "supports"]

_DTYPES = (torch.float32, torch.bfloat16)
# Launch shapes (not tuned on a GPU yet; bench/gpu_check.py --sweep times alternatives).
ROWS = 64          # rows per phase-1 program: the partial buffer is 1/ROWS of the matrix
BLOCK_COLS = 256   # columns per phase-1 program (768 = 3 x 256: no idle lanes at GPT-2 width)
WARPS_PHASE1 = 2   # 64 threads x 4 floats: 16-byte loads of a 256-column row
ROWS_PHASE2 = 8         # rows per phase-2 program (a power of two: a tile dimension)
BLOCK_COLS_PHASE2 = 256  # columns per phase-2 program: 2048-element tiles
WARPS_PHASE2 = 4


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-demand kernels; None when Triton is not importable."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def phase1_kernel(m_ptr, v_ptr, g_ptr, part_ptr, rows, W, rows_acc, beta1, beta2,
                      HAS_V: tl.constexpr, MAXIMIZE: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
        pid_r = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < W
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            r = pid_r * ROWS + i
            r_vec = tl.full([BLOCK], r, tl.int32)  # a [BLOCK] mask, not scalar & vector
            ok = col_ok & (r_vec < rows)
            off = r.to(tl.int64) * W + cols
            g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + off, mask=ok, other=0.0).to(tl.float32)
            if MAXIMIZE:
                m = beta1 * m - (1.0 - beta1) * g
            else:
                m = m + (1.0 - beta1) * (g - m)
            tl.store(m_ptr + off, m.to(m_ptr.dtype.element_ty), mask=ok)
            counted = ok & (r_vec < rows_acc)
            if HAS_V:
                v = tl.load(v_ptr + off, mask=ok, other=0.0).to(tl.float32)
                v = (beta2 * v + (1.0 - beta2) * (g * g)).to(v_ptr.dtype.element_ty)
                tl.store(v_ptr + off, v, mask=ok)
                acc += tl.where(counted, v.to(tl.float32), 0.0)
            else:
                acc += tl.where(counted, g * g, 0.0)
        tl.store(part_ptr + pid_r.to(tl.int64) * W + cols, acc, mask=col_ok)

    @triton.jit
    def phase2_kernel(p_ptr, m_ptr, d_ptr, rows, W, step_size, decay, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < W
        d = tl.load(d_ptr + cols, mask=col_ok, other=1.0)
        ok = (r[:, None] < rows) & col_ok[None, :]
        off = r[:, None].to(tl.int64) * W + cols[None, :]
        p = tl.load(p_ptr + off, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + off, mask=ok, other=0.0).to(tl.float32)
        p = p * decay + (-step_size) * (m / d[None, :])
        tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=ok)

    return triton, phase1_kernel, phase2_kernel


def available() -> bool:
    """Whether Triton imports (a GPU is still needed to run the kernels)."""
    return _kernels() is not None


def supports(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors can take the Triton kernels: CUDA, one dtype of fp32/bf16, contiguous."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (dtype in _DTYPES and all(t.is_cuda and t.dtype == dtype and t.is_contiguous()
                                     for t in present) and available())


def phase1_rows_(acc_H: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None,
                 grad: torch.Tensor, *, rows: int, H: int, rows_acc: int, beta1: float,
                 beta2: float, maximize: bool) -> None:
    """Same contract as :func:`coupled_ds.cpu_kernels.phase1_rows_` (``acc_H`` float32 here)."""
    triton, phase1_kernel, _ = _kernels()
    blocks = triton.cdiv(rows, ROWS)
    part = torch.empty(blocks, H, dtype=torch.float32, device=grad.device)
    grid = (blocks, triton.cdiv(H, BLOCK_COLS))
    v = exp_avg_sq if exp_avg_sq is not None else grad  # unused pointer when HAS_V is False
    phase1_kernel[grid](exp_avg, v, grad, part, rows, H, rows_acc, beta1, beta2,
                        HAS_V=exp_avg_sq is not None, MAXIMIZE=bool(maximize), ROWS=ROWS,
                        BLOCK=BLOCK_COLS, num_warps=WARPS_PHASE1)
    acc_H += part.sum(0)


def phase2_rows_(param: torch.Tensor, exp_avg: torch.Tensor, denom_H: torch.Tensor, *,
                 rows: int, H: int, step_size: float, decay: float) -> None:
    """Same contract as :func:`coupled_ds.cpu_kernels.phase2_rows_`."""
    triton, _, phase2_kernel = _kernels()
    grid = (triton.cdiv(rows, ROWS_PHASE2), triton.cdiv(H, BLOCK_COLS_PHASE2))
    phase2_kernel[grid](param, exp_avg, denom_H, rows, H, step_size, decay, ROWS=ROWS_PHASE2,
                        BLOCK=BLOCK_COLS_PHASE2, num_warps=WARPS_PHASE2)
