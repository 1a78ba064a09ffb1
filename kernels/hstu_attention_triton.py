"""Triton kernels of jagged HSTU attention with the MTFM dynamic mask built in-kernel.

Same signature and math as hstu_attention_reference.py (the specification): queries are the
last M_b tokens of each user (full attention: all of them; target attention: the T-tokens),
    out = (silu(alpha * Q K^T) * M / norm) V
with the mask M computed from per-token kind and ts (O(N) metadata, no N x N mask).

Tiling relies on the per-user token order H | R (sorted by ts) | T:
- Off the diagonal, key j is visible to query i iff j is H, or j is R with ts_j < ts_i; a T key
  is never visible off the diagonal. A query block therefore needs keys [0, kend) only, with
  kend = n_hist + #(R keys with ts < the block's largest query ts), found by a search;
  tiles of H keys need no mask, only the few tiles at the H/R boundary and in R are masked.
- The diagonal term of R and T queries is added elementwise (one row dot product), so T x T
  tiles are never formed; H queries meet themselves among the H keys. The kernels reload the
  rows for it after their tile loop: the loop's Q and dO tiles, or float32 copies of K and V,
  kept in registers until then made them spill more (H200, head dim 256: the reload took 3-6%
  off the forward, 8-15% off dQ and 2-5% off dK/dV).
So the work follows the visible pairs, not L^2.

Kernels: forward, one program per (query block, query head); backward as two kernels that need
no atomics: dK/dV, one program per (key block, kv head) looping over the group's query heads and
the query blocks that can see it (all of them for H and R keys, none for T keys), and dQ, shaped
like the forward. With GQA at head dim 256 a tile's rows are (query, head) pairs of a kv head's
query heads (`_query_rows`, `PACK_HEADS_MIN_DIM`): one program per (query block, kv head), one
tile product for the heads that share the keys, and a user's few T rows fill fuller tiles. The
backward does 7 tile products per visible tile (QK^T and dO V^T are recomputed in both kernels)
where the FLOP convention counts 5.
Programs are laid out over the packed blocks of all users (no padding to the longest user).
The gate (out * U, U a column block of the layer's projection) and its backward are two small
row-wise kernels: torch's elementwise kernels run unvectorised on the strided U.

Split target attention (SPLIT) runs the same kernels with a user's keys in two places: its H and
R rows in K, V (rows Offsets[b]:Offsets[b+1], their Kind and Ts) and its T rows, the queries, in
KSelf, VSelf (row for row with Q; TsSelf their ts). Off the diagonal only the first half is read;
the diagonal term reads the second, whose dK/dV is that term alone (`_self_dkdv_kernel`). In the
merged layout KSelf, VSelf and TsSelf are K, V and Ts themselves.

The kernels work with h = alpha * s / 2 for a score s = <q, k>, where
    silu(alpha * s) = h * (1 + tanh h),   d silu(x)/dx at x = alpha * s is (1 + tanh h)(1 + h - h tanh h) / 2,
so one tanh per pair gives both (on the GPU the single-instruction tanh.approx for half inputs).
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backends import dtype_unsupported_reason, multiprocessors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) per kernel and head dim, for H100/H200
# (with packed heads a query row is a (query, head) pair: BLOCK_M // heads queries).
# Picked by `bench/kernels.py --sweep attention`: d=128 at 4K tokens per user (H100), d=256 at 1K
# (H200; training batches average about 850 per user), d=64 not swept, by analogy. At d=256 full
# attention's dK/dV kernel took 2.22 ms with (64, 32, 4, 2) against 2.41 with (32, 32, 4, 3)
# (H200, Hq=2, Hkv=1, 131,072 tokens), split target attention's 0.44 against 0.52 (tied at
# Hq=Hkv=3). Split target attention (a user's 50-300 T rows as queries) takes the same configs;
# a "_split" entry, where one exists (`--sweep-targets` adds them), overrides; none does now.
# float32 at d=256 and the interpreter have one config each.
_CONFIGS = {
    "fwd": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (128, 64, 8, 2)},
    "dq": {64: (128, 32, 8, 3), 128: (128, 32, 8, 3), 256: (128, 32, 8, 3)},
    "dkdv": {64: (32, 128, 8, 3), 128: (32, 128, 8, 3), 256: (64, 32, 4, 2)},
}
# float32 tiles take twice the shared memory: at head dim 256 the tables above ask for more than an
# H100/H200 lets one block use (227 KiB), so float32 there gets smaller tiles and one stage.
_FP32_D256_CONFIGS = {"fwd": (64, 32, 4, 1), "dq": (64, 32, 4, 1), "dkdv": (32, 32, 4, 1)}
_INTERPRET_CONFIG = (16, 16, 4, 1)
# Query heads of a kv head share tile rows (`_query_rows`) at head dims of at least this. H200
# (bench/RESULTS.md, "Query heads packed into tile rows"): in the training step at d=256, Hq=2,
# Hkv=1 packing took the forward to 0.81x, dQ to 0.94x and dK/dV to 0.97x; at d=128 (Hq=4,
# `bench/kernels.py`) it made the forward 1.04-1.13x and the backward 1.08-1.16x slower.
PACK_HEADS_MIN_DIM = 256
# Rows per program of the T rows' own dK/dV with split keys (an elementwise pass over the rows):
# at 32 its float32 tiles spilled at head dim 256 (H200, Hq=2, Hkv=1: 0.062 ms, 16 rows 0.034).
_SELF_BLOCK = 16
# Arguments that change from batch to batch and that Triton would otherwise specialise on (an
# integer on == 1 and on divisibility by 16, a pointer on 16-byte alignment), compiling a new
# variant of every kernel for each combination met. The metadata tensors are views into the one
# buffer of `TokenBatch.to`, so their alignment varies with the batch's sizes. Nothing gains from
# those hints here: the counts drive loop bounds and searches, the metadata loads are gathers.
# Q/K/V/grads (fresh allocations) and the strides (fixed by the head counts and dims) keep them.
_PER_BATCH_ARGS = ["Offsets", "QOffsets", "Kind", "Ts", "TsSelf", "num_users"]


def unsupported_reason(q: Tensor, v: Tensor) -> str | None:
    """Why these inputs cannot run here, or None. q (NQ, Hq, D), v (N, Hkv, Dv)."""
    if (reason := dtype_unsupported_reason(q.dtype)) is not None:
        return reason
    for name, dim in (("head dim D", q.shape[2]), ("value head dim Dv", v.shape[2])):
        if dim not in (16, 32, 64, 128, 256):
            return f"{name} = {dim}; the kernels take 16, 32, 64, 128 or 256"
    return None


@triton.jit
def _tanh(h, FAST: tl.constexpr):
    if FAST:
        # One MUFU instruction, where a sigmoid through exp and a reciprocal takes two.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * h))


@triton.jit
def _search_step(lo, span, probes_below, step):
    """Advance a FANOUT-ary search: the answer lies in [lo, lo + span]; probes_below of the
    probes lo + i * step - 1 (i = 1..FANOUT, those inside the range) are below the bound."""
    end = lo + span
    lo = lo + probes_below * step
    return lo, tl.minimum(step - 1, end - lo)


@triton.jit
def _count_below(ptr, n, bound, FANOUT: tl.constexpr):
    """Number of leading entries of the ascending ptr[0:n] below `bound`. A FANOUT-ary search:
    two rounds of one vector load each for n up to FANOUT^2, where a binary search makes
    log2(n) dependent scalar loads that each wait a full memory latency."""
    lo = n * 0
    span = n
    probe = tl.arange(0, FANOUT) + 1
    while span > 0:
        step = (span + FANOUT - 1) // FANOUT
        idx = lo + probe * step - 1
        inside = idx < lo + span
        below = inside & (tl.load(ptr + idx, mask=inside, other=0) < bound)
        lo, span = _search_step(lo, span, tl.sum(below.to(lo.dtype)), step)
    return lo


@triton.jit
def _find_user(ScheduleOffsets, num_users, pid, BLOCK: tl.constexpr, FANOUT: tl.constexpr):
    """The user whose programs [S[b] // BLOCK + b, S[b+1] // BLOCK + b + 1) hold pid: the number
    of users b with S[b] // BLOCK + b <= pid, less one (the same FANOUT-ary search)."""
    lo = pid * 0  # a tensor, as the loop below makes it (a loop-carried value keeps one type)
    span = lo + num_users
    probe = tl.arange(0, FANOUT) + 1
    while span > 0:
        step = (span + FANOUT - 1) // FANOUT
        idx = lo + probe * step - 1
        inside = idx < lo + span
        owns_from = tl.load(ScheduleOffsets + idx, mask=inside, other=0) // BLOCK + idx
        below = inside & (owns_from <= pid)
        lo, span = _search_step(lo, span, tl.sum(below.to(lo.dtype)), step)
    return lo - 1


@triton.jit
def _user_block(pid, Offsets, QOffsets, Kind, num_users, ScheduleOffsets, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """This program's user b and block of rows, and the user's layout.

    Programs are scheduled over the rows that ScheduleOffsets packs (queries or keys): user b
    owns programs [S[b] // BLOCK + b, S[b+1] // BLOCK + b + 1), which covers its cdiv(rows,
    BLOCK) blocks with at most one spare, so finding b is a search and the launch needs
    no prefix sum on the host (grid: total rows // BLOCK + B). The kind of a user's tokens is
    ascending (H, R, T), so its H and H+R counts are searches too.
    Returns b, the block's first row, the key start and length, the query start and count,
    the shift from a query's index to its key position (L_b - M_b), n_hist and n_hist + n_real,
    and the row of the first query's own key (in K, or with SPLIT in the T rows' KSelf).
    With SPLIT the key axis holds only the user's H and R rows (its T rows, the queries, come after).
    """
    b = _find_user(ScheduleOffsets, num_users, pid, BLOCK, 64)
    first = (pid - (tl.load(ScheduleOffsets + b) // BLOCK + b)) * BLOCK
    start = tl.load(Offsets + b)
    length = tl.load(Offsets + b + 1) - start
    q_start = tl.load(QOffsets + b)
    n_q = tl.load(QOffsets + b + 1) - q_start
    # A user's kinds ascend H, R, T; 1 and 2 are TokenKind.R and TokenKind.T (test_mask.py holds the values).
    n_hist = _count_below(Kind + start, length, 1, 64)
    if SPLIT:
        return b, first, start, length, q_start, n_q, length, n_hist, length, q_start
    n_hr = _count_below(Kind + start, length, 2, 64)
    return b, first, start, length, q_start, n_q, length - n_q, n_hist, n_hr, start + length - n_q


@triton.jit
def _query_rows(m0, n_q, h0, BLOCK_M: tl.constexpr, HEADS: tl.constexpr):
    """A forward or dQ program's BLOCK_M rows: BLOCK_M // HEADS queries from m0, each with the
    query heads h0 .. h0 + HEADS - 1 in turn (a tile row is a (query, head) pair; HEADS > 1 packs
    query heads of one kv head, which share its keys and values, so one tile product serves them
    all and a user's few T rows fill fewer, fuller tiles). Returns each row's query index, query
    head and whether it is a query of this block."""
    r = tl.arange(0, BLOCK_M)
    offs_m = m0 + r // HEADS
    rows = (r < (BLOCK_M // HEADS) * HEADS) & (offs_m < n_q)
    return offs_m, h0 + r % HEADS, rows


@triton.jit
def _fwd_tiles(acc, q, ts_q, k_base, v_base, ts_base, lo, hi, n_hist, stride_kn, stride_vn, half_alpha,
               BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr,
               FAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            ok = keys < hi
            kt = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None], mask=ok[None, :], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn + offs_dv[None, :], mask=ok[:, None], other=0.0)
            ts_k = tl.load(ts_base + keys, mask=ok, other=0)
        else:
            kt = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None])
            v = tl.load(v_base + keys[:, None] * stride_vn + offs_dv[None, :])
        h = tl.dot(q, kt, input_precision=PRECISION) * half_alpha
        p = h + h * _tanh(h, FAST)
        if MASKED:
            visible = (keys[None, :] < n_hist) | (ok[None, :] & (ts_k[None, :] < ts_q[:, None]))
            p = tl.where(visible, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=_PER_BATCH_ARGS)
def _fwd_kernel(
    Q, K, V, KSelf, VSelf, Out, Offsets, QOffsets, Kind, Ts, TsSelf, num_users,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ksn, stride_ksh, stride_vsn, stride_vsh,
    stride_on, stride_oh, stride_os, half_alpha, inv_norm,
    GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, KEY_SPLITS: tl.constexpr, SPLIT: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    kv = h0 // GROUP
    split = tl.program_id(2)
    b, m0, start, length, q_start, n_q, shift, n_hist, n_hr, self_start = _user_block(
        pid, Offsets, QOffsets, Kind, num_users, QOffsets, BLOCK_M // HEADS, SPLIT)
    if m0 >= n_q:
        return
    offs_m, heads, rows = _query_rows(m0, n_q, h0, BLOCK_M, HEADS)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    pos_q = shift + offs_m
    self_rows = self_start + offs_m
    ts_q = tl.load(TsSelf + self_rows, mask=rows, other=0)
    max_ts = tl.max(tl.where(rows, ts_q, tl.load(TsSelf + self_start + m0)))
    kend = n_hist + _count_below(Ts + start + n_hist, n_hr - n_hist, max_ts, 64)
    hist_end = (n_hist // BLOCK_N) * BLOCK_N

    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rows[:, None], other=0.0)
    k_base = K + start * stride_kn + kv * stride_kh
    v_base = V + start * stride_vn + kv * stride_vh
    # This program's share of the keys [0, kend): whole tiles, the split-th of KEY_SPLITS. A
    # compile-time count: as a runtime argument, the unsplit kernel ran 1.4-1.7x slower on an H200.
    lo = 0
    hi = kend
    if KEY_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(kend, BLOCK_N), KEY_SPLITS) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(kend, lo + per_split)
    acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    acc = _fwd_tiles(acc, q, ts_q, k_base, v_base, Ts + start, lo, tl.minimum(hi, hist_end), n_hist, stride_kn,
                     stride_vn, half_alpha, BLOCK_N, D, DV, False, FAST, PRECISION)
    acc = _fwd_tiles(acc, q, ts_q, k_base, v_base, Ts + start, tl.maximum(lo, hist_end), hi, n_hist, stride_kn,
                     stride_vn, half_alpha, BLOCK_N, D, DV, True, FAST, PRECISION)
    if split == 0:
        on_diagonal = rows & (pos_q >= n_hist)
        q_self = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                         mask=on_diagonal[:, None], other=0.0)
        k_self = tl.load(KSelf + self_rows[:, None] * stride_ksn + kv * stride_ksh + offs_d[None, :],
                         mask=on_diagonal[:, None], other=0.0)
        v_self = tl.load(VSelf + self_rows[:, None] * stride_vsn + kv * stride_vsh + offs_dv[None, :],
                         mask=on_diagonal[:, None], other=0.0)
        h_self = tl.sum(q_self.to(tl.float32) * k_self.to(tl.float32), axis=1) * half_alpha
        acc += (h_self + h_self * _tanh(h_self, FAST))[:, None] * v_self.to(tl.float32)
    # With key splits, Out is the float32 partial sums (KEY_SPLITS, Nq, Hq, DV), summed by the caller.
    tl.store(Out + split * stride_os + (q_start + offs_m)[:, None] * stride_on + heads[:, None] * stride_oh
             + offs_dv[None, :],
             (acc * inv_norm).to(Out.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _dq_tiles(dq, q, do, ts_q, k_base, v_base, ts_base, lo, hi, n_hist, stride_kn, stride_vn, half_alpha,
              BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr,
              FAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            ok = keys < hi
            k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(v_base + keys[None, :] * stride_vn + offs_dv[:, None], mask=ok[None, :], other=0.0)
            ts_k = tl.load(ts_base + keys, mask=ok, other=0)
        else:
            k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :])
            vt = tl.load(v_base + keys[None, :] * stride_vn + offs_dv[:, None])
        h = tl.dot(q, tl.trans(k), input_precision=PRECISION) * half_alpha
        dp = tl.dot(do, vt, input_precision=PRECISION)
        t = _tanh(h, FAST)
        ds = dp * ((1.0 + t) * (1.0 + h - h * t))
        if MASKED:
            visible = (keys[None, :] < n_hist) | (ok[None, :] & (ts_k[None, :] < ts_q[:, None]))
            ds = tl.where(visible, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_PER_BATCH_ARGS)
def _dq_kernel(
    Q, K, V, KSelf, VSelf, DO, DQ, Offsets, QOffsets, Kind, Ts, TsSelf, num_users,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ksn, stride_ksh, stride_vsn, stride_vsh,
    stride_don, stride_doh, stride_dqn, stride_dqh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    half_alpha, inv_norm,
    GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, SPLIT: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    kv = h0 // GROUP
    b, m0, start, length, q_start, n_q, shift, n_hist, n_hr, self_start = _user_block(
        pid, Offsets, QOffsets, Kind, num_users, QOffsets, BLOCK_M // HEADS, SPLIT)
    if m0 >= n_q:
        return
    offs_m, heads, rows = _query_rows(m0, n_q, h0, BLOCK_M, HEADS)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    pos_q = shift + offs_m
    self_rows = self_start + offs_m
    ts_q = tl.load(TsSelf + self_rows, mask=rows, other=0)
    max_ts = tl.max(tl.where(rows, ts_q, tl.load(TsSelf + self_start + m0)))
    kend = n_hist + _count_below(Ts + start + n_hist, n_hr - n_hist, max_ts, 64)
    hist_end = (n_hist // BLOCK_N) * BLOCK_N

    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rows[:, None], other=0.0)
    do = tl.load(DO + (q_start + offs_m)[:, None] * stride_don + heads[:, None] * stride_doh + offs_dv[None, :],
                 mask=rows[:, None], other=0.0)
    k_base = K + start * stride_kn + kv * stride_kh
    v_base = V + start * stride_vn + kv * stride_vh
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, ts_q, k_base, v_base, Ts + start, 0, hist_end, n_hist, stride_kn, stride_vn,
                   half_alpha, BLOCK_N, D, DV, False, FAST, PRECISION)
    dq = _dq_tiles(dq, q, do, ts_q, k_base, v_base, Ts + start, hist_end, kend, n_hist, stride_kn, stride_vn,
                   half_alpha, BLOCK_N, D, DV, True, FAST, PRECISION)
    on_diagonal = rows & (pos_q >= n_hist)
    q_self = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                     mask=on_diagonal[:, None], other=0.0).to(tl.float32)
    do_self = tl.load(DO + (q_start + offs_m)[:, None] * stride_don + heads[:, None] * stride_doh + offs_dv[None, :],
                      mask=on_diagonal[:, None], other=0.0).to(tl.float32)
    k_self = tl.load(KSelf + self_rows[:, None] * stride_ksn + kv * stride_ksh + offs_d[None, :],
                     mask=on_diagonal[:, None], other=0.0).to(tl.float32)
    v_self = tl.load(VSelf + self_rows[:, None] * stride_vsn + kv * stride_vsh + offs_dv[None, :],
                     mask=on_diagonal[:, None], other=0.0)
    h_self = tl.sum(q_self * k_self, axis=1) * half_alpha
    dp_self = tl.sum(do_self * v_self.to(tl.float32), axis=1)
    t = _tanh(h_self, FAST)
    dq += (dp_self * (1.0 + t) * (1.0 + h_self - h_self * t))[:, None] * k_self
    tl.store(DQ + (q_start + offs_m)[:, None] * stride_dqn + heads[:, None] * stride_dqh + offs_d[None, :],
             (dq * (half_alpha * inv_norm)).to(DQ.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _dkdv_tiles(dk, dv, k, v, keys, ts_k, q_base, do_base, ts_q_base, n_q, n_hist, n_hr,
                stride_qn, stride_qh, stride_don, stride_doh, half_alpha,
                HEADS: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr,
                FAST: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv plus the key block's products with the n_q queries of HEADS consecutive query heads
    (q_base, do_base: the first query of the first head), packed as the forward packs them: tile
    row r is query r // HEADS of head r % HEADS."""
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    for r0 in range(0, n_q * HEADS, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        offs_m = r // HEADS
        hh = r % HEADS
        rows = r < n_q * HEADS
        q = tl.load(q_base + offs_m[:, None] * stride_qn + hh[:, None] * stride_qh + offs_d[None, :],
                    mask=rows[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + hh[:, None] * stride_doh + offs_dv[None, :],
                     mask=rows[:, None], other=0.0)
        ht = tl.dot(k, tl.trans(q), input_precision=PRECISION) * half_alpha
        t = _tanh(ht, FAST)
        pt = ht + ht * t
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = dpt * ((1.0 + t) * (1.0 + ht - ht * t))
        if MASKED:
            ts_q = tl.load(ts_q_base + offs_m, mask=rows, other=0)
            visible = (keys[:, None] < n_hist) | ((keys[:, None] < n_hr) & (ts_k[:, None] < ts_q[None, :]))
            pt = tl.where(visible, pt, 0.0)
            dst = tl.where(visible, dst, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_PER_BATCH_ARGS)
def _dkdv_kernel(
    Q, K, V, KSelf, VSelf, DO, DK, DV_, Offsets, QOffsets, Kind, Ts, TsSelf, num_users,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ksn, stride_ksh, stride_vsn, stride_vsh,
    stride_don, stride_doh, stride_dqn, stride_dqh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    half_alpha, inv_norm,
    GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, SPLIT: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of the keys in K (with SPLIT, the H and R rows only: the T rows' own terms are
    `_self_dkdv_kernel`'s)."""
    pid = tl.program_id(0)
    kv = tl.program_id(1)
    b, n0, start, length, q_start, n_q, shift, n_hist, n_hr, self_start = _user_block(
        pid, Offsets, QOffsets, Kind, num_users, Offsets, BLOCK_N, SPLIT)
    if n0 >= length:
        return
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < length
    k = tl.load(K + (start + keys)[:, None] * stride_kn + kv * stride_kh + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    v = tl.load(V + (start + keys)[:, None] * stride_vn + kv * stride_vh + offs_dv[None, :],
                mask=key_ok[:, None], other=0.0)
    ts_k = tl.load(Ts + start + keys, mask=key_ok, other=0)
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, DV), dtype=tl.float32)
    # T keys are seen by no query but themselves: such a block skips the query loop.
    n_q_seen = tl.where(n0 < n_hr, n_q, 0)
    on_diagonal = key_ok & (keys >= n_hist) & (keys >= shift)  # never with SPLIT (shift = length)
    self_rows = q_start + keys - shift
    for h0 in range(kv * GROUP, (kv + 1) * GROUP, HEADS):
        q_base = Q + q_start * stride_qn + h0 * stride_qh
        do_base = DO + q_start * stride_don + h0 * stride_doh
        if n0 + BLOCK_N <= n_hist:
            dk, dv = _dkdv_tiles(dk, dv, k, v, keys, ts_k, q_base, do_base, TsSelf + self_start, n_q_seen, n_hist,
                                 n_hr, stride_qn, stride_qh, stride_don, stride_doh, half_alpha, HEADS, BLOCK_M, D, DV,
                                 False, FAST, PRECISION)
        else:
            dk, dv = _dkdv_tiles(dk, dv, k, v, keys, ts_k, q_base, do_base, TsSelf + self_start, n_q_seen, n_hist,
                                 n_hr, stride_qn, stride_qh, stride_don, stride_doh, half_alpha, HEADS, BLOCK_M, D, DV,
                                 True, FAST, PRECISION)
    if not SPLIT:
        k_self = tl.load(K + (start + keys)[:, None] * stride_kn + kv * stride_kh + offs_d[None, :],
                         mask=on_diagonal[:, None], other=0.0).to(tl.float32)
        v_self = tl.load(V + (start + keys)[:, None] * stride_vn + kv * stride_vh + offs_dv[None, :],
                         mask=on_diagonal[:, None], other=0.0).to(tl.float32)
        for hh in range(GROUP):
            dk, dv = _self_dkdv(dk, dv, k_self, v_self, Q, DO, self_rows, on_diagonal, kv * GROUP + hh, stride_qn,
                                stride_qh, stride_don, stride_doh, half_alpha, D, DV, FAST)
    tl.store(DK + (start + keys)[:, None] * stride_dkn + kv * stride_dkh + offs_d[None, :],
             (dk * (half_alpha * inv_norm)).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV_ + (start + keys)[:, None] * stride_dvn + kv * stride_dvh + offs_dv[None, :],
             (dv * inv_norm).to(DV_.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _self_dkdv(dk, dv, k_self, v_self, Q, DO, self_rows, on_diagonal, h, stride_qn, stride_qh, stride_don, stride_doh,
               half_alpha, D: tl.constexpr, DV: tl.constexpr, FAST: tl.constexpr):
    """Adds query head h's diagonal terms (a query row meets its own key) to dk, dv of the key rows
    whose queries are at self_rows of Q and DO (where on_diagonal)."""
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q_self = tl.load(Q + self_rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                     mask=on_diagonal[:, None], other=0.0).to(tl.float32)
    do_self = tl.load(DO + self_rows[:, None] * stride_don + h * stride_doh + offs_dv[None, :],
                      mask=on_diagonal[:, None], other=0.0).to(tl.float32)
    h_self = tl.sum(q_self * k_self, axis=1) * half_alpha
    t = _tanh(h_self, FAST)
    dv += (h_self + h_self * t)[:, None] * do_self
    dp_self = tl.sum(do_self * v_self, axis=1)
    dk += (dp_self * (1.0 + t) * (1.0 + h_self - h_self * t))[:, None] * q_self
    return dk, dv


@triton.jit(do_not_specialize=["num_rows"])
def _self_dkdv_kernel(
    Q, KSelf, VSelf, DO, DK, DV_, num_rows,
    stride_qn, stride_qh, stride_ksn, stride_ksh, stride_vsn, stride_vsh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, half_alpha, inv_norm,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, FAST: tl.constexpr,
):
    """dK and dV of the T rows with SPLIT: a T key is seen only by its own query (the same row of
    Q), so each row's gradient is its diagonal terms summed over the kv head's query heads."""
    kv = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < num_rows
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k_self = tl.load(KSelf + rows[:, None] * stride_ksn + kv * stride_ksh + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
    v_self = tl.load(VSelf + rows[:, None] * stride_vsn + kv * stride_vsh + offs_dv[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, DV), dtype=tl.float32)
    for hh in range(GROUP):
        dk, dv = _self_dkdv(dk, dv, k_self, v_self, Q, DO, rows, ok, kv * GROUP + hh, stride_qn, stride_qh,
                            stride_don, stride_doh, half_alpha, D, DV, FAST)
    tl.store(DK + rows[:, None] * stride_dkn + kv * stride_dkh + offs_d[None, :],
             (dk * (half_alpha * inv_norm)).to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV_ + rows[:, None] * stride_dvn + kv * stride_dvh + offs_dv[None, :],
             (dv * inv_norm).to(DV_.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["n_rows"])
def _gate_kernel(A, U, G, n_rows, stride_a, stride_u, stride_g, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_W: tl.constexpr):
    """G = A * U, rows of WIDTH values at any row stride (U a column block of the projection)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows < n_rows)[:, None] & (cols < WIDTH)[None, :]
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask).to(tl.float32)
    tl.store(G + rows[:, None] * stride_g + cols[None, :], (a * u).to(G.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _gate_bwd_kernel(DG, A, U, DA, DU, n_rows, stride_dg, stride_a, stride_u, stride_da, stride_du,
                     WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """DA = DG * U and DU = DG * A in one pass (two elementwise kernels, strided hence unvectorised, before)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows < n_rows)[:, None] & (cols < WIDTH)[None, :]
    dg = tl.load(DG + rows[:, None] * stride_dg + cols[None, :], mask=mask).to(tl.float32)
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask).to(tl.float32)
    tl.store(DA + rows[:, None] * stride_da + cols[None, :], (dg * u).to(DA.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], (dg * a).to(DU.dtype.element_ty), mask=mask)


def _as_rows(t: Tensor) -> bool:
    """Whether t (rows, heads, dim) is rows of heads * dim contiguous values (at any row stride)."""
    return t.stride(2) == 1 and t.stride(1) == t.shape[2]


def _gate_grid(rows: int, width: int) -> tuple[int, int, tuple[int]]:
    block_w = triton.next_power_of_2(width)
    block_r = 2 if _INTERPRET else max(1, 4096 // block_w)
    return block_r, block_w, (triton.cdiv(rows, block_r),)


def gate(out: Tensor, gate: Tensor) -> Tensor:
    """out * gate for out (rows, heads, dim) contiguous and the gate a view of the same shape."""
    if not (out.is_contiguous() and _as_rows(gate)) or out.shape[0] == 0:
        return out * gate
    gated = torch.empty_like(out)
    block_r, block_w, grid = _gate_grid(out.shape[0], out[0].numel())
    _gate_kernel[grid](out, gate, gated, out.shape[0], out.stride(0), gate.stride(0), gated.stride(0),
                       WIDTH=out[0].numel(), BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4)
    return gated


def gate_backward(grad: Tensor, out: Tensor, gate: Tensor, grad_gate: Tensor) -> Tensor:
    """For gated = out * gate: writes grad * out into grad_gate (any row stride) and returns grad * gate."""
    tensors = (grad, out, gate, grad_gate)
    if not all(_as_rows(t) for t in tensors) or grad.shape[0] == 0:
        torch.mul(grad, out, out=grad_gate)
        return grad * gate
    grad_out = torch.empty(out.shape, dtype=torch.result_type(grad, gate), device=out.device)
    block_r, block_w, grid = _gate_grid(out.shape[0], out[0].numel())
    _gate_bwd_kernel[grid](grad, out, gate, grad_out, grad_gate, out.shape[0], *(t.stride(0) for t in tensors[:3]),
                           grad_out.stride(0), grad_gate.stride(0), WIDTH=out[0].numel(), BLOCK_R=block_r,
                           BLOCK_W=block_w, num_warps=4)
    return grad_out


def _launch_params(kernel_name: str, q: Tensor, split: bool = False) -> tuple[tuple[int, int, int, int], dict]:
    if _INTERPRET:
        config = _INTERPRET_CONFIG
    elif q.dtype == torch.float32 and q.shape[2] == 256:
        config = _FP32_D256_CONFIGS[kernel_name]
    else:
        d = max(64, q.shape[2])
        config = (split and _CONFIGS.get(f"{kernel_name}_split", {}).get(d)) or _CONFIGS[kernel_name][d]
    fast = not _INTERPRET and q.dtype in (torch.float16, torch.bfloat16)
    return config, dict(FAST=fast, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _heads_per_tile(q: Tensor, group: int, block_m: int) -> tuple[int, int]:
    """(query heads per tile, BLOCK_M): a kv head's whole group of query heads at head dims of at
    least PACK_HEADS_MIN_DIM, else one; BLOCK_M grows to hold a group larger than it."""
    heads = group if q.shape[2] >= PACK_HEADS_MIN_DIM else 1
    return heads, max(block_m, triton.next_power_of_2(heads))


def _query_grid(q: Tensor, k: Tensor, users: int, block_m: int) -> tuple[int, int, int, int]:
    """(query blocks, head programs, query heads per tile, BLOCK_M) of the forward and dQ grids."""
    heads, block_m = _heads_per_tile(q, q.shape[1] // k.shape[1], block_m)
    return q.shape[0] // (block_m // heads) + users, q.shape[1] // heads, heads, block_m


def jagged_hstu_attention(q, k, v, offsets, q_offsets, kind, ts, alpha: float, norm: float,
                          key_splits: int | None = None) -> Tensor:
    """key_splits: programs per (query block, head or packed heads) over the keys (None:
    `_key_splits` picks); their float32 partial outputs are summed here."""
    return _forward(q, k, v, k, v, offsets, q_offsets, kind, ts, ts, alpha, norm, False, key_splits)


def jagged_split_target_attention(q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets,
                                  context_kind, context_ts, target_ts, alpha: float, norm: float,
                                  key_splits: int | None = None) -> Tensor:
    """Target attention with each user's keys in two places: its H and R rows in k_context (rows
    context_offsets[b]:context_offsets[b+1]) and its T rows in k_t, row for row with q_t."""
    return _forward(q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
                    target_ts, alpha, norm, True, key_splits)


def _forward(q, k, v, k_self, v_self, offsets, q_offsets, kind, ts, ts_self, alpha, norm, split, key_splits):
    q, k, v, k_self, v_self = (_rows(t) for t in (q, k, v, k_self, v_self))
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    users = offsets.shape[0] - 1
    (block_m, block_n, warps, stages), flags = _launch_params("fwd", q, split)
    query_blocks, head_programs, heads, block_m = _query_grid(q, k, users, block_m)
    if key_splits is None:
        key_splits = _key_splits(query_blocks * head_programs, k.shape[0] // max(users, 1), block_n, q.device)
    dest = out if key_splits == 1 else torch.empty((key_splits,) + out.shape, dtype=torch.float32, device=q.device)
    _fwd_kernel[(query_blocks, head_programs, key_splits)](
        q, k, v, k_self, v_self, dest, offsets, q_offsets, kind, ts, ts_self, users,
        *_head_strides(q, k, v, k_self, v_self),
        dest.stride(-3), dest.stride(-2), dest.stride(0) if key_splits > 1 else 0,
        0.5 * alpha, 1.0 / norm,
        GROUP=q.shape[1] // k.shape[1], HEADS=heads, BLOCK_M=block_m, BLOCK_N=block_n, D=q.shape[2], DV=v.shape[2],
        KEY_SPLITS=key_splits, SPLIT=split, num_warps=warps, num_stages=stages, **flags,
    )
    return out if key_splits == 1 else dest.sum(0).to(q.dtype)


def _head_strides(*tensors: Tensor) -> tuple[int, ...]:
    """The row and head strides of each (rows, heads, dim) tensor, in order."""
    return tuple(stride for t in tensors for stride in t.stride()[:2])


def _rows(t: Tensor) -> Tensor:
    """t with unit stride along its last dim, which is all the kernels need: the queries and keys
    of a layer are views into its projection's output (rows of [Q | U] or [K | V]), read in place
    rather than copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


MAX_KEY_SPLITS = 8


def _key_splits(programs: int, keys_per_user: int, block_n: int, device: torch.device) -> int:
    """Splits of each program's keys when the (query block, head) programs alone would leave
    most of the GPU idle: a serving request of 200 candidates against 1000 history keys is 6
    programs at head dim 256, each walking 16 key tiles in turn, on 132 SMs. Each split keeps
    at least two key tiles of the average user (a graphed batch's empty padding users lower
    that average, so it errs towards fewer splits). Each count is a variant of its own, compiled
    on first use (at most MAX_KEY_SPLITS). One in the interpreter and on the CPU."""
    if _INTERPRET or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms_per_program = multiprocessors(index) // programs
    return max(1, min(MAX_KEY_SPLITS, sms_per_program, keys_per_user // (2 * block_n)))


def jagged_hstu_attention_backward(
    grad_out, q, k, v, offsets, q_offsets, kind, ts, alpha: float, norm: float, grads=None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), written into `grads` if given (tensors shaped like q, k, v, rows of any stride)."""
    return _backward(grad_out, q, k, v, None, None, offsets, q_offsets, kind, ts, ts, alpha, norm, grads)


def jagged_split_target_attention_backward(
    grad_out, q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind, context_ts,
    target_ts, alpha: float, norm: float, grads=None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq_t, dk_context, dv_context, dk_t, dv_t), written into `grads` if given."""
    return _backward(grad_out, q_t, k_context, v_context, k_t, v_t, context_offsets, target_offsets, context_kind,
                     context_ts, target_ts, alpha, norm, grads)


def _backward(grad_out, q, k, v, k_self, v_self, offsets, q_offsets, kind, ts, ts_self, alpha, norm, grads):
    """With k_self None, the merged layout: (dq, dk, dv); else (dq, dk, dv, dk_self, dv_self)."""
    split = k_self is not None
    q, k, v, grad_out = _rows(q), _rows(k), _rows(v), _rows(grad_out)
    k_self, v_self = (_rows(k_self), _rows(v_self)) if split else (k, v)
    inputs = (q, k, v, k_self, v_self) if split else (q, k, v)
    if grads is None:
        grads = [t.new_empty(t.shape) for t in inputs]
    elif any(g.stride(-1) != 1 for g in grads):
        raise ValueError("hstu attention backward: the given gradients need unit stride along their last dim")
    dq, dk, dv = grads[:3]
    users = offsets.shape[0] - 1
    group = q.shape[1] // k.shape[1]
    strides = _head_strides(q, k, v, k_self, v_self, grad_out, dq, dk, dv)
    args = (offsets, q_offsets, kind, ts, ts_self, users, *strides, 0.5 * alpha, 1.0 / norm)
    if k.shape[0] > 0:
        (block_m, block_n, warps, stages), flags = _launch_params("dkdv", q, split)
        heads, block_m = _heads_per_tile(q, group, block_m)
        _dkdv_kernel[(k.shape[0] // block_n + users, k.shape[1])](
            q, k, v, k_self, v_self, grad_out, dk, dv, *args,
            GROUP=group, HEADS=heads, BLOCK_M=block_m, BLOCK_N=block_n, D=q.shape[2], DV=v.shape[2], SPLIT=split,
            num_warps=warps, num_stages=stages, **flags,
        )
    if q.shape[0] == 0:
        return tuple(grads)
    if split:
        dk_self, dv_self = grads[3:]
        _, flags = _launch_params("dkdv", q)
        _self_dkdv_kernel[(triton.cdiv(q.shape[0], _SELF_BLOCK), k.shape[1])](
            q, k_self, v_self, grad_out, dk_self, dv_self, q.shape[0],
            *_head_strides(q, k_self, v_self, grad_out, dk_self, dv_self), 0.5 * alpha, 1.0 / norm,
            GROUP=group, BLOCK=_SELF_BLOCK, D=q.shape[2], DV=v.shape[2], FAST=flags["FAST"], num_warps=4,
        )
    (block_m, block_n, warps, stages), flags = _launch_params("dq", q, split)
    query_blocks, head_programs, heads, block_m = _query_grid(q, k, users, block_m)
    _dq_kernel[(query_blocks, head_programs)](
        q, k, v, k_self, v_self, grad_out, dq, *args,
        GROUP=group, HEADS=heads, BLOCK_M=block_m, BLOCK_N=block_n, D=q.shape[2], DV=v.shape[2], SPLIT=split,
        num_warps=warps, num_stages=stages, **flags,
    )
    return tuple(grads)
