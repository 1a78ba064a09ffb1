"""Which implementation of a kernel runs: the `impl` argument of every dispatcher.

"reference": the PyTorch reference (any device). "triton": the Triton kernel, on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported (CI).
"auto": Triton on CUDA tensors, the reference elsewhere (and for inputs the kernels do not
cover, such as float64; the dispatchers check that).
"""

import functools
import importlib.util
import os
from typing import Callable

import torch

IMPLS = ("auto", "triton", "reference")


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


def resolve_impl(impl: str, device: torch.device) -> str:
    """'triton' or 'reference' for a call with tensors on `device`; raises on a bad request."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "reference"
    if impl == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}")
    return impl


@functools.cache
def multiprocessors(device_index: int) -> int:
    """The streaming multiprocessors of CUDA device `device_index`: what kernels size their grids by."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
