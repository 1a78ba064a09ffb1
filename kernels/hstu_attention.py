"""Public HSTU attention ops (full and target) over packed jagged sequences, with dispatch.

    hstu_attention(q, k, v, offsets, kind, ts, *, alpha, norm, impl="auto") -> (N, Hq, Dv)
    hstu_target_attention(q_t, k, v, offsets, kind, ts, target_offsets, *, alpha, norm,
                          impl="auto") -> (NT, Hq, Dv)

out[i, h] = sum over keys j of i's user visible to i (mask.py) of
            silu(alpha * <q[i, h], k[j, g]>) / norm * v[j, g],   g = h // (Hq // Hkv).
q (N, Hq, D), k (N, Hkv, D), v (N, Hkv, Dv); offsets (B+1,) int64; kind (N,) int8 TokenKind;
ts (N,) int64. Target attention takes only the T-tokens as queries: q_t (NT, Hq, D) with
target_offsets (B+1,) int64; user b's queries are its last target_offsets[b+1] -
target_offsets[b] tokens (its T-tokens), and the output equals those rows of hstu_attention.

    hstu_split_target_attention(q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets,
                                context_kind, context_ts, target_ts, *, alpha, norm, impl="auto")

is target attention with each user's keys in two tensors: its H and R rows in k_context (rows
context_offsets[b]:context_offsets[b+1], with their kind and ts) and its T rows in k_t, row for
row with q_t. It equals hstu_target_attention on the merged axis (per user: context rows, then T
rows), without that axis being built: a run of target layers keeps its H and R rows apart.

Each takes an optional `gate` shaped like its output and then returns out * gate (the HSTU
layer's A * U). Inside the op, the eager backward can lay the gradients of q, k, v and the gate
out as the blocks of one buffer when they are the column blocks of one (a layer's projection
output, split by `mtfm.model.column_blocks`), so that the split's backward concatenates nothing.

The kernels rely on the token order of DESIGN.md (per user: H, then R sorted by ts, then T);
it is not checked here because checking needs the data on the host.

Full and target attention go through one torch.library op, `mtfm::hstu_attention`, whose
queries are the last M_b tokens of each user (full attention: M_b = L_b), with a fake
implementation and a backward op `mtfm::hstu_attention_backward`, so autograd and torch.compile
see one opaque op; split target attention is `mtfm::hstu_split_target_attention`, with
`mtfm::hstu_split_target_attention_backward`. Eager calls take plain autograd Functions with the
same forwards and backwards, which spares the dispatcher's host time.
"""

from typing import Callable

import torch
from torch import Tensor

from . import hstu_attention_reference as reference
from .backends import FLOAT_DTYPES, check_argument, resolve_impl


def _implementation(impl: str):
    if impl == "triton":
        from . import hstu_attention_triton

        return hstu_attention_triton
    return reference


@torch.library.custom_op("mtfm::hstu_attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, q_offsets: Tensor, kind: Tensor, ts: Tensor,
    alpha: float, norm: float, impl: str,
) -> Tensor:
    return _implementation(impl).jagged_hstu_attention(q, k, v, offsets, q_offsets, kind, ts, alpha, norm)


@_attention_op.register_fake
def _attention_fake(q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("mtfm::hstu_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, q_offsets: Tensor,
    kind: Tensor, ts: Tensor, alpha: float, norm: float, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _implementation(impl).jagged_hstu_attention_backward(
        grad_out, q, k, v, offsets, q_offsets, kind, ts, alpha, norm
    )


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl = inputs
    ctx.save_for_backward(q, k, v, offsets, q_offsets, kind, ts)
    ctx.params = (alpha, norm, impl)


def _backward(ctx, grad_out):
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), *ctx.saved_tensors, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """The eager path: the op's forward and backward without the dispatcher's Python hops of a
    torch.library op (the same saving as for group_layer_norm: bench/host_overhead.py), with the
    gate inside and the gradients in shared buffers (`_shared_gradients`)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl, gate):
        out = _implementation(impl).jagged_hstu_attention(q, k, v, offsets, q_offsets, kind, ts, alpha, norm)
        return _save_gated(ctx, (q, k, v), (offsets, q_offsets, kind, ts), (alpha, norm, impl), out, gate)

    @staticmethod
    def backward(ctx, grad_out):
        grad_out, inputs, meta, grads, grad_gate = _gated_backward(ctx, grad_out, _AttentionFunction)
        alpha, norm, impl = ctx.params
        grads = _implementation(impl).jagged_hstu_attention_backward(grad_out, *inputs, *meta, alpha, norm, grads=grads)
        return (*grads, None, None, None, None, None, None, None, grad_gate)


def _save_gated(ctx, inputs: tuple, meta: tuple, params: tuple, out: Tensor, gate: Tensor | None) -> Tensor:
    """Saves what an eager backward needs (the attention output too when gated); returns out or out * gate."""
    ctx.params, ctx.counts, ctx.gated = params, (len(inputs), len(meta)), gate is not None
    ctx.save_for_backward(*inputs, *meta, *((out, gate) if ctx.gated else ()))
    return _implementation(params[2]).gate(out, gate) if ctx.gated else out


def _gated_backward(ctx, grad: Tensor, function) -> tuple[Tensor, tuple, tuple, list[Tensor] | None, Tensor | None]:
    """(the attention output's gradient, the saved inputs, their metadata, empty gradients for the
    inputs from `_shared_gradients` or None, the gate's gradient or None). A backward that is itself
    differentiated (create_graph) shares nothing, and takes the ungated output from `function` run
    again, so that the gate's gradient carries its dependence on q, k and v."""
    saved, (num_inputs, num_meta) = ctx.saved_tensors, ctx.counts
    inputs, meta = saved[:num_inputs], saved[num_inputs:num_inputs + num_meta]
    if torch.is_grad_enabled():
        if not ctx.gated:
            return grad.contiguous(), inputs, meta, None, None
        gate = saved[-1]
        out = function.apply(*inputs, *meta, *ctx.params, None)
        return (grad * gate).contiguous(), inputs, meta, None, grad * out
    if not ctx.gated:
        return grad.contiguous(), inputs, meta, _shared_gradients(inputs), None
    out, gate = saved[num_inputs + num_meta:]
    *grads, grad_gate = _shared_gradients(inputs + (gate,))
    grad = _implementation(ctx.params[2]).gate_backward(grad, out, gate, grad_gate)
    return grad.contiguous(), inputs, meta, grads, grad_gate


def _shared_gradients(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """Empty gradients shaped like `tensors`, (rows, heads, dim) each. Tensors that are the column
    blocks of one row-major buffer and tile its rows exactly (a layer's Q, U, K and V: views into
    its projection's output) get views into one new buffer laid out like that one, which
    `mtfm.model.column_blocks` then hands on whole as the projection's gradient; others get
    contiguous tensors of their own."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.dim() == 3 and t.shape[0] > 0 and t.stride(2) == 1 and t.stride(1) == t.shape[2]:
            groups.setdefault((t.untyped_storage().data_ptr(), t.shape[0], t.stride(0), t.dtype), []).append(i)
    grads: list[Tensor | None] = [None] * len(tensors)
    for (_, rows, width, _), members in groups.items():
        members.sort(key=lambda i: tensors[i].storage_offset())
        first = end = tensors[members[0]].storage_offset()
        for i in members:
            if tensors[i].storage_offset() != end:
                break
            end += tensors[i].shape[1] * tensors[i].shape[2]
        else:
            if end - first == width:
                buffer = tensors[members[0]].new_empty(rows, width)
                for i in members:
                    t = tensors[i]
                    grads[i] = buffer.as_strided(t.shape, t.stride(), t.storage_offset() - first)
    return [t.new_empty(t.shape) if g is None else g for g, t in zip(grads, tensors)]


@torch.library.custom_op("mtfm::hstu_split_target_attention", mutates_args=())
def _split_op(
    q_t: Tensor, k_context: Tensor, v_context: Tensor, k_t: Tensor, v_t: Tensor, context_offsets: Tensor,
    target_offsets: Tensor, context_kind: Tensor, context_ts: Tensor, target_ts: Tensor, alpha: float, norm: float,
    impl: str,
) -> Tensor:
    return _implementation(impl).jagged_split_target_attention(
        q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts, target_ts,
        alpha, norm)


@_split_op.register_fake
def _split_fake(q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
                target_ts, alpha, norm, impl):
    return q_t.new_empty(q_t.shape[0], q_t.shape[1], v_context.shape[2])


@torch.library.custom_op("mtfm::hstu_split_target_attention_backward", mutates_args=())
def _split_backward_op(
    grad_out: Tensor, q_t: Tensor, k_context: Tensor, v_context: Tensor, k_t: Tensor, v_t: Tensor,
    context_offsets: Tensor, target_offsets: Tensor, context_kind: Tensor, context_ts: Tensor, target_ts: Tensor,
    alpha: float, norm: float, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _implementation(impl).jagged_split_target_attention_backward(
        grad_out, q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
        target_ts, alpha, norm)


@_split_backward_op.register_fake
def _split_backward_fake(grad_out, q_t, k_context, v_context, k_t, v_t, *rest):
    return tuple(t.new_empty(t.shape) for t in (q_t, k_context, v_context, k_t, v_t))


def _split_setup_context(ctx, inputs, output):
    *tensors, alpha, norm, impl = inputs
    ctx.save_for_backward(*tensors)
    ctx.params = (alpha, norm, impl)


def _split_backward(ctx, grad_out):
    grads = _split_backward_op(grad_out.contiguous(), *ctx.saved_tensors, *ctx.params)
    return (*grads, None, None, None, None, None, None, None, None)


_split_op.register_autograd(_split_backward, setup_context=_split_setup_context)


class _SplitAttentionFunction(torch.autograd.Function):
    """The eager path of the split op, as `_AttentionFunction` is of the merged one."""

    @staticmethod
    def forward(ctx, q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
                target_ts, alpha, norm, impl, gate):
        inputs, meta = (q_t, k_context, v_context, k_t, v_t), (context_offsets, target_offsets, context_kind,
                                                                context_ts, target_ts)
        out = _implementation(impl).jagged_split_target_attention(*inputs, *meta, alpha, norm)
        return _save_gated(ctx, inputs, meta, (alpha, norm, impl), out, gate)

    @staticmethod
    def backward(ctx, grad_out):
        grad_out, inputs, meta, grads, grad_gate = _gated_backward(ctx, grad_out, _SplitAttentionFunction)
        alpha, norm, impl = ctx.params
        grads = _implementation(impl).jagged_split_target_attention_backward(grad_out, *inputs, *meta, alpha, norm,
                                                                             grads=grads)
        return (*grads, None, None, None, None, None, None, None, None, grad_gate)


def _check(name: str, ok: bool, found, expected: str | Callable[[], str]) -> None:
    check_argument("hstu attention", name, ok, found, expected)


_MERGED_NAMES = ("q", "k", "v", "offsets", "offsets", "kind", "ts")


def _check_inputs(q, k, v, offsets, q_offsets, kind, ts, names: tuple[str, ...]) -> None:
    """names: what the caller calls each of q, k, v, offsets, q_offsets, kind, ts (for the errors)."""
    q_name, k_name, v_name, offsets_name, q_offsets_name, kind_name, ts_name = names
    for name, t in ((q_name, q), (k_name, k), (v_name, v)):
        _check(f"{name}.shape", t.dim() == 3, tuple(t.shape), "3 dims (tokens, heads, head_dim)")
        _check(f"{name}.dtype", t.dtype in FLOAT_DTYPES, t.dtype, "float16, bfloat16, float32 or float64")
    n = k.shape[0]
    _check(f"{v_name}.shape", v.shape[:2] == k.shape[:2], tuple(v.shape),
           lambda: f"({n}, {k.shape[1]}, Dv) like {k_name}")
    _check(f"{k_name}.shape[1] (kv heads)", k.shape[1] >= 1, k.shape[1], "at least 1")
    _check(f"{q_name}.shape[1] (query heads)", q.shape[1] % k.shape[1] == 0, q.shape[1],
           lambda: f"a multiple of {k_name}'s {k.shape[1]} kv heads")
    _check(f"{q_name}.shape[2] (head dim)", q.shape[2] == k.shape[2], q.shape[2],
           lambda: f"{k_name}'s head dim {k.shape[2]}")
    _check(f"{k_name}.dtype and {v_name}.dtype", k.dtype == q.dtype and v.dtype == q.dtype, (k.dtype, v.dtype),
           lambda: f"{q.dtype} like {q_name}")
    for name, t, dtype in ((offsets_name, offsets, torch.int64), (q_offsets_name, q_offsets, torch.int64),
                           (kind_name, kind, torch.int8), (ts_name, ts, torch.int64)):
        _check(f"{name}.dtype", t.dtype == dtype, t.dtype, str(dtype))
        _check(f"{name}.shape", t.dim() == 1, tuple(t.shape), "1 dim")
    _check(f"{kind_name}.shape", kind.shape[0] == n, tuple(kind.shape), lambda: f"({n},) one per key row")
    _check(f"{ts_name}.shape", ts.shape[0] == n, tuple(ts.shape), lambda: f"({n},) one per key row")
    _check(f"{q_offsets_name}.shape", q_offsets.shape == offsets.shape, tuple(q_offsets.shape),
           lambda: f"{tuple(offsets.shape)} like {offsets_name}")
    for name, t in ((k_name, k), (v_name, v), (offsets_name, offsets), (q_offsets_name, q_offsets),
                    (kind_name, kind), (ts_name, ts)):
        _check(f"{name}.device", t.device == q.device, t.device, lambda: f"{q.device} like {q_name}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        # The rows the offsets index must exist (the kernels would read past them). Checked on the
        # CPU only: on a GPU it would cost a host sync per call.
        for name, t, rows, rows_name in ((offsets_name, offsets, n, k_name),
                                         (q_offsets_name, q_offsets, q.shape[0], q_name)):
            _check(name, t.numel() >= 1 and int(t[0]) == 0 and bool((t.diff() >= 0).all()) and int(t[-1]) <= rows,
                   lambda t=t: f"from {int(t[0])} to {int(t[-1])}" + ("" if bool((t.diff() >= 0).all())
                                                                      else ", decreasing somewhere"),
                   lambda rows=rows, rows_name=rows_name: f"non-decreasing from 0 to at most {rows}, the rows of "
                                                          f"{rows_name}")


def _dispatch(q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl, names, gate):
    _check_inputs(q, k, v, offsets, q_offsets, kind, ts, names)
    _check_gate(gate, q, v, names[0])
    chosen = _choose_impl(q, v, norm, impl)
    if torch.compiler.is_compiling():
        out = _attention_op(q, k, v, offsets, q_offsets, kind, ts, float(alpha), float(norm), chosen)
        return out if gate is None else out * gate
    return _AttentionFunction.apply(q, k, v, offsets, q_offsets, kind, ts, float(alpha), float(norm), chosen, gate)


def _check_gate(gate: Tensor | None, q: Tensor, v: Tensor, q_name: str) -> None:
    if gate is None:
        return
    shape = (q.shape[0], q.shape[1], v.shape[2])
    _check("gate.shape", tuple(gate.shape) == shape, tuple(gate.shape), lambda: f"{shape}, the output's")
    _check("gate.dtype", gate.dtype == q.dtype, gate.dtype, lambda: f"{q.dtype} like {q_name}")
    _check("gate.device", gate.device == q.device, gate.device, lambda: f"{q.device} like {q_name}")


def _choose_impl(q: Tensor, v: Tensor, norm: float, impl: str) -> str:
    _check("norm", norm > 0, norm, "a positive constant")
    def unsupported() -> str | None:
        from .hstu_attention_triton import unsupported_reason

        return unsupported_reason(q, v)

    return resolve_impl(impl, q.device, "hstu attention", unsupported)


def hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, kind: Tensor, ts: Tensor,
    *, alpha: float, norm: float, impl: str = "auto", gate: Tensor | None = None,
) -> Tensor:
    """Full HSTU attention: every token is a query. Returns (N, Hq, Dv) in q's dtype (times gate if given)."""
    _check("q.shape[0]", q.dim() == 3 and q.shape[0] == k.shape[0], tuple(q.shape),
           lambda: f"{k.shape[0]} tokens like k")
    return _dispatch(q, k, v, offsets, offsets, kind, ts, alpha, norm, impl, _MERGED_NAMES, gate)


def hstu_target_attention(
    q_t: Tensor, k: Tensor, v: Tensor, offsets: Tensor, kind: Tensor, ts: Tensor, target_offsets: Tensor,
    *, alpha: float, norm: float, impl: str = "auto", gate: Tensor | None = None,
) -> Tensor:
    """Target attention: only the T-tokens (each user's last ones) are queries. Returns (NT, Hq, Dv)
    (times gate if given)."""
    if (q_t.device.type == "cpu" and not torch.compiler.is_compiling() and target_offsets.shape == offsets.shape
            and target_offsets.device == offsets.device):  # otherwise _dispatch names what differs
        over = (target_offsets.diff() > offsets.diff()).nonzero()
        _check("target_offsets", len(over) == 0,
               lambda: f"{int(target_offsets.diff()[over[0]])} for user {int(over[0])}",
               lambda: f"at most that user's {int(offsets.diff()[over[0]])} tokens: a user's queries are its last keys")
    return _dispatch(q_t, k, v, offsets, target_offsets, kind, ts, alpha, norm, impl,
                     ("q_t",) + _MERGED_NAMES[1:4] + ("target_offsets",) + _MERGED_NAMES[5:], gate)


def hstu_split_target_attention(
    q_t: Tensor, k_context: Tensor, v_context: Tensor, k_t: Tensor, v_t: Tensor, context_offsets: Tensor,
    target_offsets: Tensor, context_kind: Tensor, context_ts: Tensor, target_ts: Tensor,
    *, alpha: float, norm: float, impl: str = "auto", gate: Tensor | None = None,
) -> Tensor:
    """Target attention over keys kept as two halves (the module docstring). Returns (NT, Hq, Dv)
    (times gate if given)."""
    _check_inputs(q_t, k_context, v_context, context_offsets, target_offsets, context_kind, context_ts,
                  ("q_t", "k_context", "v_context", "context_offsets", "target_offsets", "context_kind", "context_ts"))
    nt = q_t.shape[0]
    for name, t, like, like_name in (("k_t", k_t, k_context, "k_context"), ("v_t", v_t, v_context, "v_context")):
        _check(f"{name}.shape", t.dim() == 3 and t.shape[0] == nt and t.shape[1:] == like.shape[1:], tuple(t.shape),
               lambda like=like, like_name=like_name: f"({nt}, {like.shape[1]}, {like.shape[2]}): one row per query, "
                                                      f"rows like {like_name}'s")
        _check(f"{name}.dtype", t.dtype == q_t.dtype, t.dtype, lambda: f"{q_t.dtype} like q_t")
        _check(f"{name}.device", t.device == q_t.device, t.device, lambda: f"{q_t.device} like q_t")
    _check("target_ts.dtype", target_ts.dtype == torch.int64, target_ts.dtype, "torch.int64")
    _check("target_ts.shape", target_ts.dim() == 1 and target_ts.shape[0] == nt, tuple(target_ts.shape),
           lambda: f"({nt},) one per query")
    _check("target_ts.device", target_ts.device == q_t.device, target_ts.device, lambda: f"{q_t.device} like q_t")
    _check_gate(gate, q_t, v_context, "q_t")
    chosen = _choose_impl(q_t, v_context, norm, impl)
    args = (q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts, target_ts,
            float(alpha), float(norm), chosen)
    if torch.compiler.is_compiling():
        out = _split_op(*args)
        return out if gate is None else out * gate
    return _SplitAttentionFunction.apply(*args, gate)
