"""Which implementation of a kernel runs: the `impl` argument of every dispatcher.

"reference": the PyTorch reference (any device). "triton": the Triton kernel, on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported (CI).
"auto": Triton on CUDA tensors, the reference elsewhere, and for inputs the kernels do not cover
(such as float64), which `impl="triton"` refuses: each op's Triton module says which those are
(`unsupported_reason`), and `resolve_impl` acts on it for every dispatcher.
"""

import functools
import importlib.util
import os
from typing import Callable

import torch

IMPLS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the references take
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take


def dtype_unsupported_reason(dtype: torch.dtype, what: str = "dtype") -> str | None:
    """Why the Triton kernels cannot take `dtype`, or None."""
    if dtype in KERNEL_DTYPES:
        return None
    return f"{what} {dtype}; the kernels take float16, bfloat16 or float32"


def check_argument(op: str, name: str, ok: bool, found, expected: str | Callable[[], str]) -> None:
    """A dispatcher's check of one argument: raises ValueError naming the op, the argument, what was
    found and what was expected. `found` and `expected` may be functions building the text: they then
    run only on failure (formatting a shape in every call costs host time and makes torch.compile
    specialise on it)."""
    if not ok:
        found, expected = (part() if callable(part) else part for part in (found, expected))
        raise ValueError(f"{op}: {name} is {found}, expected {expected}")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton implementation cannot run on `device`, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None if device.type == "cpu" else f"the Triton interpreter runs on CPU tensors, not {device.type}"
    return (
        f"Triton kernels need CUDA tensors, got {device.type} tensors; for CPU tensors set "
        "TRITON_INTERPRET=1 before triton is imported"
    )


def resolve_impl(impl: str, device: torch.device, op: str = "",
                 unsupported: Callable[[], str | None] | None = None) -> str:
    """'triton' or 'reference' for a call of `op` with tensors on `device`; raises on a bad request.
    `unsupported()`, asked only where Triton would run, says why the kernels do not cover these inputs
    (or None): "auto" then takes the reference, "triton" raises ValueError naming the op."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        chosen = "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "reference"
    else:
        chosen = impl
        reason = triton_unavailable_reason(device) if impl == "triton" else None
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}")
    if chosen == "triton" and unsupported is not None:
        reason = unsupported()
        if reason is not None and impl == "triton":
            raise ValueError(f"{op}: impl='triton' does not support these inputs: {reason}")
        if reason is not None:
            chosen = "reference"
    return chosen


@functools.cache
def multiprocessors(device_index: int) -> int:
    """The streaming multiprocessors of CUDA device `device_index`: what kernels size their grids by."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
