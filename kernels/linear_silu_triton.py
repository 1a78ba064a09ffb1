"""Triton kernel of the projections' bias gradients: the math of linear_silu_reference.py.

With silu (`silu_backward_bias_grad`), one pass over dy and pre writes dpre and sums it over rows,
so the bias gradient needs no second read of dpre (a separate reduction kernel per projection
before). Without (`bias_grad`, a plain projection), the pass sums dy alone (autograd's column sum took
41-50 us a call in the H200 training step, this 22-28; timed alone, from DRAM, the two are alike at
28K x 512 and the kernel is 1.6x faster at 131K x 512, 1.4x slower at 28K x 768). A grid of
(column blocks, row ranges): each program walks its range in blocks of BLOCK_R rows, adds
elementwise into a (BLOCK_R, BLOCK_C) float32 sum, reduces it over rows once at the end and writes
it into its own row of a (row ranges, C) partial, summed afterwards: no atomics, a deterministic
result.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backends import multiprocessors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Chosen, not swept: 3.4-3.9 TB/s on an H200 at the training step's shapes (bench/kernels.py --silu).
_BLOCK_R, _BLOCK_C, _WARPS = 32, 256, 8
_PROGRAMS_PER_SM = 4


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _bias_grad_kernel(DY, Z, DZ, Partial, n_rows, n_cols, rows_per_program, stride_dy, stride_z, stride_dz,
                      SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    start = tl.program_id(1) * rows_per_program
    end = tl.minimum(n_rows, start + rows_per_program)
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)  # rows x stride passes 2^31 at large batches
        mask = (rows < end)[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SILU:
            z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(z)
            dz = dy * s * (1.0 + z * (1.0 - s))  # 0 where masked (dy is)
            tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
            total += dz
        else:
            total += dy
    tl.store(Partial + tl.program_id(1) * n_cols + cols, tl.sum(total, axis=0), mask=col_ok)


def silu_backward_bias_grad(grad_y: Tensor, pre: Tensor, grad_pre: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dpre, db (C,) float32) for dy and pre (N, C) of unit column stride (any row stride); dpre is
    written into grad_pre if given, which may be pre itself (each element is read before it is written)."""
    grad_y, pre = (t if t.stride(-1) == 1 else t.contiguous() for t in (grad_y, pre))
    if grad_pre is None:
        grad_pre = torch.empty_like(pre)
    return grad_pre, _column_sums(grad_y, pre, grad_pre)


def bias_grad(grad_y: Tensor) -> Tensor:
    """db (C,) float32: dy (N, C) summed over rows."""
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    return _column_sums(grad_y, None, None)


def _column_sums(grad_y: Tensor, pre: Tensor | None, grad_pre: Tensor | None) -> Tensor:
    """The kernel's launch: with pre, dpre into grad_pre and its column sums; without, dy's."""
    n_rows, n_cols = grad_y.shape
    if n_rows == 0 or n_cols == 0:
        return torch.zeros(n_cols, dtype=torch.float32, device=grad_y.device)
    block_r, block_c = (16, 16) if _INTERPRET else (_BLOCK_R, _BLOCK_C)
    column_blocks = triton.cdiv(n_cols, block_c)
    slots = 4 if _INTERPRET else _PROGRAMS_PER_SM * multiprocessors(grad_y.device.index)
    ranges = max(1, min(triton.cdiv(n_rows, block_r), triton.cdiv(slots, column_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, ranges), block_r) * block_r
    ranges = max(1, triton.cdiv(n_rows, rows_per_program))
    partial = torch.empty(ranges, n_cols, dtype=torch.float32, device=grad_y.device)
    silu = pre is not None
    _bias_grad_kernel[(column_blocks, ranges)](
        grad_y, pre if silu else grad_y, grad_pre if silu else grad_y, partial, n_rows, n_cols, rows_per_program,
        grad_y.stride(0), pre.stride(0) if silu else 0, grad_pre.stride(0) if silu else 0, SILU=silu,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS,
    )
    return partial.sum(0)
