"""Group LayerNorm: the Triton kernels against the reference, the reference against
torch's LayerNorm and against autograd, the op registration and the dispatcher's errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.kernels import group_layer_norm_reference as reference
from mtfm.kernels.group_layer_norm import group_layer_norm, group_layer_norm_residual


def make_inputs(n, d, groups, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(n, d, generator=g, dtype=dtype) * 3 + 1,
        group=torch.randint(0, groups, (n,), generator=g),
        weight=torch.randn(groups, d, generator=g, dtype=dtype),
        bias=torch.randn(groups, d, generator=g, dtype=dtype),
        grad=torch.randn(n, d, generator=g, dtype=dtype),
    )


def forward_and_grads(inputs, impl):
    x, weight, bias = (inputs[name].clone().requires_grad_() for name in ("x", "weight", "bias"))
    out = group_layer_norm(x, inputs["group"], weight, bias, eps=1e-5, impl=impl)
    out.backward(inputs["grad"])
    return out.detach(), x.grad, weight.grad, bias.grad


@settings(max_examples=6, deadline=None)
@given(n=st.integers(0, 70), d=st.sampled_from([8, 24, 64, 100]), groups=st.integers(1, 20),
       seed=st.integers(0, 2**31))
def test_triton_matches_reference(n, d, groups, seed):
    inputs = make_inputs(n, d, groups, seed)
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), forward_and_grads(inputs, "triton"),
                          forward_and_grads(inputs, "reference")):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n, groups", [(300, 5), (41, 2), (16, 1)])
def test_triton_backward_over_runs_of_groups(n, groups):
    """Groups in runs (a user's tokens of one sequence or scenario), as the model has them: the
    backward's blocks that continue a run, start one, or hold a boundary, over programs whose
    ranges split runs; the same group recurring after others."""
    inputs = make_inputs(n, 24, groups, seed=n)
    runs = torch.randint(1, 40, (n,), generator=torch.Generator().manual_seed(n))
    run_groups = torch.randint(0, groups, (n,), generator=torch.Generator().manual_seed(n + 1))
    inputs["group"] = run_groups.repeat_interleave(runs)[:n]
    for name, a, e in zip(("out", "dx", "dweight", "dbias"), forward_and_grads(inputs, "triton"),
                          forward_and_grads(inputs, "reference")):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bfloat16_x_with_float32_affine_as_under_autocast(impl):
    """The model hands its float32 affine parameters to the op beside a bf16 x (no cast per call):
    output and dx in bf16, dweight and dbias in float32, all against a float64 computation."""
    inputs = make_inputs(90, 40, 3, seed=5)
    inputs["x"], inputs["grad"] = inputs["x"].bfloat16(), inputs["grad"].bfloat16()
    out, dx, dweight, dbias = forward_and_grads(inputs, impl)
    assert (out.dtype, dx.dtype, dweight.dtype, dbias.dtype) == (torch.bfloat16,) * 2 + (torch.float32,) * 2
    exact = {name: t.double() for name, t in inputs.items() if name != "group"} | {"group": inputs["group"]}
    for name, got, want in zip(("out", "dx", "dweight", "dbias"), (out, dx, dweight, dbias),
                               forward_and_grads(exact, "reference")):
        tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-5  # bf16 outputs: one rounding
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_output_can_be_modified_in_place(impl):
    """The output is a tensor of its own, not a view of a buffer made inside the op (autograd refuses
    in-place ops on those): scaling it in place scales the gradients."""
    inputs = make_inputs(50, 24, 3, seed=9)
    out, dx, dweight, dbias = forward_and_grads(inputs, impl)
    x, weight, bias = (inputs[name].clone().requires_grad_() for name in ("x", "weight", "bias"))
    scaled = group_layer_norm(x, inputs["group"], weight, bias, eps=1e-5, impl=impl)
    scaled.mul_(2.0).backward(inputs["grad"])
    for name, got, want in (("out", scaled.detach(), 2 * out), ("dx", x.grad, 2 * dx),
                            ("dweight", weight.grad, 2 * dweight), ("dbias", bias.grad, 2 * dbias)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def stacked_inputs(n, d, groups, sets, seed):
    """make_inputs with weight, bias and grad for `sets` sets of affine parameters, groups in runs."""
    inputs = make_inputs(n, d, groups, seed)
    g = torch.Generator().manual_seed(seed + 1)
    runs = torch.randint(1, 30, (n,), generator=g)
    inputs["group"] = torch.randint(0, groups, (n,), generator=g).repeat_interleave(runs)[:n]
    for name, shape in (("weight", (sets, groups, d)), ("bias", (sets, groups, d)), ("grad", (sets, n, d))):
        inputs[name] = torch.randn(shape, generator=g)
    return inputs


@pytest.mark.parametrize("n, d, groups, sets", [(200, 24, 4, 3), (64, 40, 2, 5), (37, 16, 1, 2), (90, 8, 3, 1)])
def test_stacked_reference_is_each_set_on_its_own(n, d, groups, sets):
    """The stacked reference against the plain reference once per set: outputs per set, dx the sum
    of the sets' dx (dx is linear in the output gradient), dweight and dbias per set."""
    inputs = stacked_inputs(n, d, groups, sets, seed=n)
    x, group = inputs["x"].double(), inputs["group"]
    weight, bias, grad = (inputs[name].double() for name in ("weight", "bias", "grad"))
    out = reference.group_layer_norm_stacked(x, group, weight, bias, 1e-5)
    dx, dweight, dbias = reference.group_layer_norm_stacked_backward(grad, x, group, weight, 1e-5)
    expected_dx = torch.zeros_like(x)
    for s in range(sets):
        torch.testing.assert_close(out[s], reference.group_layer_norm(x, group, weight[s], bias[s], 1e-5))
        dx_s, dweight_s, dbias_s = reference.group_layer_norm_backward(grad[s], x, group, weight[s], 1e-5)
        expected_dx += dx_s
        torch.testing.assert_close(dweight[s], dweight_s)
        torch.testing.assert_close(dbias[s], dbias_s)
    torch.testing.assert_close(dx, expected_dx)


@pytest.mark.parametrize("n, d, groups, sets, sums", [(300, 24, 5, 3, None), (41, 40, 2, 4, None),
                                                     (64, 16, 1, 5, None), (50, 8, 3, 2, None), (90, 24, 4, 5, 64)])
def test_triton_stacked_matches_reference(n, d, groups, sets, sums, monkeypatch):
    """The stacked kernels (sets padded to a power of two in backward) over runs of groups; with
    `sums` set, the backward's per-set sums fit two sets per launch, so 5 sets take 3 launches."""
    from mtfm.kernels import group_layer_norm_triton as triton_impl

    if sums is not None:
        monkeypatch.setattr(triton_impl, "_BWD_STACKED_SUMS", sums)

    inputs = stacked_inputs(n, d, groups, sets, seed=n + d)
    args = inputs["x"], inputs["group"]
    out = triton_impl.group_layer_norm_stacked(*args, inputs["weight"], inputs["bias"], 1e-5, torch.bfloat16)
    expected = reference.group_layer_norm_stacked(*args, inputs["weight"], inputs["bias"], 1e-5)
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=0)  # within one bfloat16 ulp
    grads = triton_impl.group_layer_norm_stacked_backward(inputs["grad"], *args, inputs["weight"], 1e-5)
    expected_grads = reference.group_layer_norm_stacked_backward(inputs["grad"], *args, inputs["weight"], 1e-5)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_variant_sums_both_gradients_of_x(impl, dtype):
    """x + f(GLN(x)) through `group_layer_norm_residual` (x's second gradient added inside the GLN's
    backward) against the plain op, whose x autograd sums: outputs and every gradient; rows over
    several backward programs and group runs."""
    inputs = make_inputs(70, 24, 3, seed=5)
    mix = torch.randn(24, 24, generator=torch.Generator().manual_seed(6))

    def run(residual):
        x, weight, bias = (inputs[n].to(dtype if n == "x" else torch.float32).clone().requires_grad_()
                           for n in ("x", "weight", "bias"))
        if residual:
            x_res, y = group_layer_norm_residual(x, inputs["group"], weight, bias, impl=impl)
        else:
            x_res, y = x, group_layer_norm(x, inputs["group"], weight, bias, impl=impl)
        out = x_res + (y.float() @ mix).to(dtype)  # the residual add, its gradient through a matmul
        out.backward(inputs["grad"].to(dtype))
        return out.detach(), x.grad, weight.grad, bias.grad

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, got, want in zip(("out", "dx", "dweight", "dbias"), run(True), run(False)):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_backward_adds_a_strided_residual_gradient_before_rounding(impl):
    """group_layer_norm_backward's grad_residual: a view with a row stride of its own (every other
    half-row of a wider buffer), added to dx in float32 and rounded to bfloat16 once: within half a
    bfloat16 ulp of the float64 sum everywhere (adding after rounding dx is off by up to a whole ulp).
    Triton's interpreter rounds float32 to bfloat16 toward zero (the GPU to nearest): a whole ulp."""
    from mtfm.kernels.group_layer_norm import implementation

    inputs = make_inputs(70, 24, 3, seed=8)
    x = inputs["x"].to(torch.bfloat16)
    residual = torch.randn(70, 48, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)[:, :24]
    assert residual.stride(0) == 48
    dx, dweight, dbias = implementation(impl).group_layer_norm_backward(
        inputs["grad"].to(torch.bfloat16), x, inputs["group"], inputs["weight"], 1e-5, residual)
    dx64, dweight64, dbias64 = reference.group_layer_norm_backward(
        inputs["grad"].to(torch.bfloat16).double(), x.double(), inputs["group"], inputs["weight"].double(), 1e-5)
    truth = dx64 + residual.double()
    ulp = torch.where(truth == 0, 0.0, 2.0 ** (torch.floor(torch.log2(truth.abs())) - 7))
    assert dx.dtype == torch.bfloat16
    rounding = 0.505 if impl == "reference" else 1.01
    assert ((dx.double() - truth).abs() <= rounding * ulp + 1e-6 * dx64.abs()).all()  # float32 arithmetic: 1e-6
    torch.testing.assert_close(dweight.double(), dweight64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbias.double(), dbias64, rtol=1e-4, atol=1e-4)


def test_reference_with_one_group_is_layer_norm():
    inputs = make_inputs(33, 24, 1, seed=1, dtype=torch.float64)
    out = group_layer_norm(inputs["x"], inputs["group"], inputs["weight"], inputs["bias"], impl="reference")
    expected = torch.nn.functional.layer_norm(inputs["x"], (24,), inputs["weight"][0], inputs["bias"][0], eps=1e-5)
    torch.testing.assert_close(out, expected)


def test_reference_uses_each_tokens_group():
    inputs = make_inputs(40, 16, 3, seed=2, dtype=torch.float64)
    out = group_layer_norm(inputs["x"], inputs["group"], inputs["weight"], inputs["bias"], impl="reference")
    for c in range(3):
        rows = inputs["group"] == c
        expected = torch.nn.functional.layer_norm(inputs["x"][rows], (16,), inputs["weight"][c], inputs["bias"][c])
        torch.testing.assert_close(out[rows], expected)


def test_reference_backward_matches_autograd():
    inputs = make_inputs(30, 20, 4, seed=3, dtype=torch.float64)
    x, weight, bias = (inputs[name].clone().requires_grad_() for name in ("x", "weight", "bias"))
    out = reference.group_layer_norm(x, inputs["group"], weight, bias, 1e-5)
    expected = torch.autograd.grad(out, (x, weight, bias), inputs["grad"])
    actual = reference.group_layer_norm_backward(inputs["grad"], x.detach(), inputs["group"], weight.detach(), 1e-5)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_custom_op_registration_opcheck(impl):
    inputs = make_inputs(20, 16, 3, seed=4)
    args = (inputs["x"].requires_grad_(), inputs["group"], inputs["weight"].requires_grad_(),
            inputs["bias"].requires_grad_(), 1e-5, impl)
    torch.library.opcheck(torch.ops.mtfm.group_layer_norm.default, args)


def test_dispatcher_errors_name_the_argument():
    inputs = make_inputs(5, 8, 2, seed=5)
    with pytest.raises(ValueError, match="weight.shape"):
        group_layer_norm(inputs["x"], inputs["group"], inputs["weight"][:, :4], inputs["bias"])
    with pytest.raises(ValueError, match="group is"):
        group_layer_norm(inputs["x"], inputs["group"].int(), inputs["weight"], inputs["bias"])


def test_float64_is_refused_by_the_kernels_and_taken_by_auto():
    """What the kernels do not cover: impl="triton" names it, "auto" runs the reference (here on CPU anyway)."""
    inputs = make_inputs(6, 8, 2, seed=6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^group_layer_norm: impl='triton' does not support these inputs: x dtype "
                                         r"torch.float64; the kernels take float16, bfloat16 or float32$"):
        group_layer_norm(inputs["x"], inputs["group"], inputs["weight"], inputs["bias"], impl="triton")
    out = group_layer_norm(inputs["x"], inputs["group"], inputs["weight"], inputs["bias"], impl="auto")
    torch.testing.assert_close(out, group_layer_norm(inputs["x"], inputs["group"], inputs["weight"], inputs["bias"],
                                                     impl="reference"), rtol=0, atol=0)
