"""The Triton kernels are not specialised on what changes from batch to batch.

Triton compiles one variant per specialisation key: an integer argument is keyed on == 1 and
on divisibility by 16, a pointer on 16-byte alignment. The launches below record the arguments
of two batches that differ in exactly those ways (user and row counts, metadata views at odd
offsets, as `TokenBatch.to` hands them out) instead of running the kernels; every argument whose
key differs between the two must be one the kernel does not specialise on.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from mtfm.kernels import group_layer_norm_triton as gln
from mtfm.kernels import hstu_attention_triton as attention


def _key(value):
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1, value % 16 == 0
    return None


def _unspecialised(kernel) -> set[str]:
    names = inspect.signature(kernel.fn).parameters
    listed = getattr(kernel, "do_not_specialize", None)
    if listed is None:  # the interpreter's wrapper (TRITON_INTERPRET=1) keeps the jit arguments
        listed = kernel.kwargs.get("do_not_specialize", ())
    return {p if isinstance(p, str) else list(names)[p] for p in listed}


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **constexprs)` records the positional (runtime)
    arguments by name; the constexprs are compile-time constants by design."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.calls.append(dict(zip(inspect.signature(self.kernel.fn).parameters, args)))
        return launch


def _record(monkeypatch, module, names, run) -> dict[str, list[dict]]:
    recorders = {name: _Recorder(getattr(module, name)) for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module, name, recorder)
    run()
    return {name: r.calls for name, r in recorders.items()}


def _assert_varying_args_unspecialised(first, second, kernels):
    for name, kernel in kernels.items():
        assert len(first[name]) == len(second[name]) == 1, name
        a, b = first[name][0], second[name][0]
        varying = {arg for arg in a if _key(a[arg]) != _key(b[arg])}
        assert varying, f"{name}: the two batches should differ in some specialisation key"
        assert varying <= _unspecialised(kernel), f"{name} specialises on {varying - _unspecialised(kernel)}"


def _attention_inputs(users: int, misaligned: bool):
    lengths = [24 + (u % 3) for u in range(users)]
    n, shift = sum(lengths), int(misaligned)
    offsets = torch.zeros(users + 1 + shift, dtype=torch.int64)
    offsets[shift + 1:] = torch.tensor(lengths).cumsum(0)
    kind = torch.zeros(n + shift, dtype=torch.int8)
    ts = torch.arange(n + shift, dtype=torch.int64)
    q, k, v = torch.randn(n, 2, 64), torch.randn(n, 1, 64), torch.randn(n, 1, 64)
    offsets, kind, ts = offsets[shift:], kind[shift:], ts[shift:]
    return q, k, v, offsets, offsets, kind, ts


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_attention_kernels_do_not_specialise_on_batch_sizes_or_metadata_alignment(monkeypatch, direction):
    names = ["_fwd_kernel"] if direction == "forward" else ["_dkdv_kernel", "_dq_kernel"]
    kernels = {name: getattr(attention, name) for name in names}

    def launches(users, misaligned):
        q, k, v, offsets, q_offsets, kind, ts = _attention_inputs(users, misaligned)
        if direction == "forward":
            run = lambda: attention.jagged_hstu_attention(q, k, v, offsets, q_offsets, kind, ts, 1.0, 8.0)  # noqa: E731
        else:
            grad = torch.randn(q.shape[0], q.shape[1], v.shape[2])
            run = lambda: attention.jagged_hstu_attention_backward(  # noqa: E731
                grad, q, k, v, offsets, q_offsets, kind, ts, 1.0, 8.0)
        return _record(monkeypatch, attention, names, run)

    first = launches(16, misaligned=False)
    monkeypatch.undo()
    _assert_varying_args_unspecialised(first, launches(17, misaligned=True), kernels)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_split_target_attention_kernels_do_not_specialise_on_batch_sizes_or_metadata_alignment(monkeypatch,
                                                                                               direction):
    """The same for split target attention: 3 T rows per user, its offsets and ts views at odd offsets."""
    names = ["_fwd_kernel"] if direction == "forward" else ["_dkdv_kernel", "_self_dkdv_kernel", "_dq_kernel"]
    kernels = {name: getattr(attention, name) for name in names}

    def launches(users, misaligned):
        _, k, v, offsets, _, kind, ts = _attention_inputs(users, misaligned)
        shift, n_t = int(misaligned), 3 * users
        target_offsets = torch.cat([torch.zeros(1 + shift, dtype=torch.int64), torch.arange(1, users + 1) * 3])[shift:]
        target_ts = (torch.arange(n_t + shift, dtype=torch.int64) + 100)[shift:]
        q_t, k_t, v_t = torch.randn(n_t, 2, 64), torch.randn(n_t, 1, 64), torch.randn(n_t, 1, 64)
        args = (q_t, k, v, k_t, v_t, offsets, target_offsets, kind, ts, target_ts, 1.0, 8.0)
        if direction == "forward":
            run = lambda: attention.jagged_split_target_attention(*args)  # noqa: E731
        else:
            grad = torch.randn(n_t, 2, 64)
            run = lambda: attention.jagged_split_target_attention_backward(grad, *args)  # noqa: E731
        return _record(monkeypatch, attention, names, run)

    first = launches(16, misaligned=False)
    monkeypatch.undo()
    _assert_varying_args_unspecialised(first, launches(17, misaligned=True), kernels)


def test_group_layer_norm_kernels_do_not_specialise_on_the_row_count(monkeypatch):
    kernels = {"_gln_fwd_kernel": gln._gln_fwd_kernel, "_gln_bwd_kernel": gln._gln_bwd_kernel}

    def launches(rows, groups):
        monkeypatch.setattr(gln, "multiprocessors", lambda index: 4)  # no GPU to ask; the grid is not checked
        x, group = torch.randn(rows, 64), torch.arange(rows) % groups
        weight, bias = torch.ones(groups, 64), torch.zeros(groups, 64)

        def run():
            gln.group_layer_norm(x, group, weight, bias, 1e-5)
            gln.group_layer_norm_backward(torch.randn_like(x), x, group, weight, 1e-5)
        return _record(monkeypatch, gln, list(kernels), run)

    first = launches(32, groups=3)
    monkeypatch.undo()
    _assert_varying_args_unspecialised(first, launches(33, groups=1), kernels)


def test_stacked_group_layer_norm_kernels_do_not_specialise_on_the_row_count(monkeypatch):
    """Stacked sets (a run of target layers) are rows x features apart: 32 x 24 and 33 x 24 differ in
    divisibility by 16, as the row counts do."""
    kernels = {"_gln_fwd_kernel": gln._gln_fwd_kernel, "_gln_stacked_bwd_kernel": gln._gln_stacked_bwd_kernel}

    def launches(rows, groups):
        monkeypatch.setattr(gln, "multiprocessors", lambda index: 4)
        x, group = torch.randn(rows, 24), torch.arange(rows) % groups
        weight, bias = torch.ones(3, groups, 24), torch.zeros(3, groups, 24)

        def run():
            gln.group_layer_norm_stacked(x, group, weight, bias, 1e-5)
            gln.group_layer_norm_stacked_backward(torch.randn(3, rows, 24), x, group, weight, 1e-5)
        return _record(monkeypatch, gln, list(kernels), run)

    first = launches(32, groups=3)
    monkeypatch.undo()
    second = launches(33, groups=1)
    assert {"stride_y_set", "stride_dy_set"} <= {arg for k in kernels for arg in first[k][0]
                                                 if _key(first[k][0][arg]) != _key(second[k][0][arg])}
    _assert_varying_args_unspecialised(first, second, kernels)
