"""A target layer's keys and values of the H and R rows, with their activations recomputed in backward.

In a run of target layers every layer reads the same H and R rows (x_context) and computes

    kv_context = silu(W_kv GLN_1(x_context) + b_kv)        (N - NT, 2 * Hkv * dh)

(the T rows' keys and values are computed apart, and split target attention takes both halves).
Left to autograd, each layer would keep for backward the normalised input (N - NT, d_model) and
the pre-activation (N - NT, 2 * Hkv * dh): about 2 KB per token at d_model 512 in bfloat16, most
of a target layer's activation memory, since x_context itself is kept once for the whole run.
`context_keys_values` keeps only x_context and recomputes the GLN and the projection in backward:
one GLN forward and one matmul more per target layer, inside one autograd node (no graph is
rebuilt, unlike activation checkpointing, whose host time the training step could not afford).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mtfm.kernels.group_layer_norm import checked_implementation, implementation


def context_keys_values(x_context: Tensor, context_group: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                        weight: Tensor, bias: Tensor, *, eps: float, impl: str = "auto") -> Tensor:
    """silu(GLN(x_context) @ weight.T + bias): (N - NT, out) in the compute dtype (the autocast
    dtype when autocast is on for x_context's device, else x_context's dtype).

    x_context (N - NT, D) the H and R rows, context_group (N - NT,) their groups, indices into the
    input GLN's affine parameters norm_weight, norm_bias (G, D); weight (out, D), bias (out,) the
    K/V projection."""
    chosen = checked_implementation(x_context, context_group, norm_weight, norm_bias, impl)
    device = x_context.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_context.dtype
    return _ContextKeysValues.apply(x_context, context_group, norm_weight, norm_bias, weight, bias, float(eps), chosen,
                                    dtype)


class _ContextKeysValues(torch.autograd.Function):
    # Casts are explicit and autocast is off inside forward and backward, so that backward
    # recomputes exactly what forward computed whatever autocast state it is called in.

    @staticmethod
    def forward(ctx, x_context, context_group, norm_weight, norm_bias, weight, bias, eps, impl, dtype):
        # The projection's parameters in the compute dtype are kept for backward (0.5-2.4 MB a layer):
        # recasting them there would cost two more launches per layer in a host-bound step.
        w, b = weight.to(dtype), bias.to(dtype)
        with torch.autocast(x_context.device.type, enabled=False):
            h = implementation(impl).group_layer_norm(x_context, context_group, norm_weight, norm_bias, eps).to(dtype)
            kv = F.silu(torch.addmm(b, h, w.t()))
        ctx.save_for_backward(x_context, context_group, norm_weight, norm_bias, w, b)
        ctx.params = (eps, impl, weight.dtype, bias.dtype)
        return kv

    @staticmethod
    @once_differentiable  # the Triton GLN backward inside has no derivative of its own
    def backward(ctx, grad_kv):
        x_context, context_group, norm_weight, norm_bias, w, b = ctx.saved_tensors
        eps, impl, weight_dtype, bias_dtype = ctx.params
        gln = implementation(impl)
        with torch.autocast(x_context.device.type, enabled=False):
            h = gln.group_layer_norm(x_context, context_group, norm_weight, norm_bias, eps).to(w.dtype)
            grad_pre = torch.ops.aten.silu_backward(grad_kv.to(w.dtype), torch.addmm(b, h, w.t()))
            grad_weight = (grad_pre.t() @ h).to(weight_dtype)
            grad_bias = grad_pre.sum(0).to(bias_dtype)
            grad_h = (grad_pre @ w).to(x_context.dtype)
            grad_context, grad_norm_weight, grad_norm_bias = gln.group_layer_norm_backward(
                grad_h, x_context, context_group, norm_weight, eps)
        return grad_context, None, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None, None, None
