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

    hstu_split_target_attention(q_t, k_context, v_context, k_t, v_t, context_offsets, context_kind,
                                context_ts, target_offsets, target_ts, *, alpha, norm, impl="auto")

is target attention with each user's keys in two tensors: its H and R rows in k_context (rows
context_offsets[b]:context_offsets[b+1], with their kind and ts) and its T rows in k_t, row for
row with q_t. It equals hstu_target_attention on the merged axis (per user: context rows, then T
rows), without that axis being built: a run of target layers keeps its H and R rows apart.

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
from .backends import resolve_impl

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """The eager path: the op's forward, saved tensors (q, k, v and the jagged metadata) and
    backward, without the dispatcher's Python hops of a torch.library op (the same saving as for
    group_layer_norm: bench/host_overhead.py; the training step is host-bound)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl):
        _setup_context(ctx, (q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl), None)
        return _implementation(impl).jagged_hstu_attention(q, k, v, offsets, q_offsets, kind, ts, alpha, norm)

    @staticmethod
    def backward(ctx, grad_out):
        alpha, norm, impl = ctx.params
        dq, dk, dv = _implementation(impl).jagged_hstu_attention_backward(grad_out.contiguous(), *ctx.saved_tensors,
                                                                          alpha, norm)
        return dq, dk, dv, None, None, None, None, None, None, None


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
    def forward(ctx, *inputs):
        _split_setup_context(ctx, inputs, None)
        return _implementation(inputs[-1]).jagged_split_target_attention(*inputs[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        alpha, norm, impl = ctx.params
        grads = _implementation(impl).jagged_split_target_attention_backward(grad_out.contiguous(),
                                                                             *ctx.saved_tensors, alpha, norm)
        return (*grads, None, None, None, None, None, None, None, None)


def _check(name: str, ok: bool, found, expected: str | Callable[[], str]) -> None:
    """`found` and `expected` may be functions building the text: they then run only on failure
    (formatting a shape in every call costs host time and makes torch.compile specialise on it)."""
    if not ok:
        found, expected = (part() if callable(part) else part for part in (found, expected))
        raise ValueError(f"hstu attention: {name} is {found}, expected {expected}")


_MERGED_NAMES = ("q", "k", "v", "offsets", "offsets", "kind", "ts")


def _check_inputs(q, k, v, offsets, q_offsets, kind, ts, names: tuple[str, ...]) -> None:
    """names: what the caller calls each of q, k, v, offsets, q_offsets, kind, ts (for the errors)."""
    q_name, k_name, v_name, offsets_name, q_offsets_name, kind_name, ts_name = names
    for name, t in ((q_name, q), (k_name, k), (v_name, v)):
        _check(f"{name}.shape", t.dim() == 3, tuple(t.shape), "3 dims (tokens, heads, head_dim)")
        _check(f"{name}.dtype", t.dtype in _FLOAT_DTYPES, t.dtype, "float16, bfloat16, float32 or float64")
    n = k.shape[0]
    _check(f"{v_name}.shape", v.shape[:2] == k.shape[:2], tuple(v.shape),
           lambda: f"({n}, {k.shape[1]}, Dv) like {k_name}")
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


def _dispatch(q, k, v, offsets, q_offsets, kind, ts, alpha, norm, impl, names):
    _check_inputs(q, k, v, offsets, q_offsets, kind, ts, names)
    chosen = _choose_impl(q, v, norm, impl)
    op = _attention_op if torch.compiler.is_compiling() else _AttentionFunction.apply
    return op(q, k, v, offsets, q_offsets, kind, ts, float(alpha), float(norm), chosen)


def _choose_impl(q: Tensor, v: Tensor, norm: float, impl: str) -> str:
    _check("norm", norm > 0, norm, "a positive constant")
    chosen = resolve_impl(impl, q.device)
    if chosen == "triton":
        from .hstu_attention_triton import unsupported_reason

        reason = unsupported_reason(q, v)
        if reason is not None and impl == "triton":
            raise ValueError(f"hstu attention: impl='triton' does not support these inputs: {reason}")
        if reason is not None:  # "auto" takes the reference for what the kernels do not cover
            chosen = "reference"
    return chosen


def hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, kind: Tensor, ts: Tensor,
    *, alpha: float, norm: float, impl: str = "auto",
) -> Tensor:
    """Full HSTU attention: every token is a query. Returns (N, Hq, Dv) in q's dtype."""
    _check("q.shape[0]", q.dim() == 3 and q.shape[0] == k.shape[0], tuple(q.shape),
           lambda: f"{k.shape[0]} tokens like k")
    return _dispatch(q, k, v, offsets, offsets, kind, ts, alpha, norm, impl, _MERGED_NAMES)


def hstu_target_attention(
    q_t: Tensor, k: Tensor, v: Tensor, offsets: Tensor, kind: Tensor, ts: Tensor, target_offsets: Tensor,
    *, alpha: float, norm: float, impl: str = "auto",
) -> Tensor:
    """Target attention: only the T-tokens (each user's last ones) are queries. Returns (NT, Hq, Dv)."""
    return _dispatch(q_t, k, v, offsets, target_offsets, kind, ts, alpha, norm, impl,
                     ("q_t",) + _MERGED_NAMES[1:4] + ("target_offsets",) + _MERGED_NAMES[5:])


def hstu_split_target_attention(
    q_t: Tensor, k_context: Tensor, v_context: Tensor, k_t: Tensor, v_t: Tensor, context_offsets: Tensor,
    context_kind: Tensor, context_ts: Tensor, target_offsets: Tensor, target_ts: Tensor,
    *, alpha: float, norm: float, impl: str = "auto",
) -> Tensor:
    """Target attention over keys kept as two halves (the module docstring). Returns (NT, Hq, Dv)."""
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
    chosen = _choose_impl(q_t, v_context, norm, impl)
    op = _split_op if torch.compiler.is_compiling() else _SplitAttentionFunction.apply
    return op(q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
              target_ts, float(alpha), float(norm), chosen)
