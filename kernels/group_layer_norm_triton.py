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
Stacked (S sets of affine parameters on the same rows, a run of target layers): the forward
normalises each row once and writes S outputs; the backward sums the sets' g for dx and keeps a
run's per-set sums reduced over rows (`_gln_stacked_bwd_kernel`).
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backends import dtype_unsupported_reason, multiprocessors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_BLOCK_ELEMENTS = 8192  # rows x padded features per forward program: loads in flight, no spills
# Backward (block elements, warps, programs per SM) by padded feature count, else _BWD_DEFAULT: H200,
# bf16 x and gradients as the model has them under autocast (`bench/kernels.py --sweep gln`: D = 512
# and 768 summed, 0.71 ms with the default against 0.80 ms with (4096, 4, 2), bench/RESULTS.md).
# Wider rows than the sweep's keep the forward's warps.
_BWD_DEFAULT = (2048, 2, 8)
_BWD_CONFIGS: dict[int, tuple[int, int, int]] = {}  # widths whose own sweep (per width) beat the default
_BWD_SWEPT_FEATURES = 1024
_MAX_FEATURES = 2048
# The stacked backward keeps a run's sums per set in registers, (sets padded to a power of 2) x
# padded features: at most this many, more sets go in several launches (H200: 5 sets of D = 768,
# 8 x 1024, took 2.3x the time of 4 sets; 5 sets of D = 512, 8 x 512, 1.2x; `bench/kernels.py --gln-stacked`).
_BWD_STACKED_SUMS = 4096
# Its (block elements, warps, programs per SM) by padded feature count, else the plain backward's.
# H200, bf16, 104,000 rows (`bench/kernels.py --gln-stacked`): at D = 512 with 3 sets 0.35 ms, against
# 0.71 with (4096, 4, 2); at D = 768 (1024 padded) with 4 sets (4096, 4, 2) stays the fastest (0.71
# ms), and 2 warps there spill the run's sums (15 ms).
_BWD_STACKED_CONFIGS = {512: (2048, 2, 4), 1024: (4096, 4, 2)}
# The kernels are not specialised on the row count (nor the backward on the number of groups
# present), nor on the stride between stacked sets (rows x features), which change from batch to
# batch: Triton would compile a variant for each value's divisibility by 16 (and for 1). n_cols and
# the row strides, fixed by the model, keep the hint.


def unsupported_reason(x: Tensor) -> str | None:
    """Why the kernels cannot take x (N, D), or None."""
    if (reason := dtype_unsupported_reason(x.dtype, "x dtype")) is not None:
        return reason
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


@triton.jit(do_not_specialize=["n_rows", "n_groups", "stride_y_set"])
def _gln_fwd_kernel(X, Group, W, B, Y, n_rows, n_cols, n_groups, stride_x, stride_y, stride_y_set, eps,
                    SETS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    xhat, _ = _normalize(X, rows, cols, mask, n_cols, stride_x, eps)
    group = tl.load(Group + rows, mask=row_ok, other=0)
    stride_y_set = stride_y_set.to(tl.int64)  # sets x rows x features passes 2^31 at large batches
    for s in tl.static_range(SETS):  # the rows' statistics once, each set's affine parameters in turn
        at = (s * n_groups + group)[:, None] * n_cols + cols[None, :]
        w = tl.load(W + at, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + s * stride_y_set + rows[:, None] * stride_y + cols[None, :], (xhat * w + b).to(Y.dtype.element_ty),
                 mask=mask)


@triton.jit
def _program_rows(Group, n_rows, BLOCK_R: tl.constexpr):
    """The backward program's contiguous range of row blocks, [start, end), and its first row's group."""
    per_program = tl.cdiv(tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)) * BLOCK_R
    start = tl.program_id(0) * per_program
    return start, tl.minimum(n_rows, start + per_program), tl.load(Group + tl.minimum(start, n_rows - 1))


@triton.jit
def _row_block(X, Group, r0, n_rows, cols, col_ok, n_cols, stride_x, eps, BLOCK_R: tl.constexpr):
    """The backward's block of rows from r0: rows, row_ok, mask, xhat, rstd and group (-1 past the end)."""
    rows = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & col_ok[None, :]
    xhat, rstd = _normalize(X, rows, cols, mask, n_cols, stride_x, eps)
    group = tl.load(Group + rows, mask=row_ok, other=-1)
    return rows, row_ok, mask, xhat, rstd, group


@triton.jit
def _add_to_partial(Partial, pid, group, n_groups, n_cols, cols, col_ok, rows_sum):
    """Partial[pid, group, :] += rows_sum: this program's own slice, so no atomics. The barrier
    makes this program's earlier stores to the slice visible to whichever of its threads loads
    an element now (the call sites need not give the sums the same layout)."""
    tl.debug_barrier()
    at = Partial + (pid * n_groups + group) * n_cols + cols
    tl.store(at, tl.load(at, mask=col_ok, other=0.0) + rows_sum, mask=col_ok)


@triton.jit(do_not_specialize=["n_rows", "n_groups"])
def _gln_bwd_kernel(X, Group, W, DY, DX, DRes, PartialW, PartialB, n_rows, n_cols, n_groups,
                    stride_x, stride_dy, stride_dx, stride_dres, eps,
                    RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx (plus DRes, the gradient that x's other use, a residual add, gives it, if RESIDUAL) and the
    per-program sums of dy * xhat and dy per group."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    # A contiguous range of row blocks per program, so that consecutive blocks mostly continue
    # one run of a group: their dy * xhat and dy are added elementwise into (BLOCK_R, BLOCK_D)
    # sums, reduced over rows only when the run ends.
    start, end, run_group = _program_rows(Group, n_rows, BLOCK_R)
    run_w = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    run_b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows, row_ok, mask, xhat, rstd, group = _row_block(X, Group, r0, n_rows, cols, col_ok, n_cols, stride_x, eps,
                                                           BLOCK_R)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + group[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dy * w
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_gx = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        if RESIDUAL:
            dx += tl.load(DRes + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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


@triton.jit
def _add_sets_to_partial(Partial, pid, group, n_groups, n_cols, sets, cols, ok, sums, SETS: tl.constexpr):
    """Partial[pid, sets, group, :] += sums (SETS_PAD, BLOCK_D) where `ok`: as `_add_to_partial`, for
    the stacked backward's (programs, SETS, G, D) partials."""
    tl.debug_barrier()
    at = Partial + ((pid * SETS + sets[:, None]) * n_groups + group) * n_cols + cols[None, :]
    tl.store(at, tl.load(at, mask=ok, other=0.0) + sums, mask=ok)


@triton.jit(do_not_specialize=["n_rows", "n_groups", "stride_dy_set"])
def _gln_stacked_bwd_kernel(X, Group, W, DY, DX, PartialW, PartialB, n_rows, n_cols, n_groups,
                            stride_x, stride_dy, stride_dy_set, stride_dx, eps,
                            SETS: tl.constexpr, SETS_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """The backward of SETS sets of affine parameters on the same rows: dx from the sets' g summed,
    and per set the sums of dy * xhat and dy per group. The grid and the runs are those of
    `_gln_bwd_kernel`, but a run's sums are kept reduced over rows, (SETS_PAD, BLOCK_D): each set's
    (BLOCK_R, BLOCK_D) tile is summed over its rows as it comes, so the registers do not grow
    with the sets."""
    pid = tl.program_id(0)
    stride_dy_set = stride_dy_set.to(tl.int64)  # as the forward's stride_y_set
    sets = tl.arange(0, SETS_PAD)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    sums_ok = (sets < SETS)[:, None] & col_ok[None, :]
    start, end, run_group = _program_rows(Group, n_rows, BLOCK_R)
    run_w = tl.zeros((SETS_PAD, BLOCK_D), dtype=tl.float32)
    run_b = tl.zeros((SETS_PAD, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows, row_ok, mask, xhat, rstd, group = _row_block(X, Group, r0, n_rows, cols, col_ok, n_cols, stride_x, eps,
                                                           BLOCK_R)
        lowest = tl.min(tl.where(row_ok, group, n_groups))
        highest = tl.max(group)  # masked rows hold -1
        if (lowest != run_group) | (highest != run_group):  # the run ends: its sums go out
            _add_sets_to_partial(PartialW, pid, run_group, n_groups, n_cols, sets, cols, sums_ok, run_w, SETS)
            _add_sets_to_partial(PartialB, pid, run_group, n_groups, n_cols, sets, cols, sums_ok, run_b, SETS)
            run_w = tl.zeros((SETS_PAD, BLOCK_D), dtype=tl.float32)
            run_b = tl.zeros((SETS_PAD, BLOCK_D), dtype=tl.float32)
            run_group = highest
        g = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for s in tl.static_range(SETS):
            dy = tl.load(DY + s * stride_dy_set + rows[:, None] * stride_dy + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            w = tl.load(W + (s * n_groups + group)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
            g += dy * w.to(tl.float32)
            dy_xhat = dy * xhat  # masked rows and columns are 0 (dy and xhat are)
            this_set = (sets == s)[:, None]
            if lowest == highest:
                run_w += tl.where(this_set, tl.sum(dy_xhat, axis=0)[None, :], 0.0)
                run_b += tl.where(this_set, tl.sum(dy, axis=0)[None, :], 0.0)
            else:  # a run boundary inside the block: its sums go out per group present
                c = lowest
                while c <= highest:
                    in_group = (group == c)[:, None]
                    _add_sets_to_partial(PartialW, pid, c, n_groups, n_cols, sets, cols, sums_ok & this_set,
                                         tl.sum(tl.where(in_group, dy_xhat, 0.0), axis=0)[None, :], SETS)
                    _add_sets_to_partial(PartialB, pid, c, n_groups, n_cols, sets, cols, sums_ok & this_set,
                                         tl.sum(tl.where(in_group, dy, 0.0), axis=0)[None, :], SETS)
                    c = tl.min(tl.where(row_ok & (group > c), group, n_groups))
        mean_g = tl.sum(g, axis=1) / n_cols
        mean_gx = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    _add_sets_to_partial(PartialW, pid, run_group, n_groups, n_cols, sets, cols, sums_ok, run_w, SETS)
    _add_sets_to_partial(PartialB, pid, run_group, n_groups, n_cols, sets, cols, sums_ok, run_b, SETS)


def _blocks(n_cols: int, elements: int) -> tuple[int, int, int]:
    """(rows per block, padded features, warps) for blocks of about `elements` values."""
    block_d = max(16, triton.next_power_of_2(n_cols))
    block_r = 16 if _INTERPRET else max(1, elements // block_d)
    return block_r, block_d, 4 if block_d <= 256 else 8 if block_d <= 1024 else 16


def _backward_grid(x: Tensor, n_cols: int, configs: dict[int, tuple[int, int, int]]) -> tuple[int, int, int, int]:
    """(rows per block, padded features, warps, programs) of a backward kernel for x's rows, with the
    (block elements, warps, programs per SM) that `configs` holds for the padded width (else the
    plain backward's), the warps only up to the swept feature count."""
    block_d = max(16, triton.next_power_of_2(n_cols))
    elements, swept_warps, per_sm = configs.get(block_d) or _BWD_CONFIGS.get(block_d, _BWD_DEFAULT)
    block_r, block_d, warps = _blocks(n_cols, elements)
    warps = swept_warps if block_d <= _BWD_SWEPT_FEATURES else warps
    slots = 4 if _INTERPRET else per_sm * multiprocessors(x.device.index)
    return block_r, block_d, warps, max(1, min(slots, triton.cdiv(x.shape[0], block_r)))


def group_layer_norm(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    x = x.contiguous()
    y = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    return _forward(x, group, weight[None], bias[None], eps, y, stride_y_set=0)


def group_layer_norm_backward(grad_out, x, group, weight, eps: float,
                              grad_residual: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    x, grad_out = x.contiguous(), grad_out.contiguous()
    n_groups, n_cols = weight.shape
    dx = torch.empty_like(x)
    if x.shape[0] == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    residual = grad_residual is not None
    if residual and grad_residual.stride(-1) != 1:
        grad_residual = grad_residual.contiguous()
    block_r, block_d, warps, programs = _backward_grid(x, n_cols, _BWD_CONFIGS)
    partial = torch.zeros(2, programs, n_groups, n_cols, dtype=torch.float32, device=x.device)
    _gln_bwd_kernel[(programs,)](
        x, group, weight.contiguous(), grad_out, dx, grad_residual if residual else dx, partial[0], partial[1],
        x.shape[0], n_cols, n_groups, x.stride(0), grad_out.stride(0), dx.stride(0),
        grad_residual.stride(0) if residual else 0, eps, RESIDUAL=residual, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=warps,
    )
    return dx, partial[0].sum(0).to(weight.dtype), partial[1].sum(0).to(weight.dtype)


def group_layer_norm_stacked(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float,
                             out_dtype: torch.dtype | None = None) -> Tensor:
    x = x.contiguous()
    y = x.new_empty((weight.shape[0],) + x.shape, dtype=out_dtype or x.dtype)
    return _forward(x, group, weight, bias, eps, y, stride_y_set=y.stride(0))


def _forward(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float, y: Tensor,
             stride_y_set: int) -> Tensor:
    """Writes the S sets of weight (S, G, D) into y, outputs stride_y_set elements apart (rows at y's
    stride(-2)), and returns y."""
    sets, n_groups, n_cols = weight.shape
    if x.shape[0] == 0:
        return y
    block_r, block_d, warps = _blocks(n_cols, _MAX_BLOCK_ELEMENTS)
    _gln_fwd_kernel[(triton.cdiv(x.shape[0], block_r),)](
        x, group, weight.contiguous(), bias.contiguous(), y, x.shape[0], n_cols, n_groups, x.stride(0),
        y.stride(-2), stride_y_set, eps, SETS=sets, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return y


def group_layer_norm_stacked_backward(grad_out, x, group, weight, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    sets, n_groups, n_cols = weight.shape
    if sets == 1:
        dx, dweight, dbias = group_layer_norm_backward(grad_out[0], x, group, weight[0], eps)
        return dx, dweight[None], dbias[None]
    block_r, block_d, warps, programs = _backward_grid(x, n_cols, _BWD_STACKED_CONFIGS)
    per_launch = max(1, _BWD_STACKED_SUMS // block_d)
    if sets > per_launch:
        parts = [group_layer_norm_stacked_backward(grad_out[i:i + per_launch], x, group, weight[i:i + per_launch], eps)
                 for i in range(0, sets, per_launch)]
        return sum(p[0] for p in parts), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    x, grad_out = x.contiguous(), grad_out.contiguous()
    dx = torch.empty_like(x)
    if x.shape[0] == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    partial = torch.zeros(2, programs, sets, n_groups, n_cols, dtype=torch.float32, device=x.device)
    _gln_stacked_bwd_kernel[(programs,)](
        x, group, weight.contiguous(), grad_out, dx, partial[0], partial[1], x.shape[0], n_cols, n_groups,
        x.stride(0), grad_out.stride(1), grad_out.stride(0), dx.stride(0), eps, SETS=sets,
        SETS_PAD=triton.next_power_of_2(sets), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return dx, partial[0].sum(0).to(weight.dtype), partial[1].sum(0).to(weight.dtype)
