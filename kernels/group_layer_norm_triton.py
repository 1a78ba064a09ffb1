"""Triton kernels of Group LayerNorm: the math of group_layer_norm_reference.py.

Forward: one program per block of rows; each row is normalised in float32 and takes the
affine parameters of its group (gathered from the small (G, D) tables, which stay in cache).
Backward: one pass over the tokens. A persistent grid of P programs walks the row blocks;
each program writes dx and adds its rows' dy * xhat and dy into per-group sums held in
registers, which it writes out once as a (G, D) partial; the (P, G, D) partials are summed
afterwards, so no atomics and a deterministic result. Tokens come in runs of one group (a
user's history of one sequence, its targets of one scenario), so a block usually holds one
or two groups and is summed once per group present. mean and rstd are recomputed from x,
which the backward reads anyway, so the forward saves nothing.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backends import multiprocessors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_BLOCK_ELEMENTS = 8192  # rows x padded features per forward program: loads in flight, no spills
# Backward block size and grid, picked by `bench/kernels.py --sweep gln` (H100, D=512).
_BWD_BLOCK_ELEMENTS = 8192
_BWD_PROGRAMS_PER_SM = 2
_MAX_FEATURES = 2048
_MAX_GROUPS = 64
# The kernels are not specialised on the row count (nor the backward on the number of groups
# present), which change from batch to batch: Triton would compile a variant for each value's
# divisibility by 16 (and for 1). n_cols and the strides, fixed by the model, keep the hint.


def unsupported_reason(x: Tensor, weight: Tensor) -> str | None:
    """Why these inputs cannot run here, or None. x (N, D), weight (G, D)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x dtype {x.dtype}; the kernels take float16, bfloat16 or float32"
    if x.shape[1] > _MAX_FEATURES:
        return f"feature dim {x.shape[1]}; the kernels take at most {_MAX_FEATURES}"
    if weight.shape[0] > _MAX_GROUPS:
        return f"{weight.shape[0]} groups; the backward keeps per-group sums in registers, at most {_MAX_GROUPS}"
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


@triton.jit(do_not_specialize=["n_rows", "n_groups"])
def _gln_bwd_kernel(X, Group, W, DY, DX, PartialW, PartialB, n_rows, n_cols, n_groups,
                    stride_x, stride_dy, stride_dx, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    group_ids = tl.arange(0, G_PAD)
    dw = tl.zeros((G_PAD, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((G_PAD, BLOCK_D), dtype=tl.float32)
    for r0 in range(pid * BLOCK_R, n_rows, programs * BLOCK_R):
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
        dy_xhat = dy * xhat
        first = tl.min(tl.where(row_ok, group, n_groups))
        last = tl.max(group)
        for c in range(first, last + 1):
            in_group = (group == c)[:, None]
            into = group_ids[:, None] == c
            dw = tl.where(into, dw + tl.sum(tl.where(in_group, dy_xhat, 0.0), axis=0)[None, :], dw)
            db = tl.where(into, db + tl.sum(tl.where(in_group, dy, 0.0), axis=0)[None, :], db)
    out = pid * n_groups * n_cols + group_ids[:, None] * n_cols + cols[None, :]
    out_mask = (group_ids < n_groups)[:, None] & col_ok[None, :]
    tl.store(PartialW + out, dw, mask=out_mask)
    tl.store(PartialB + out, db, mask=out_mask)


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
    block_r, block_d, warps = _blocks(n_cols, _BWD_BLOCK_ELEMENTS)
    slots = 4 if _INTERPRET else _BWD_PROGRAMS_PER_SM * multiprocessors(x.device.index)
    programs = max(1, min(slots, triton.cdiv(x.shape[0], block_r)))
    partial = torch.empty(2, programs, n_groups, n_cols, dtype=torch.float32, device=x.device)
    _gln_bwd_kernel[(programs,)](
        x, group, weight.contiguous(), grad_out, dx, partial[0], partial[1], x.shape[0], n_cols, n_groups,
        x.stride(0), grad_out.stride(0), dx.stride(0), eps,
        BLOCK_R=block_r, BLOCK_D=block_d, G_PAD=triton.next_power_of_2(n_groups), num_warps=warps,
    )
    return dx, partial[0].sum(0).to(weight.dtype), partial[1].sum(0).to(weight.dtype)
