"""A replica's cache of encoded user sides, per user for a short TTL, keyed by the user's
sequence state (`RankRequest.user_state`: a digest of the user id and every event).

A user side depends only on the user's H and R events and the model, so a hit is exact: the
same events give the same keys and values. Entries expire after `ttl_s` (a user's realtime
sequence changes within minutes) and the least recently used go first once the cached
tensors exceed `max_bytes`.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import torch

from mtfm.model import UserSide


class UserSideCache:
    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self.entries: OrderedDict[str, tuple[float, int, UserSide]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str) -> UserSide | None:
        entry = self.entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry[2]

    def put(self, key: str, side: UserSide) -> None:
        if key in self.entries:
            self._drop(key)
        size = user_side_bytes(side)
        self.entries[key] = (time.monotonic() + self.ttl_s, size, side)
        self.bytes += size
        while self.bytes > self.max_bytes and self.entries:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: str) -> None:
        self.bytes -= self.entries.pop(key)[1]


def split_users(side: UserSide) -> list[UserSide]:
    """One `UserSide` per user of a batched one. Each user's keys and values are copied out of
    a batch of several: a view would keep the whole batch's block alive, unseen by the cache's
    byte count."""
    bounds = side.offsets.tolist()
    out = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = slice(start, end)
        kv = side.kv[:, :, rows] if len(bounds) == 2 else side.kv[:, :, rows].clone()
        out.append(UserSide(side.user_id[b:b + 1], side.offsets.new_tensor([0, end - start]), side.kind[rows],
                            side.ts[rows], kv))
    return out


def merge_users(sides: list[UserSide]) -> UserSide:
    """The batched `UserSide` of several one-user ones."""
    counts = torch.tensor([len(s.kind) for s in sides], dtype=torch.int64)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(sides[0].offsets.device)
    return UserSide(torch.cat([s.user_id for s in sides]), offsets, torch.cat([s.kind for s in sides]),
                    torch.cat([s.ts for s in sides]), torch.cat([s.kv for s in sides], dim=2))


def user_side_bytes(side: UserSide) -> int:
    """What a cached entry holds on the device: its tensors' bytes."""
    tensors = [side.kind, side.ts, side.kv]
    return sum(t.numel() * t.element_size() for t in tensors)
