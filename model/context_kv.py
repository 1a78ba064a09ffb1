"""A target layer's keys and values with its H/R rows' activations recomputed in backward.

In a run of target layers every layer reads the same H and R rows (x_context) and computes

    kv = silu(W_kv merge(GLN_1(x_context), h_t) + b_kv)        (N, 2 * Hkv * dh)

with h_t the T rows' normalised input. Left to autograd, each layer would keep for backward the
merged normalised input (N, d_model) and the pre-activation (N, 2 * Hkv * dh): about 2 KB per
token at d_model 512 in bfloat16, most of a target layer's activation memory, since x_context
itself is kept once for the whole run. `context_keys_values` keeps only x_context and h_t (in the
compute dtype) and recomputes the GLN, the merge and the projection in backward: one GLN forward,
one merge and one matmul more per target layer, inside one autograd node (no graph is rebuilt,
unlike activation checkpointing, whose host time the host-bound training step could not afford).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mtfm.kernels.group_layer_norm import checked_implementation, implementation

from .token_split import TokenSplit, interleave_rows


def context_keys_values(x_context: Tensor, h_t: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
                        bias: Tensor, split: TokenSplit, *, eps: float, impl: str = "auto") -> Tensor:
    """silu(merge(GLN(x_context), h_t) @ weight.T + bias): (N, out) in the compute dtype (the
    autocast dtype when autocast is on for x_context's device, else x_context's dtype).

    x_context (N - NT, D) and h_t (NT, D) as `split` orders them; norm_weight, norm_bias (G, D)
    the input GLN's affine parameters of the groups `split.context_group` indexes; weight
    (out, D), bias (out,) the K/V projection."""
    chosen = checked_implementation(x_context, split.context_group, norm_weight, norm_bias, impl)
    device = x_context.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_context.dtype
    return _ContextKeysValues.apply(x_context, h_t, norm_weight, norm_bias, weight, bias, split.context_index,
                                    split.target_index, split.context_group, float(eps), chosen, dtype)


def _projection_input(x_context, h_t, norm_weight, norm_bias, context_index, target_index, context_group, eps, impl,
                      dtype) -> Tensor:
    """merge(GLN(x_context), h_t) in `dtype` (h_t already in it)."""
    h_context = implementation(impl).group_layer_norm(x_context, context_group, norm_weight, norm_bias, eps)
    return interleave_rows(context_index, target_index, h_context.to(dtype), h_t)


class _ContextKeysValues(torch.autograd.Function):
    # Casts are explicit and autocast is off inside forward and backward, so that backward
    # recomputes exactly what forward computed whatever autocast state it is called in.

    @staticmethod
    def forward(ctx, x_context, h_t, norm_weight, norm_bias, weight, bias, context_index, target_index,
                context_group, eps, impl, dtype):
        h_t_compute = h_t.to(dtype)
        with torch.autocast(x_context.device.type, enabled=False):
            h = _projection_input(x_context, h_t_compute, norm_weight, norm_bias, context_index, target_index,
                                  context_group, eps, impl, dtype)
            kv = F.silu(torch.addmm(bias.to(dtype), h, weight.to(dtype).t()))
        ctx.save_for_backward(x_context, h_t_compute, norm_weight, norm_bias, weight, bias, context_index,
                              target_index, context_group)
        ctx.params = (eps, impl, dtype, h_t.dtype)
        return kv

    @staticmethod
    @once_differentiable  # the Triton GLN backward inside has no derivative of its own
    def backward(ctx, grad_kv):
        x_context, h_t, norm_weight, norm_bias, weight, bias, context_index, target_index, context_group = \
            ctx.saved_tensors
        eps, impl, dtype, h_t_dtype = ctx.params
        with torch.autocast(x_context.device.type, enabled=False):
            h = _projection_input(x_context, h_t, norm_weight, norm_bias, context_index, target_index, context_group,
                                  eps, impl, dtype)
            w = weight.to(dtype)
            grad_pre = torch.ops.aten.silu_backward(grad_kv.to(dtype), torch.addmm(bias.to(dtype), h, w.t()))
            grad_weight = (grad_pre.t() @ h).to(weight.dtype)
            grad_bias = grad_pre.sum(0).to(bias.dtype)
            grad_h = grad_pre @ w
            grad_context, grad_norm_weight, grad_norm_bias = implementation(impl).group_layer_norm_backward(
                grad_h.index_select(0, context_index).to(x_context.dtype), x_context, context_group, norm_weight, eps)
            grad_t = grad_h.index_select(0, target_index).to(h_t_dtype)
        return (grad_context, grad_t, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias,
                None, None, None, None, None, None)
