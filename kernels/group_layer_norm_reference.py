"""PyTorch reference of Group LayerNorm: the specification.

x (N, D), group (N,) int64 in [0, G), weight and bias (G, D):
    xhat[i] = (x[i] - mean(x[i])) * rstd[i],   rstd[i] = 1 / sqrt(var(x[i]) + eps)  (biased var)
    out[i]  = xhat[i] * weight[group[i]] + bias[group[i]]
Backward, with g[i] = dout[i] * weight[group[i]]:
    dx[i] = rstd[i] * (g[i] - mean(g[i]) - xhat[i] * mean(g[i] * xhat[i]))
    dweight[c] = sum_{i: group[i] = c} dout[i] * xhat[i],   dbias[c] = sum_{i: group[i] = c} dout[i]
Arithmetic in float32 (float64 stays float64); gradients take their input's dtype, the output x's
or the dtype asked for (the model asks for the autocast dtype: the next matmul's input).

Stacked: S sets of affine parameters, weight and bias (S, G, D), on the same rows: out (S, N, D),
out[s, i] = xhat[i] * weight[s, group[i]] + bias[s, group[i]], each row normalised once; backward
takes dout (S, N, D), with g[i] = sum_s dout[s, i] * weight[s, group[i]] in the dx formula above
and dweight[s], dbias[s] as above from dout[s]. S = 1 is the plain op.
"""

import torch
from torch import Tensor


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    centered = xf - xf.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
    return centered * rstd, rstd


def _affine(xhat: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    return (xhat * weight.to(xhat.dtype) + bias.to(xhat.dtype)).to(dtype)


def group_layer_norm(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """Forward, in out_dtype (default x's); differentiable by autograd (it is plain PyTorch)."""
    xhat, _ = _normalize(x, eps)
    return _affine(xhat, weight[group], bias[group], out_dtype or x.dtype)


def group_layer_norm_backward(
    grad_out: Tensor, x: Tensor, group: Tensor, weight: Tensor, eps: float, grad_residual: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias), written out (the formulas in the docstring); grad_residual, if given, is
    added to dx before it is rounded to x's dtype (the gradient of x's other use, a residual add)."""
    dx, dweight, dbias = _stacked_backward(grad_out[None], x, group, weight[None], eps, grad_residual)
    return dx, dweight[0], dbias[0]


def group_layer_norm_stacked(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float,
                             out_dtype: torch.dtype | None = None) -> Tensor:
    """(S, N, D) for weight and bias (S, G, D), in out_dtype (default x's); differentiable by autograd."""
    xhat, _ = _normalize(x, eps)
    return _affine(xhat, weight[:, group], bias[:, group], out_dtype or x.dtype)


def group_layer_norm_stacked_backward(grad_out: Tensor, x: Tensor, group: Tensor, weight: Tensor,
                                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (N, D), dweight (S, G, D), dbias (S, G, D)) for grad_out (S, N, D)."""
    return _stacked_backward(grad_out, x, group, weight, eps, None)


def _stacked_backward(grad_out: Tensor, x: Tensor, group: Tensor, weight: Tensor, eps: float,
                      grad_residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    xhat, rstd = _normalize(x, eps)
    dy = grad_out.to(xhat.dtype)
    g = (dy * weight[:, group].to(xhat.dtype)).sum(0)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_residual is not None:
        dx = dx + grad_residual.to(dx.dtype)
    dweight = torch.zeros(weight.shape, dtype=xhat.dtype, device=x.device).index_add_(1, group, dy * xhat)
    dbias = torch.zeros(weight.shape, dtype=xhat.dtype, device=x.device).index_add_(1, group, dy)
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias.to(weight.dtype)
