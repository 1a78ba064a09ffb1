"""PyTorch reference of merging two row sets into one packed axis: the specification.

    out[r] = first[source[r]]                     if source[r] < len(first)
           = second[source[r] - len(first)]       otherwise

first (N1, ...), second (N2, ...) of one dtype and trailing shape, source (N,) int64, each
index of [0, N1 + N2) at most once when the merge is a permutation (the model's use: the H and R
rows and the T rows of a batch back on its token axis), though any indices in range are valid.
"""

import torch
from torch import Tensor


def merge_rows(first: Tensor, second: Tensor, source: Tensor) -> Tensor:
    return torch.cat([first, second]).index_select(0, source)
