"""PyTorch reference of Group LayerNorm: the specification.

x (N, D), group (N,) int64 in [0, G), weight and bias (G, D):
    xhat[i] = (x[i] - mean(x[i])) * rstd[i],   rstd[i] = 1 / sqrt(var(x[i]) + eps)  (biased var)
    out[i]  = xhat[i] * weight[group[i]] + bias[group[i]]
Backward, with g[i] = dout[i] * weight[group[i]]:
    dx[i] = rstd[i] * (g[i] - mean(g[i]) - xhat[i] * mean(g[i] * xhat[i]))
    dweight[c] = sum_{i: group[i] = c} dout[i] * xhat[i],   dbias[c] = sum_{i: group[i] = c} dout[i]
Arithmetic in float32 (float64 stays float64); outputs and gradients take their input's dtype.
"""

import torch
from torch import Tensor


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    centered = xf - xf.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
    return centered * rstd, rstd


def group_layer_norm(x: Tensor, group: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Forward; differentiable by autograd (it is plain PyTorch)."""
    xhat, _ = _normalize(x, eps)
    return (xhat * weight[group].to(xhat.dtype) + bias[group].to(xhat.dtype)).to(x.dtype)


def group_layer_norm_backward(
    grad_out: Tensor, x: Tensor, group: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias), written out (the formulas in the docstring)."""
    xhat, rstd = _normalize(x, eps)
    dy = grad_out.to(xhat.dtype)
    g = dy * weight[group].to(xhat.dtype)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = torch.zeros(weight.shape, dtype=xhat.dtype, device=x.device).index_add_(0, group, dy * xhat)
    dbias = torch.zeros(weight.shape, dtype=xhat.dtype, device=x.device).index_add_(0, group, dy)
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias.to(weight.dtype)
