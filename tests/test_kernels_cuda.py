"""The attention kernels as training and serving run them: bfloat16 inputs on CUDA (tanh.approx,
P and dS rounded to bf16 before their products, query heads packed at head dim 256), against the
PyTorch reference in float64. Skipped without CUDA (CI). Not under tests/kernels/, whose conftest
makes Triton interpret the kernels on the CPU, and the interpreter has no bf16 arithmetic.
Run on a GPU machine on its own or with tests/model/test_model_cuda.py, not with tests/kernels/."""
from __future__ import annotations

import pytest
import torch

from mtfm.kernels.hstu_attention import hstu_attention, hstu_split_target_attention, hstu_target_attention
from mtfm.kernels.mask import TokenKind

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the Triton kernels")
CUDA = torch.device("cuda")
# (history, realtime, targets) per user: long and short users, targets only, no targets.
USERS = [(700, 90, 150), (180, 25, 40), (0, 0, 7), (60, 10, 0), (300, 0, 60)]
# bf16 keeps 8 bits of mantissa: relative errors of about 2e-3 on the H200 (bench/RESULTS.md).
TOLERANCE = 1e-2


def jagged_batch(hq: int, hkv: int, d: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    kinds, stamps, lengths, targets = [], [], [], []
    for n_h, n_r, n_t in USERS:
        stamps.append(torch.cat([torch.randint(0, 5000, (n_h,), generator=g).sort().values,
                                 torch.randint(5000, 6000, (n_r,), generator=g).sort().values,
                                 torch.randint(5500, 6500, (n_t,), generator=g)]))
        kinds.append(torch.tensor([TokenKind.H] * n_h + [TokenKind.R] * n_r + [TokenKind.T] * n_t, dtype=torch.int8))
        lengths.append(n_h + n_r + n_t)
        targets.append(n_t)
    n = sum(lengths)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    target_rows = torch.cat([torch.arange(end - t, end) for end, t in zip(offsets[1:].tolist(), targets)])
    return {name: t.to(CUDA) for name, t in dict(
        q=torch.randn(n, hq, d, generator=g), k=torch.randn(n, hkv, d, generator=g),
        v=torch.randn(n, hkv, d, generator=g), grad=torch.randn(n, hq, d, generator=g),
        offsets=offsets, target_offsets=torch.tensor([0] + targets).cumsum(0), kind=torch.cat(kinds),
        ts=torch.cat(stamps), target_rows=target_rows).items()}


def outputs_and_grads(b: dict, dtype: torch.dtype, impl: str) -> dict:
    alpha, norm = 1.0 / b["q"].shape[2] ** 0.5, 1000.0
    meta = (b["offsets"], b["kind"], b["ts"])
    rows = b["target_rows"]
    q, k, v = (b[name].to(dtype).requires_grad_() for name in "qkv")
    out = hstu_attention(q, k, v, *meta, alpha=alpha, norm=norm, impl=impl)
    out.backward(b["grad"].to(dtype))
    result = dict(full=out, full_dq=q.grad, full_dk=k.grad, full_dv=v.grad)

    q_t, k, v = (t.detach().clone().requires_grad_() for t in (q[rows], k, v))
    out = hstu_target_attention(q_t, k, v, *meta, b["target_offsets"], alpha=alpha, norm=norm, impl=impl)
    out.backward(b["grad"][rows].to(dtype))
    result |= dict(target=out, target_dq=q_t.grad, target_dk=k.grad, target_dv=v.grad)

    is_target = torch.zeros(b["k"].shape[0], dtype=torch.bool, device=CUDA)
    is_target[rows] = True
    context = (~is_target).nonzero().squeeze(1)
    q_t, k_c, v_c, k_t, v_t = (t.detach().clone().requires_grad_() for t in (q[rows], k[context], v[context],
                                                                            k[rows], v[rows]))
    out = hstu_split_target_attention(q_t, k_c, v_c, k_t, v_t, b["offsets"] - b["target_offsets"], b["target_offsets"],
                                      b["kind"][context], b["ts"][context], b["ts"][rows], alpha=alpha, norm=norm,
                                      impl=impl)
    out.backward(b["grad"][rows].to(dtype))
    result |= dict(split=out, split_dq=q_t.grad, split_dk_context=k_c.grad, split_dv_context=v_c.grad,
                   split_dk_t=k_t.grad, split_dv_t=v_t.grad)
    return {name: t.detach().double() for name, t in result.items()}


@pytest.mark.parametrize("hq,hkv,d", [(2, 1, 256), (4, 2, 128), (3, 3, 64)])
def test_bf16_triton_attention_is_the_float64_reference_to_bf16_rounding(hq, hkv, d):
    b = jagged_batch(hq, hkv, d, seed=hq * 100 + d)
    expected = outputs_and_grads(b, torch.float64, "reference")
    found = outputs_and_grads(b, torch.bfloat16, "triton")
    errors = {name: ((found[name] - ref).norm() / ref.norm()).item() for name, ref in expected.items()}
    assert all(error < TOLERANCE for error in errors.values()), errors
