"""Public Group LayerNorm op with dispatch: LayerNorm whose affine parameters are chosen per token.

    group_layer_norm(x, group, weight, bias, *, eps=1e-5, impl="auto") -> (N, D)
    group_layer_norm_residual(x, group, weight, bias, *, eps=1e-5, impl="auto") -> (x, (N, D))

x (N, D); group (N,) int64 in [0, G); weight, bias (G, D):
out[i] = (x[i] - mean) / sqrt(var + eps) * weight[group[i]] + bias[group[i]].
Registered as the torch.library op `mtfm::group_layer_norm` with a fake implementation and a
backward op `mtfm::group_layer_norm_backward` (dx, and dweight, dbias summed per group): what
torch.compile traces. Eager calls take a plain autograd Function with the same forward and
backward, which spares the dispatcher's host time.

`group_layer_norm_residual` is the GLN at the head of a residual branch, y = x + f(GLN(x)): it also
returns x (a view), to be the residual add's operand, and its backward adds the gradient that comes
back through that view to the GLN's dx inside the backward kernel, where autograd would sum the two
in a pass of its own (a read of both and a write, per layer). Under torch.compile, which fuses such
sums itself, it is (x, group_layer_norm(x)).
"""

from typing import Callable

import torch
from torch import Tensor

from . import group_layer_norm_reference as reference
from .backends import FLOAT_DTYPES, check_argument, resolve_impl


def implementation(impl: str):
    """The module of implementation `impl` ("triton" or "reference"), whose functions
    `group_layer_norm(x, group, weight, bias, eps, out_dtype=None)` and `group_layer_norm_backward(
    grad_out, x, group, weight, eps, grad_residual=None)` -> (dx, dweight, dbias) are the op's forward
    and backward without autograd: for an autograd Function that runs the op inside its own forward
    and backward; grad_residual, if given, is added to dx before it is rounded to x's dtype.
    `group_layer_norm_stacked` and `group_layer_norm_stacked_backward` are the same for S sets of
    affine parameters (S, G, D) on the same rows, out (S, N, D) and dout likewise: each row
    normalised once, the sets' gradients summed into one dx (the H and R rows of a run of target
    layers, `mtfm.model.context_kv`)."""
    if impl == "triton":
        from . import group_layer_norm_triton

        return group_layer_norm_triton
    return reference


@torch.library.custom_op("mtfm::group_layer_norm", mutates_args=())
def _gln_op(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float, impl: str) -> Tensor:
    return implementation(impl).group_layer_norm(x, group, weight, bias, eps)


@_gln_op.register_fake
def _gln_fake(x, group, weight, bias, eps, impl):
    return torch.empty_like(x)


@torch.library.custom_op("mtfm::group_layer_norm_backward", mutates_args=())
def _gln_backward_op(
    grad_out: Tensor, x: Tensor, group: Tensor, weight: Tensor, eps: float, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(impl).group_layer_norm_backward(grad_out, x, group, weight, eps)


@_gln_backward_op.register_fake
def _gln_backward_fake(grad_out, x, group, weight, eps, impl):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, group, weight, bias, eps, impl = inputs
    ctx.save_for_backward(x, group, weight)
    ctx.params = (eps, impl)


def _backward(ctx, grad_out):
    dx, dweight, dbias = _gln_backward_op(grad_out.contiguous(), *ctx.saved_tensors, *ctx.params)
    return dx, None, dweight, dbias, None, None


_gln_op.register_autograd(_backward, setup_context=_setup_context)


class _GroupLayerNormFunction(torch.autograd.Function):
    """The eager path: the op's forward, saved tensors (x, group, weight; mean and rstd are
    recomputed) and backward, without the dispatcher's Python hops of a torch.library op: host time
    per call 72 -> 37 us forward, 266 -> 177 us forward + backward (bench/host_overhead.py, CPU box;
    the training step is host-bound)."""

    @staticmethod
    def forward(ctx, x, group, weight, bias, eps, impl):
        _setup_context(ctx, (x, group, weight, bias, eps, impl), None)
        return implementation(impl).group_layer_norm(x, group, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_out):
        eps, impl = ctx.params
        dx, dweight, dbias = implementation(impl).group_layer_norm_backward(grad_out.contiguous(),
                                                                            *ctx.saved_tensors, eps)
        return dx, None, dweight, dbias, None, None


class _ResidualGroupLayerNormFunction(torch.autograd.Function):
    """`_GroupLayerNormFunction` that also returns x (autograd makes it a view with this node as its
    grad_fn), whose gradient the backward kernel adds to dx."""

    @staticmethod
    def forward(ctx, x, group, weight, bias, eps, impl):
        _setup_context(ctx, (x, group, weight, bias, eps, impl), None)
        return x, implementation(impl).group_layer_norm(x, group, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_x, grad_out):
        eps, impl = ctx.params
        dx, dweight, dbias = implementation(impl).group_layer_norm_backward(grad_out.contiguous(),
                                                                            *ctx.saved_tensors, eps, grad_x)
        return dx, None, dweight, dbias, None, None


def _check(name: str, ok: bool, found, expected: str | Callable[[], str]) -> None:
    check_argument("group_layer_norm", name, ok, found, expected)


def group_layer_norm(
    x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, *, eps: float = 1e-5, impl: str = "auto"
) -> Tensor:
    """LayerNorm of each row of x with the affine parameters of its group. Returns (N, D) in x's dtype."""
    chosen = checked_implementation(x, group, weight, bias, impl)
    op = _gln_op if torch.compiler.is_compiling() else _GroupLayerNormFunction.apply
    return op(x, group, weight, bias, float(eps), chosen)


def group_layer_norm_residual(
    x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, *, eps: float = 1e-5, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """(x, group_layer_norm(x, ...)) for a residual branch: x's gradient through the first output is
    added to the GLN's inside its backward. The first output is a view of x under autograd (x itself
    under torch.compile): not for in-place changes."""
    chosen = checked_implementation(x, group, weight, bias, impl)
    if torch.compiler.is_compiling():
        return x, _gln_op(x, group, weight, bias, float(eps), chosen)
    return _ResidualGroupLayerNormFunction.apply(x, group, weight, bias, float(eps), chosen)


def checked_implementation(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, impl: str = "auto") -> str:
    """Checks the inputs of `group_layer_norm` and returns the implementation it runs for them."""
    _check("x.shape", x.dim() == 2, tuple(x.shape), "2 dims (tokens, features)")
    _check("x.dtype", x.dtype in FLOAT_DTYPES, x.dtype, "float16, bfloat16, float32 or float64")
    _check("group", group.dim() == 1 and group.shape[0] == x.shape[0] and group.dtype == torch.int64,
           lambda: f"{tuple(group.shape)} {group.dtype}", lambda: f"({x.shape[0]},) torch.int64")
    _check("weight.shape", weight.dim() == 2 and weight.shape[1] == x.shape[1], tuple(weight.shape),
           lambda: f"(G, {x.shape[1]})")
    _check("bias", bias.shape == weight.shape and bias.dtype == weight.dtype,
           lambda: f"{tuple(bias.shape)} {bias.dtype}", lambda: f"{tuple(weight.shape)} {weight.dtype} like weight")
    for name, t in (("group", group), ("weight", weight), ("bias", bias)):
        _check(f"{name}.device", t.device == x.device, t.device, lambda: f"{x.device} like x")
    def unsupported() -> str | None:
        from .group_layer_norm_triton import unsupported_reason

        return unsupported_reason(x)

    return resolve_impl(impl, x.device, "group_layer_norm", unsupported)
