"""A run of target layers' keys and values of the H and R rows, with their activations recomputed in backward.

In a run of L target layers every layer reads the same H and R rows (x_context) and computes

    kv_context[l] = silu(W_kv[l] GLN_1[l](x_context) + b_kv[l])        (N - NT, 2 * Hkv * dh)

(the T rows' keys and values are computed apart, and split target attention takes both halves).
The L layers' GLNs normalise the same rows, so `context_keys_values` computes the run's keys and
values at once: each row's statistics once for the L sets of GLN parameters (the stacked GLN
kernels), the projections into one buffer, batched matmuls in backward, and there one GLN
backward with the L layers' gradients summed inside the kernel, where each layer ran its own GLN
and autograd summed their dx.
Left to autograd, each layer would also keep for backward the normalised input (N - NT, d_model)
and the pre-activation (N - NT, 2 * Hkv * dh): about 2 KB per token and layer at d_model 512 in
bfloat16, most of a target layer's activation memory, since x_context itself is kept once for the
whole run. By default the Function keeps only x_context and recomputes the GLN and the
projection in backward, inside one autograd node (no graph is rebuilt, unlike activation
checkpointing, whose host time the training step could not afford); `recompute=False` keeps them.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mtfm.kernels.group_layer_norm import checked_implementation, implementation
from mtfm.kernels.linear_silu import silu_backward_bias_grad


def context_keys_values(x_context: Tensor, context_group: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                        weight: Tensor, bias: Tensor, *, eps: float, impl: str = "auto",
                        recompute: bool = True) -> tuple[Tensor, ...]:
    """silu(GLN_l(x_context) @ weight[l].T + bias[l]) for the L layers l of a run: L tensors (N - NT, out)
    in the compute dtype (the autocast dtype when autocast is on for x_context's device, else
    x_context's dtype), views into one buffer.

    x_context (N - NT, D) the H and R rows, context_group (N - NT,) their groups, indices into the
    input GLNs' affine parameters norm_weight, norm_bias (L, G, D); weight (L, out, D), bias (L, out)
    the K/V projections. recompute=False keeps the normalised input and the pre-activation for
    backward instead (memory for the GLN and projection recomputed)."""
    chosen = checked_implementation(x_context, context_group, norm_weight[0], norm_bias[0], impl)
    device = x_context.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_context.dtype
    return _ContextKeysValues.apply(x_context, context_group, norm_weight, norm_bias, weight, bias, float(eps), chosen,
                                    dtype, recompute)


class _ContextKeysValues(torch.autograd.Function):
    # Casts are explicit and autocast is off inside forward and backward, so that backward
    # recomputes exactly what forward computed whatever autocast state it is called in.

    @staticmethod
    def forward(ctx, x_context, context_group, norm_weight, norm_bias, weight, bias, eps, impl, dtype, recompute):
        # The projections' parameters in the compute dtype are kept for backward (0.5-2.4 MB a layer):
        # recasting them there would cost two more launches per run in a host-bound step.
        w, b = weight.to(dtype), bias.to(dtype)
        with torch.autocast(x_context.device.type, enabled=False):
            h = implementation(impl).group_layer_norm_stacked(x_context, context_group, norm_weight, norm_bias, eps,
                                                              dtype)
            pre = _projections(h, w, b)
            kv = torch.nn.functional.silu(pre, inplace=recompute)
        kept = () if recompute else (h, pre)
        ctx.save_for_backward(x_context, context_group, norm_weight, norm_bias, w, b, *kept)
        ctx.params = (eps, impl, weight.dtype, bias.dtype)
        return kv.unbind(0)

    @staticmethod
    @once_differentiable  # the Triton GLN backward inside has no derivative of its own
    def backward(ctx, *grad_kv):
        x_context, context_group, norm_weight, norm_bias, w, b, *kept = ctx.saved_tensors
        eps, impl, weight_dtype, bias_dtype = ctx.params
        gln = implementation(impl)
        with torch.autocast(x_context.device.type, enabled=False):
            if kept:
                h, pre = kept
                grad_pre = torch.empty_like(pre)
            else:
                h = gln.group_layer_norm_stacked(x_context, context_group, norm_weight, norm_bias, eps, w.dtype)
                pre = grad_pre = _projections(h, w, b)  # the pre-activation, then in place its gradient
            grad_bias = torch.stack([
                silu_backward_bias_grad(grad.to(w.dtype), pre[layer], grad_pre[layer], impl=impl)[1]
                for layer, grad in enumerate(grad_kv)]).to(bias_dtype)
            grad_weight = torch.bmm(grad_pre.transpose(1, 2), h).to(weight_dtype)
            del h
            grad_h = torch.bmm(grad_pre, w)
            del grad_pre, pre
            grad_context, grad_norm_weight, grad_norm_bias = gln.group_layer_norm_stacked_backward(
                grad_h, x_context, context_group, norm_weight, eps)
        return grad_context, None, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None, None, None, None


def _projections(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """h[l] @ w[l].T + b[l] for each layer l, (L, N - NT, out): one matmul per layer into one buffer,
    the bias added in the matmul's epilogue (a `baddbmm`, which first writes the broadcast bias into
    its whole output, measured the same per training step on the H200)."""
    out = h.new_empty(h.shape[:2] + w.shape[1:2])
    for layer in range(h.shape[0]):
        torch.addmm(b[layer], h[layer], w[layer].t(), out=out[layer])
    return out
