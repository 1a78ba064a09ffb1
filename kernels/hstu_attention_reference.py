"""PyTorch reference of jagged HSTU attention with the MTFM dynamic mask: the specification.

Shapes (packed jagged; user b owns key rows offsets[b]:offsets[b+1], L_b of them):
    q (NQ, Hq, D), k (N, Hkv, D), v (N, Hkv, Dv), Hq % Hkv == 0, query head h reads kv head
    h // (Hq // Hkv); kind (N,) int8 TokenKind; ts (N,) int64.
Queries: user b's queries are its LAST M_b = q_offsets[b+1] - q_offsets[b] tokens, rows
q_offsets[b]:q_offsets[b+1] of q. Full attention has q_offsets = offsets (every token is a
query); target attention has M_b = the number of T-tokens.

    S = alpha * Q K^T,   P = silu(S) * M / norm,   out = P V
with M the dynamic mask (mask.py). `norm` is a constant so a T-token's output does not
depend on how many other T-tokens there are. Arithmetic is in float32 (float64 inputs stay
float64); outputs take the input dtype. One user at a time: memory O(max L_b^2 * Hq).

Split target attention (`jagged_split_target_attention`) takes a user's H and R keys and its T
keys from two tensors; it is the merged axis's target attention, and is computed as such here.

Backward, with dO the output gradient (GQA: dK, dV summed over the group's query heads):
    dV = P^T dO,   dS = (dO V^T) * M / norm * silu'(S) * alpha,   dQ = dS K,   dK = dS^T Q
"""

import torch
from torch import Tensor

from .mask import TokenKind, dynamic_mask_block


def _silu_grad(x: Tensor) -> Tensor:
    sig = torch.sigmoid(x)
    return sig * (1 + x * (1 - sig))


def _users(offsets: Tensor, q_offsets: Tensor):
    """(key start, key end, query start, query end) per user, skipping users with no query."""
    bounds, q_bounds = offsets.tolist(), q_offsets.tolist()
    for b in range(len(bounds) - 1):
        if q_bounds[b + 1] > q_bounds[b]:
            yield bounds[b], bounds[b + 1], q_bounds[b], q_bounds[b + 1]


def _user_tensors(q, k, v, kind, ts, start, end, q_start, q_end):
    """One user's queries, keys and values (kv heads repeated per query head) and mask."""
    compute = torch.promote_types(q.dtype, torch.float32)
    rep = q.shape[1] // k.shape[1]
    length, m = end - start, q_end - q_start
    qb = q[q_start:q_end].to(compute)
    kb = k[start:end].to(compute).repeat_interleave(rep, dim=1)
    vb = v[start:end].to(compute).repeat_interleave(rep, dim=1)
    positions = torch.arange(length - m, length, device=q.device)
    mask = dynamic_mask_block(kind[start:end], ts[start:end], ts[start:end][positions], positions)
    return qb, kb, vb, mask.to(compute)


def jagged_hstu_attention(q, k, v, offsets, q_offsets, kind, ts, alpha: float, norm: float) -> Tensor:
    """Forward; differentiable by autograd (it is plain PyTorch)."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    for start, end, q_start, q_end in _users(offsets, q_offsets):
        qb, kb, vb, mask = _user_tensors(q, k, v, kind, ts, start, end, q_start, q_end)
        scores = alpha * torch.einsum("mhd,lhd->hml", qb, kb)
        p = torch.nn.functional.silu(scores) * mask / norm
        out[q_start:q_end] = torch.einsum("hml,lhd->mhd", p, vb).to(out.dtype)
    return out


def jagged_hstu_attention_backward(
    grad_out, q, k, v, offsets, q_offsets, kind, ts, alpha: float, norm: float, grads=None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of jagged_hstu_attention, written out (the formulas in the docstring); copied
    into `grads` if given."""
    if grads is not None:
        return _copied(grads, jagged_hstu_attention_backward(grad_out, q, k, v, offsets, q_offsets, kind, ts, alpha,
                                                             norm))
    compute = torch.promote_types(q.dtype, torch.float32)
    hkv, rep = k.shape[1], q.shape[1] // k.shape[1]
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute, device=v.device)
    for start, end, q_start, q_end in _users(offsets, q_offsets):
        qb, kb, vb, mask = _user_tensors(q, k, v, kind, ts, start, end, q_start, q_end)
        do = grad_out[q_start:q_end].to(compute)
        scores = alpha * torch.einsum("mhd,lhd->hml", qb, kb)
        p = torch.nn.functional.silu(scores) * mask / norm
        dp = torch.einsum("mhd,lhd->hml", do, vb)
        ds = dp * mask / norm * _silu_grad(scores) * alpha
        dq[q_start:q_end] = torch.einsum("hml,lhd->mhd", ds, kb).to(dq.dtype)
        length = end - start
        dk_heads = torch.einsum("hml,mhd->lhd", ds, qb)
        dv_heads = torch.einsum("hml,mhd->lhd", p, do)
        dk[start:end] = dk_heads.reshape(length, hkv, rep, -1).sum(2)
        dv[start:end] = dv_heads.reshape(length, hkv, rep, -1).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _merged_order(context_offsets: Tensor, target_offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the merged key axis (per user: its context rows, then its T rows) that hold the
    context rows and the T rows, in their own orders."""
    c_bounds, t_bounds = context_offsets.tolist(), target_offsets.tolist()
    context_rows, target_rows, start = [], [], 0
    for b in range(len(c_bounds) - 1):
        n_c, n_t = c_bounds[b + 1] - c_bounds[b], t_bounds[b + 1] - t_bounds[b]
        context_rows += range(start, start + n_c)
        target_rows += range(start + n_c, start + n_c + n_t)
        start += n_c + n_t
    return tuple(torch.tensor(rows, dtype=torch.int64, device=context_offsets.device)
                 for rows in (context_rows, target_rows))


def _merge(context: Tensor, target: Tensor, context_rows: Tensor, target_rows: Tensor) -> Tensor:
    merged = context.new_empty((context.shape[0] + target.shape[0],) + context.shape[1:])
    merged[context_rows] = context
    merged[target_rows] = target
    return merged


def _merged_inputs(k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
                   target_ts):
    context_rows, target_rows = _merged_order(context_offsets, target_offsets)
    target_kind = torch.full_like(target_ts, int(TokenKind.T), dtype=context_kind.dtype)
    merged = [_merge(c, t, context_rows, target_rows) for c, t in
              ((k_context, k_t), (v_context, v_t), (context_kind, target_kind), (context_ts, target_ts))]
    return (*merged, context_offsets + target_offsets, context_rows, target_rows)


def jagged_split_target_attention(q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind,
                                  context_ts, target_ts, alpha: float, norm: float) -> Tensor:
    """Target attention with each user's H and R keys in k_context and its T keys in k_t (row for
    row with q_t): the merged key axis's target attention, by definition."""
    k, v, kind, ts, offsets, _, _ = _merged_inputs(k_context, v_context, k_t, v_t, context_offsets, target_offsets,
                                                   context_kind, context_ts, target_ts)
    return jagged_hstu_attention(q_t, k, v, offsets, target_offsets, kind, ts, alpha, norm)


def jagged_split_target_attention_backward(grad_out, q_t, k_context, v_context, k_t, v_t, context_offsets,
                                           target_offsets, context_kind, context_ts, target_ts, alpha: float,
                                           norm: float, grads=None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq_t, dk_context, dv_context, dk_t, dv_t): the merged backward's rows, split; copied into
    `grads` if given."""
    if grads is not None:
        return _copied(grads, jagged_split_target_attention_backward(
            grad_out, q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
            target_ts, alpha, norm))
    k, v, kind, ts, offsets, context_rows, target_rows = _merged_inputs(
        k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts, target_ts)
    dq, dk, dv = jagged_hstu_attention_backward(grad_out, q_t, k, v, offsets, target_offsets, kind, ts, alpha, norm)
    return dq, dk[context_rows], dv[context_rows], dk[target_rows], dv[target_rows]


def gate(out: Tensor, gate: Tensor) -> Tensor:
    """The gated output out * gate (the HSTU layer's A * U)."""
    return out * gate


def gate_backward(grad: Tensor, out: Tensor, gate: Tensor, grad_gate: Tensor) -> Tensor:
    """For gated = out * gate: writes grad * out into grad_gate and returns grad * gate."""
    torch.mul(grad, out, out=grad_gate)
    return grad * gate


def _copied(grads, results) -> tuple[Tensor, ...]:
    for grad, result in zip(grads, results, strict=True):
        grad.copy_(result)
    return tuple(grads)
