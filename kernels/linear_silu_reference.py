"""PyTorch reference of the projections' bias gradients: the specification.

For y = silu(pre), pre = h @ W.T + b (pre (N, C)), given dy (N, C):
    dpre = dy * s * (1 + pre * (1 - s)),   s = sigmoid(pre)
    db   = sum over rows of dpre            (float32, summed before dpre is rounded to pre's dtype)
For a plain projection (y = pre), db is the sum over rows of dy, in float32.
Arithmetic in float32 (float64 stays float64); dpre takes pre's dtype.
"""

import torch
from torch import Tensor


def silu_backward_bias_grad(grad_y: Tensor, pre: Tensor, grad_pre: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dpre (N, C) in pre's dtype, written into grad_pre if given (it may be pre itself), db (C,))."""
    z = pre.to(torch.promote_types(pre.dtype, torch.float32))
    s = torch.sigmoid(z)
    dpre = grad_y.to(z.dtype) * s * (1 + z * (1 - s))
    grad_bias = dpre.sum(0)
    if grad_pre is None:
        return dpre.to(pre.dtype), grad_bias
    return grad_pre.copy_(dpre), grad_bias


def bias_grad(grad_y: Tensor) -> Tensor:
    """db (C,) of a plain projection pre = h @ W.T + b: dy (N, C) summed over rows in float32 (float64 stays)."""
    return grad_y.to(torch.promote_types(grad_y.dtype, torch.float32)).sum(0)
