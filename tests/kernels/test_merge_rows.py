"""merge_rows against a hand-worked case and against rows placed one by one."""
import pytest
import torch

from mtfm.kernels import merge_rows_triton
from mtfm.kernels.merge_rows import merge_rows


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton implementation's calls, so that a test of impl="triton" fails if it is not run."""
    calls = []
    real = merge_rows_triton.merge_rows
    monkeypatch.setattr(merge_rows_triton, "merge_rows", lambda *args: calls.append(args) or real(*args))
    return calls


def placed_one_by_one(first, second, source):
    out = torch.empty((len(source),) + first.shape[1:], dtype=first.dtype)
    for r, s in enumerate(source.tolist()):
        out[r] = first[s] if s < len(first) else second[s - len(first)]
    return out


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_merge_rows_hand_worked(impl, kernel_calls):
    """H H T R T H T: the context rows 0 1 3 5 and T rows 2 4 6 back in place; the index as a strided
    view (every other element of a wider one) reads as its values."""
    first = torch.tensor([[0.0, 1.0], [2.0, 3.0], [6.0, 7.0], [10.0, 11.0]])
    second = torch.tensor([[4.0, 5.0], [8.0, 9.0], [12.0, 13.0]])
    source = torch.tensor([0, 1, 4, 2, 5, 3, 6])
    strided = torch.stack([source, torch.full_like(source, 99)], 1)[:, 0]
    for index in (source, strided):
        assert torch.equal(merge_rows(first, second, index, impl=impl), torch.arange(14.0).view(7, 2))
    assert len(kernel_calls) == (2 if impl == "triton" else 0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_first, n_second, cols", [(0, 5, 8), (37, 0, 3), (37, 21, 70), (5, 40, 1)])
def test_merge_rows_matches_rows_placed_one_by_one(impl, dtype, n_first, n_second, cols, kernel_calls):
    """A random permutation of both sets (partial row and column blocks, an empty set, a width of one),
    trailing dims flattened and restored, and a first set with a row stride wider than its columns."""
    g = torch.Generator().manual_seed(n_first * 100 + n_second + cols)
    first = torch.randn(n_first, cols + 3, generator=g).to(dtype)[:, :cols]
    second = torch.randn(n_second, cols, generator=g).to(dtype)
    source = torch.randperm(n_first + n_second, generator=g)
    out = merge_rows(first, second, source, impl=impl)
    assert out.dtype == dtype and torch.equal(out, placed_one_by_one(first, second, source))
    if cols % 2 == 0 and cols:
        first3, second3 = first.contiguous().view(n_first, 2, cols // 2), second.view(n_second, 2, cols // 2)
        assert torch.equal(merge_rows(first3, second3, source, impl=impl), out.view(-1, 2, cols // 2))
    assert bool(kernel_calls) == (impl == "triton")


def test_merge_rows_refuses_mismatched_sets():
    with pytest.raises(ValueError, match="trailing shape"):
        merge_rows(torch.zeros(2, 3), torch.zeros(2, 4), torch.arange(4))
    with pytest.raises(ValueError, match="int64"):
        merge_rows(torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="impl='triton' does not support these inputs: dtype torch.float64"):
        merge_rows(*torch.zeros(2, 2, 3, dtype=torch.float64), torch.arange(4), impl="triton")
