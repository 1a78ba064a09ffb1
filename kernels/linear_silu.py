"""Public ops of the layers' projections, with dispatch: a projection followed by silu (an HSTU
layer's Q/U/K/V projections) and a plain projection (its output projection).

    linear_silu(h, weight, bias, *, impl="auto") -> silu(h @ weight.T + bias)     (N, C)
    linear(h, weight, bias, *, impl="auto")      -> h @ weight.T + bias           (N, C)

h (N, D), weight (C, D), bias (C,). Under autocast the matmul runs in the autocast dtype, as
F.linear would, and so does the result. Forward: one matmul with the bias in its epilogue (and one
silu). Backward: the bias gradient by the Triton kernel on CUDA (`linear_silu_reference.py`
elsewhere): for linear_silu in the same pass as silu's backward (`silu_backward_bias_grad`: dy ->
dpre and its column sums), for linear a column sum of dy (`bias_grad`); then the two matmuls. Left
to autograd, the bias gradient was a reduction of its own, which for linear_silu read dpre once
more, and for linear took 41-50 us a call in the H200 training step where the kernel takes 22-28.

    silu_backward_bias_grad(grad_y, pre, grad_pre=None, *, impl="auto") -> (dpre, dbias)
    bias_grad(grad_y, *, impl="auto") -> dbias

are those passes alone, for callers with their own projections (`mtfm.model.context_kv`).
Under torch.compile (which fuses them itself) and without gradients (serving) the ops are plain
F.linear (and F.silu).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import linear_silu_reference as reference
from .backends import dtype_unsupported_reason, resolve_impl


def implementation(impl: str):
    """The module of implementation `impl` ("triton" or "reference"): its `silu_backward_bias_grad`
    and `bias_grad`."""
    if impl == "triton":
        from . import linear_silu_triton

        return linear_silu_triton
    return reference


def silu_backward_bias_grad(grad_y: Tensor, pre: Tensor, grad_pre: Tensor | None = None, *,
                            impl: str = "auto") -> tuple[Tensor, Tensor]:
    """For y = silu(pre): (dL/dpre in pre's dtype, written into grad_pre if given (pre itself
    allowed; unit column stride), its sum over rows in float32 (float64 for float64 input), the bias
    gradient). grad_y, pre (N, C)."""
    if grad_y.shape != pre.shape or pre.dim() != 2:
        raise ValueError(f"silu_backward_bias_grad: grad_y {tuple(grad_y.shape)} and pre {tuple(pre.shape)} "
                         "must be the same (rows, columns) shape")
    if grad_pre is not None and (grad_pre.shape != pre.shape or grad_pre.stride(-1) != 1):
        raise ValueError(f"silu_backward_bias_grad: grad_pre {tuple(grad_pre.shape)} with strides {grad_pre.stride()} "
                         f"must be pre's shape {tuple(pre.shape)} with unit column stride")
    return implementation(_chosen("silu_backward_bias_grad", impl, pre)).silu_backward_bias_grad(grad_y, pre, grad_pre)


def bias_grad(grad_y: Tensor, *, impl: str = "auto") -> Tensor:
    """For a plain projection: grad_y (N, C) summed over rows, in float32 (float64 for float64 input)."""
    if grad_y.dim() != 2:
        raise ValueError(f"bias_grad: grad_y {tuple(grad_y.shape)} must be (rows, columns)")
    return implementation(_chosen("bias_grad", impl, grad_y)).bias_grad(grad_y)


def _chosen(op: str, impl: str, t: Tensor, dtype: torch.dtype | None = None) -> str:
    """The implementation for `impl` and tensor t computed in `dtype` (default t's)."""
    return resolve_impl(impl, t.device, op, lambda: dtype_unsupported_reason(dtype or t.dtype))


def linear_silu(h: Tensor, weight: Tensor, bias: Tensor, *, impl: str = "auto") -> Tensor:
    """silu(h @ weight.T + bias), in the autocast dtype when autocast is on for h's device."""
    if torch.compiler.is_compiling() or not _needs_backward("linear_silu", h, weight, bias):
        return F.silu(F.linear(h, weight, bias))
    dtype = _compute_dtype(h)
    return _Projection.apply(h, weight, bias, dtype, _chosen("linear_silu", impl, h, dtype), True)


def linear(h: Tensor, weight: Tensor, bias: Tensor, *, impl: str = "auto") -> Tensor:
    """h @ weight.T + bias, in the autocast dtype when autocast is on for h's device."""
    if torch.compiler.is_compiling() or not _needs_backward("linear", h, weight, bias):
        return F.linear(h, weight, bias)
    dtype = _compute_dtype(h)
    return _Projection.apply(h, weight, bias, dtype, _chosen("linear", impl, h, dtype), False)


def _needs_backward(op: str, h: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether a call must go through the autograd Function (else there is no backward to fuse);
    raises on shapes the ops do not take."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1] or bias.shape != weight.shape[:1]:
        raise ValueError(f"{op}: h {tuple(h.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}; "
                         "expected (N, D), (C, D), (C,)")
    return torch.is_grad_enabled() and any(t.requires_grad for t in (h, weight, bias))


def _compute_dtype(h: Tensor) -> torch.dtype:
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


class _Projection(torch.autograd.Function):
    """h @ weight.T + bias, then silu if `silu`. Casts are explicit and autocast is off inside, as
    autocast would cast for F.linear."""

    @staticmethod
    def forward(ctx, h, weight, bias, dtype, impl, silu):
        with torch.autocast(h.device.type, enabled=False):
            x, w = h.to(dtype), weight.to(dtype)
            pre = torch.addmm(bias.to(dtype), x, w.t())
            y = F.silu(pre) if silu else pre
        ctx.save_for_backward(x, w, *((pre,) if silu else ()))
        ctx.params = (impl, h.dtype, weight.dtype, bias.dtype)
        return y

    @staticmethod
    @once_differentiable  # the Triton pass inside has no derivative of its own
    def backward(ctx, grad_y):
        x, w, *pre = ctx.saved_tensors
        impl, h_dtype, weight_dtype, bias_dtype = ctx.params
        with torch.autocast(x.device.type, enabled=False):
            if pre:
                grad_pre, grad_bias = silu_backward_bias_grad(grad_y.to(x.dtype), pre[0], impl=impl)
            else:
                grad_pre = grad_y.to(x.dtype)
                grad_bias = bias_grad(grad_pre, impl=impl)
            grad_h = (grad_pre @ w).to(h_dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (grad_pre.t() @ x).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, grad_bias.to(bias_dtype), None, None, None
