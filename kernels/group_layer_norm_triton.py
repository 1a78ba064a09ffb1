"""Triton kernels of Group LayerNorm: the math of group_layer_norm_reference.py.

Forward: one program per block of rows; each row is normalised in float32 and takes the
affine parameters of its group (gathered from the small (G, D) tables, which stay in cache).
Backward: one pass over the tokens. A persistent grid of P programs, each over a contiguous
range of row blocks, writes dx and sums dy * xhat and dy per group into its own (G, D) slice
of a (P, G, D) partial, summed afterwards: no atomics and a deterministic result. Tokens come
in runs of one group (a user's history of one sequence, its targets of one scenario), so a
program adds a run's blocks elementwise into (rows, D) sums and reduces them over rows once,
when the run ends; only a block that holds a run boundary is summed per group present. mean
and rstd are recomputed from x, which the backward reads anyway, so the forward saves nothing.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backends import multiprocessors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_BLOCK_ELEMENTS = 8192  # rows x padded features per forward program: loads in flight, no spills
# Backward block size, grid and warps: H200, D = 512 and 768, bf16 x and gradients as the model has
# them under autocast (`bench/kernels.py --sweep gln`: 0.78 ms for both dims against 1.26 ms for 8192
# elements and 8 warps, bench/RESULTS.md). Wider rows than the sweep's keep the forward's warps.
_BWD_BLOCK_ELEMENTS = 4096
_BWD_PROGRAMS_PER_SM = 2
_BWD_WARPS = 4
_BWD_SWEPT_FEATURES = 1024
_MAX_FEATURES = 2048
# The kernels are not specialised on the row count (nor the backward on the number of groups
# present), which change from batch to batch: Triton would compile a variant for each value's
# divisibility by 16 (and for 1). n_cols and the strides, fixed by the model, keep the hint.


def unsupported_reason(x: Tensor, weight: Tensor) -> str | None:
    """Why these inputs cannot run here, or None. x (N, D), weight (G, D)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x dtype {x.dtype}; the kernels take float16, bfloat16 or float32"
    if x.shape[1] > _MAX_FEATURES:
        return f"feature dim {x.shape[1]}; the kernels take at most {_MAX_FEATURES}"
    return None


@triton.jit
def _normalize(X, rows, cols, mask, n_cols, stride_x, eps):
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    return centered * rstd[:, None], rstd


@triton.jit(do_not_specialize=["n_rows"])
def _gln_fwd_kernel(X, Group, W, B, Y, n_rows, n_cols, stride_x, stride_y, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    xhat, _ = _normalize(X, rows, cols, mask, n_cols, stride_x, eps)
    group = tl.load(Group + rows, mask=row_ok, other=0)
    w = tl.load(W + group[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + group[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (xhat * w + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_to_partial(Partial, pid, group, n_groups, n_cols, cols, col_ok, rows_sum):
    """Partial[pid, group, :] += rows_sum: this program's own slice, so no atomics. The barrier
    makes this program's earlier stores to the slice visible to whichever of its threads loads
    an element now (the call sites need not give the sums the same layout)."""
    tl.debug_barrier()
    at = Partial + (pid * n_groups + group) * n_cols + cols
    tl.store(at, tl.load(at, mask=col_ok, other=0.0) + rows_sum, mask=col_ok)


@triton.jit(do_not_specialize=["n_rows", "n_groups"])
def _gln_bwd_kernel(X, Group, W, DY, DX, PartialW, PartialB, n_rows, n_cols, n_groups,
                    stride_x, stride_dy, stride_dx, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    # A contiguous range of row blocks per program, so that consecutive blocks mostly continue
    # one run of a group: their dy * xhat and dy are added elementwise into (BLOCK_R, BLOCK_D)
    # sums, reduced over rows only when the run ends.
    per_program = tl.cdiv(tl.cdiv(n_rows, BLOCK_R), programs) * BLOCK_R
    run_w = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    run_b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    run_group = tl.load(Group + tl.minimum(pid * per_program, n_rows - 1))
    for r0 in range(pid * per_program, tl.minimum(n_rows, (pid + 1) * per_program), BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        xhat, rstd = _normalize(X, rows, cols, mask, n_cols, stride_x, eps)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        group = tl.load(Group + rows, mask=row_ok, other=-1)
        w = tl.load(W + group[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dy * w
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_gx = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dy_xhat = dy * xhat  # masked rows and columns are 0 (dy and xhat are)
        others = tl.sum((row_ok & (group != run_group)).to(tl.int32))
        if others == 0:
            run_w += dy_xhat
            run_b += dy
        else:
            _add_to_partial(PartialW, pid, run_group, n_groups, n_cols, cols, col_ok, tl.sum(run_w, axis=0))
            _add_to_partial(PartialB, pid, run_group, n_groups, n_cols, cols, col_ok, tl.sum(run_b, axis=0))
            lowest = tl.min(tl.where(row_ok, group, n_groups))
            highest = tl.max(group)  # masked rows hold -1
            if lowest == highest:  # a new run starts with this whole block
                run_group = lowest
                run_w = dy_xhat
                run_b = dy
            else:  # a run boundary inside the block: its sums go out per group
                run_w = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
                run_b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
                c = lowest
                while c <= highest:  # the groups present, in increasing order
                    in_group = (group == c)[:, None]
                    _add_to_partial(PartialW, pid, c, n_groups, n_cols, cols, col_ok,
                                    tl.sum(tl.where(in_group, dy_xhat, 0.0), axis=0))
                    _add_to_partial(PartialB, pid, c, n_groups, n_cols, cols, col_ok,
                                    tl.sum(tl.where(in_group, dy, 0.0), axis=0))
                    c = tl.min(tl.where(row_ok & (group > c), group, n_groups))
    _add_to_partial(PartialW, pid, run_group, n_groups, n_cols, cols, col_ok, tl.sum(run_w, axis=0))
    _add_to_partial(PartialB, pid, run_group, n_groups, n_cols, cols, col_ok, tl.sum(run_b, axis=0))


def _blocks(n_cols: int, elements: int) -> tuple[int, int, int]:
    """(rows per block, padded features, warps) for blocks of about `elements` values."""
    block_d = max(16, triton.next_power_of_2(n_cols))
    block_r = 16 if _INTERPRET else max(1, elements // block_d)
    return block_r, block_d, 4 if block_d <= 256 else 8 if block_d <= 1024 else 16


def group_layer_norm(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.shape[0] == 0:
        return y
    block_r, block_d, warps = _blocks(x.shape[1], _MAX_BLOCK_ELEMENTS)
    _gln_fwd_kernel[(triton.cdiv(x.shape[0], block_r),)](
        x, group, weight.contiguous(), bias.contiguous(), y, x.shape[0], x.shape[1], x.stride(0), y.stride(0), eps,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return y


def group_layer_norm_backward(grad_out, x, group, weight, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    x, grad_out = x.contiguous(), grad_out.contiguous()
    n_groups, n_cols = weight.shape
    dx = torch.empty_like(x)
    if x.shape[0] == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    block_r, block_d, warps = _blocks(n_cols, _BWD_BLOCK_ELEMENTS)
    warps = _BWD_WARPS if block_d <= _BWD_SWEPT_FEATURES else warps
    slots = 4 if _INTERPRET else _BWD_PROGRAMS_PER_SM * multiprocessors(x.device.index)
    programs = max(1, min(slots, triton.cdiv(x.shape[0], block_r)))
    partial = torch.zeros(2, programs, n_groups, n_cols, dtype=torch.float32, device=x.device)
    _gln_bwd_kernel[(programs,)](
        x, group, weight.contiguous(), grad_out, dx, partial[0], partial[1], x.shape[0], n_cols, n_groups,
        x.stride(0), grad_out.stride(0), dx.stride(0), eps, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=warps,
    )
    return dx, partial[0].sum(0).to(weight.dtype), partial[1].sum(0).to(weight.dtype)
