"""linear_silu, silu_backward_bias_grad and linear against autograd of F.silu(F.linear(...)) and
F.linear(...) in float64."""
import pytest
import torch
import torch.nn.functional as F

from mtfm.kernels import linear_silu_triton
from mtfm.kernels.linear_silu import bias_grad, linear, linear_silu, silu_backward_bias_grad


def autograd_reference(h, weight, bias, grad_y):
    """Output and gradients of the plain ops, in float64."""
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, weight, bias))
    y = F.silu(F.linear(h64, w64, b64))
    y.backward(grad_y.double())
    return y.detach(), h64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rows, cols", [(0, 24), (1, 40), (37, 24), (70, 300)])
def test_silu_backward_bias_grad_matches_autograd(impl, rows, cols):
    """Row counts that leave partial row blocks and several row ranges, columns that leave a partial
    column block; dy with a row stride wider than its columns (a column block of a wider buffer)."""
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    pre = 3 * torch.randn(rows, cols, generator=g)
    grad_y = torch.randn(rows, cols + 5, generator=g)[:, :cols]
    z = pre.double().requires_grad_()
    F.silu(z).backward(grad_y.double())
    grad_pre, grad_bias = silu_backward_bias_grad(grad_y, pre, impl=impl)
    torch.testing.assert_close(grad_pre.double(), z.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_bias.double(), z.grad.sum(0), rtol=1e-5, atol=1e-5)
    assert grad_pre.dtype == pre.dtype and grad_bias.dtype == torch.float32


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_silu_backward_in_place_over_the_pre_activation(impl):
    """grad_pre may be pre itself (the K/V projections of a run of target layers reuse the buffer)."""
    pre = torch.randn(50, 64, dtype=torch.float64 if impl == "reference" else torch.float32)
    grad_y = torch.randn_like(pre)
    expected = silu_backward_bias_grad(grad_y, pre.clone(), impl=impl)
    buffer = pre.clone()
    grad_pre, grad_bias = silu_backward_bias_grad(grad_y, buffer, buffer, impl=impl)
    assert grad_pre.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(grad_pre, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(grad_bias, expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_linear_silu_output_and_gradients_match_autograd(impl):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(45, 20, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(36, 20, generator=g)).requires_grad_()
    bias = torch.randn(36, generator=g, requires_grad=True)
    grad_y = torch.randn(45, 36, generator=g)
    y = linear_silu(h, weight, bias, impl=impl)
    y.backward(grad_y)
    expected = autograd_reference(h, weight, bias, grad_y)
    for name, actual, exact in zip(("y", "dh", "dweight", "dbias"), (y.detach(), h.grad, weight.grad, bias.grad),
                                   expected):
        torch.testing.assert_close(actual.double(), exact, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("op, plain", [(linear_silu, lambda *a: F.silu(F.linear(*a))), (linear, F.linear)])
def test_projections_under_autocast_compute_in_the_autocast_dtype(op, plain):
    """As F.linear under autocast: bfloat16 output, float32 gradients of float32 leaves."""
    h = torch.randn(16, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(h, weight, bias, impl="reference")
        expected = plain(h, weight, bias)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert weight.grad.dtype == bias.grad.dtype == h.grad.dtype == torch.float32


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_linear_silu_gradients_of_the_parameters_alone(impl):
    """h without a gradient (an input, not an activation): only the weight's and bias's come back."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(30, 12, generator=g)
    weight = torch.randn(20, 12, generator=g, requires_grad=True)
    bias = torch.randn(20, generator=g, requires_grad=True)
    grad_y = torch.randn(30, 20, generator=g)
    linear_silu(h, weight, bias, impl=impl).backward(grad_y)
    _, _, dweight, dbias = autograd_reference(h, weight, bias, grad_y)
    torch.testing.assert_close(weight.grad.double(), dweight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), dbias, rtol=1e-4, atol=1e-5)


def test_linear_silu_has_no_second_derivative():
    """Its backward is one opaque pass: differentiating it again raises, rather than giving a wrong
    second derivative."""
    h = torch.randn(5, 4, requires_grad=True)
    y = linear_silu(h, torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True), impl="reference")
    (grad,) = torch.autograd.grad(y.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"linear_silu: h \(4, 3\), weight \(5, 2\)"):
        linear_silu(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match=r"linear: h \(4, 3\), weight \(5, 3\), bias \(4,\)"):
        linear(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="grad_y"):
        silu_backward_bias_grad(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unit column stride"):
        silu_backward_bias_grad(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3, 4).t())


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rows, wrt", [(45, "all"), (70, "parameters"), (0, "all")])
def test_linear_output_and_gradients_match_autograd(impl, rows, wrt):
    """The plain projection: output and gradients against F.linear's autograd in float64 (row counts
    that leave partial row blocks and several row ranges of the bias sum, an empty batch); h without
    a gradient gives the parameters' alone."""
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 20, generator=g, requires_grad=wrt == "all")
    weight = (0.3 * torch.randn(36, 20, generator=g)).requires_grad_()
    bias = torch.randn(36, generator=g, requires_grad=True)
    grad_y = torch.randn(rows, 36, generator=g)
    y = linear(h, weight, bias, impl=impl)
    y.backward(grad_y)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, weight, bias))
    y64 = F.linear(h64, w64, b64)
    y64.backward(grad_y.double())
    torch.testing.assert_close(y.detach().double(), y64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    if wrt == "all":
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    else:
        assert h.grad is None


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bias_grad_sums_bfloat16_rows_in_float32(impl, monkeypatch):
    """The plain column sum of 3,000 bfloat16 rows against float64: a float32 result, as close as
    float32 accumulation gets (a bfloat16 sum would be off by about 1e-2 relative); the Triton
    implementation is the one run for impl="triton"."""
    calls = []
    real = linear_silu_triton.bias_grad
    monkeypatch.setattr(linear_silu_triton, "bias_grad", lambda g: calls.append(g) or real(g))
    grad_y = (torch.randn(3000, 70, generator=torch.Generator().manual_seed(5)) + 0.5).to(torch.bfloat16)
    total = bias_grad(grad_y, impl=impl)
    assert total.dtype == torch.float32 and len(calls) == (impl == "triton")
    torch.testing.assert_close(total.double(), grad_y.double().sum(0), rtol=1e-5, atol=1e-4)


def test_impl_triton_refuses_dtypes_the_kernels_do_not_take():
    """As the GLN and attention dispatchers do: "triton" names the op and the dtype where "auto" would
    take the reference (float64)."""
    h = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    for op, call in (("linear_silu", lambda: linear_silu(h, weight, bias, impl="triton")),
                     ("linear", lambda: linear(h, weight, bias, impl="triton")),
                     ("silu_backward_bias_grad", lambda: silu_backward_bias_grad(h, h.detach(), impl="triton")),
                     ("bias_grad", lambda: bias_grad(h.detach(), impl="triton"))):
        with pytest.raises(ValueError, match=rf"^{op}: impl='triton' does not support these inputs: dtype torch.float64"):
            call()


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_silu_bias_grad_of_bfloat16_sums_dpre_before_rounding(impl):
    """pre = dy = 1 in bfloat16, by hand: s = sigmoid(1) = 0.73105858, dpre = s (1 + (1 - s)) = 0.92767051,
    which rounds to 0.92578125 in bfloat16. db sums the float32 dpre over the 64 rows (64 x 0.92767051 =
    59.370913), not the rounded one (59.25, 2e-3 off)."""
    pre = torch.ones(64, 8, dtype=torch.bfloat16)
    grad_pre, grad_bias = silu_backward_bias_grad(torch.ones_like(pre), pre, impl=impl)
    assert grad_bias.dtype == torch.float32 and grad_pre.dtype == torch.bfloat16
    assert grad_bias.tolist() == pytest.approx([64 * 0.92767051] * 8, rel=1e-6)
    assert grad_pre.float().unique().tolist() == [0.92578125]
