"""Token kinds and the MTFM dynamic attention mask (paper 2.2.2), as a dense reference.

Key j is visible to query i (same user) iff
    kind_j == H, or (kind_j == R and ts_j < ts_i), or i == j.
Inside a user the tokens are ordered H (any ts), R (sorted by ts), T (grouped by scenario,
each group sorted by ts), so T-tokens are the last tokens of each user. The kernels rely on
that order to skip empty tiles; this dense builder does not.
"""

import enum

import torch
from torch import Tensor


class TokenKind(enum.IntEnum):
    H = 0  # history: behaviour before the aggregation window, visible to every token
    R = 1  # realtime: behaviour inside the window, visible only to later tokens
    T = 2  # target: a candidate exposure, visible only to itself


def dynamic_mask_block(kind_k: Tensor, ts_k: Tensor, ts_q: Tensor, q_index: Tensor | None) -> Tensor:
    """Visibility of keys (kind_k, ts_k: (L,)) to queries at key positions q_index (M,), or to
    queries that are none of the keys (q_index None: no key is the query itself).

    Returns a (M, L) bool tensor; ts_q (M,) are the queries' timestamps.
    """
    history = (kind_k == TokenKind.H)[None, :]
    earlier_realtime = (kind_k == TokenKind.R)[None, :] & (ts_k[None, :] < ts_q[:, None])
    if q_index is None:
        return history | earlier_realtime
    keys = torch.arange(kind_k.shape[0], device=kind_k.device)
    return history | earlier_realtime | (keys[None, :] == q_index[:, None])


def build_dynamic_mask(offsets: Tensor, kind: Tensor, ts: Tensor) -> list[Tensor]:
    """One dense (L_b, L_b) bool mask per user b; mask[i, j] says key j is visible to query i.

    offsets: (B+1,) int64, user b owns rows offsets[b]:offsets[b+1];
    kind: (N,) int8 TokenKind; ts: (N,) int64 milliseconds.
    """
    bounds = offsets.tolist()
    masks = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        kind_b, ts_b = kind[start:end], ts[start:end]
        rows = torch.arange(end - start, device=kind.device)
        masks.append(dynamic_mask_block(kind_b, ts_b, ts_b, rows))
    return masks
