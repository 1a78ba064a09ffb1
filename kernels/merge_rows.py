"""Public op merging two row sets into one packed axis, with dispatch.

    merge_rows(first, second, source, *, impl="auto") -> (N, ...)
    out[r] = first[source[r]] if source[r] < len(first) else second[source[r] - len(first)]

The HTA stack's token split (`mtfm.model.token_split`) puts a batch's H and R rows and its T rows
back on the token axis with it, in the forward before a full layer and in the backward of each
split. No autograd of its own: the callers' Functions pair it with the gathers that invert it.
Under torch.compile it is the reference (a concatenation and a gather), which compile fuses.
"""

import torch
from torch import Tensor

from . import merge_rows_reference as reference
from .backends import dtype_unsupported_reason, resolve_impl


def merge_rows(first: Tensor, second: Tensor, source: Tensor, *, impl: str = "auto") -> Tensor:
    """(len(source), *first.shape[1:]): row r is row source[r] of first and second concatenated.
    source: int64 on the rows' device, its values in [0, len(first) + len(second)) (not checked:
    that would cost a host sync; the kernel would read out of bounds)."""
    if first.shape[1:] != second.shape[1:] or first.dtype != second.dtype or first.device != second.device:
        raise ValueError(f"merge_rows: first {tuple(first.shape)} {first.dtype} and second {tuple(second.shape)} "
                         f"{second.dtype} must share dtype, device and trailing shape")
    if source.dim() != 1 or source.dtype != torch.int64 or source.device != first.device:
        raise ValueError(f"merge_rows: source must be a 1-d int64 index on {first.device}, got {tuple(source.shape)} "
                         f"{source.dtype} on {source.device}")
    source = source.contiguous()
    chosen = resolve_impl(impl, first.device, "merge_rows", lambda: dtype_unsupported_reason(first.dtype))
    if torch.compiler.is_compiling():
        chosen = "reference"
    if chosen == "triton":
        from . import merge_rows_triton

        return merge_rows_triton.merge_rows(first, second, source)
    return reference.merge_rows(first, second, source)
