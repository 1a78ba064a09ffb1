"""`TokenBatch`: the jagged in-memory batch of DESIGN.md (all users' tokens packed, no padding).

Token axis (N tokens of B users): user b owns rows offsets[b]:offsets[b+1], ordered
H (by ts), R (by ts), T (grouped by scenario in registry order, each by ts). T-tokens are the
last target_offsets[b+1] - target_offsets[b] rows of user b.

Per token: kind (TokenKind as int8), group (index into `group_names`: the GLN group, one per
sequence, then one per scenario), ts (int64 ms). Features live per group in `GroupFeatures`,
row r of group g describing token features[g].index[r] (indices increasing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

TensorFn = Callable[[Tensor], Tensor]


@dataclass
class GroupFeatures:
    """The features of one group's n tokens; row r belongs to token `index[r]`.

    index: (n,) int64 increasing positions on the packed token axis.
    categorical: name -> (n,) int64 embedding-table rows (already hashed; 0 = missing).
    numeric: name -> (n,) float32 raw values (missing = 0; the tokenizer applies the transform).
    list_values / list_offsets: name -> (m,) int64 rows and (n+1,) int64 offsets of each
        token's list (a categorical_list feature; mean-pooled by the tokenizer).
    labels / label_mask: (n, num_tasks) float32 0/1 and bool (False = no label); T groups only,
        tasks in the scenario's registry order.
    request_id: (n,) int64 request of each exposure (null = -1); T groups only.
    """

    index: Tensor
    categorical: dict[str, Tensor] = field(default_factory=dict)
    numeric: dict[str, Tensor] = field(default_factory=dict)
    list_values: dict[str, Tensor] = field(default_factory=dict)
    list_offsets: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None
    label_mask: Tensor | None = None
    request_id: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.index.shape[0]

    def map_tensors(self, fn: TensorFn) -> "GroupFeatures":
        def each(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: fn(v) for k, v in d.items()}

        return GroupFeatures(
            index=fn(self.index), categorical=each(self.categorical), numeric=each(self.numeric),
            list_values=each(self.list_values), list_offsets=each(self.list_offsets),
            labels=None if self.labels is None else fn(self.labels),
            label_mask=None if self.label_mask is None else fn(self.label_mask),
            request_id=None if self.request_id is None else fn(self.request_id),
        )


@dataclass(frozen=True)
class UnpaddedSizes:
    """A padded batch's real users, tokens and T-tokens, and each scenario's T-tokens (`model/padding.py`)."""

    num_users: int
    num_tokens: int
    num_targets: int
    targets_per_scenario: dict[str, int]


@dataclass
class TokenBatch:
    """A jagged batch of B users and N tokens (see the module docstring for the layout).

    group_names: GLN group names; `group` values index this tuple (sequences, then scenarios).
    scenario_tasks: scenario -> its task names (the columns of that group's `labels`).
    offsets, target_offsets: (B+1,) int64; user_id: (B,) int64.
    kind: (N,) int8; group: (N,) int64; ts: (N,) int64.
    target_index: (NT,) int64 increasing positions of the T-tokens (user-major): the packed
        query order of target attention.
    features: group name -> GroupFeatures (every group of `group_names`, possibly empty).
    unpadded: the real sizes of a batch padded to a fixed shape (`model/padding.py`), else None.
    """

    group_names: tuple[str, ...]
    scenario_tasks: dict[str, tuple[str, ...]]
    offsets: Tensor
    target_offsets: Tensor
    user_id: Tensor
    kind: Tensor
    group: Tensor
    ts: Tensor
    target_index: Tensor
    features: dict[str, GroupFeatures]
    unpadded: UnpaddedSizes | None = None

    @property
    def num_users(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.kind.shape[0]

    @property
    def num_targets(self) -> int:
        return self.target_index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.kind.device

    def targets_per_scenario(self) -> dict[str, int]:
        """Each scenario's T-tokens (exposures), a padded batch's real ones; no device sync."""
        if self.unpadded is not None:
            return dict(self.unpadded.targets_per_scenario)
        return {s: self.features[s].index.shape[0] for s in self.scenario_tasks}

    @property
    def scenarios(self) -> tuple[str, ...]:
        return tuple(self.scenario_tasks)

    def token_user(self) -> Tensor:
        """(N,) int64: the user (batch row) of every token."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_users, device=self.device), counts)

    def map_tensors(self, fn: TensorFn) -> "TokenBatch":
        """A batch with `fn` applied to every tensor (metadata shared)."""
        return dataclasses.replace(
            self, offsets=fn(self.offsets), target_offsets=fn(self.target_offsets), user_id=fn(self.user_id),
            kind=fn(self.kind), group=fn(self.group), ts=fn(self.ts), target_index=fn(self.target_index),
            features={name: g.map_tensors(fn) for name, g in self.features.items()},
        )

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []

        def collect(t: Tensor) -> Tensor:
            found.append(t)
            return t

        self.map_tensors(collect)
        return found

    def pack(self, out: Tensor | None = None) -> Tensor:
        """Every non-empty tensor's bytes in one flat uint8 tensor (written into `out` if given),
        largest element size first, so that each piece stays aligned for its dtype."""
        tensors = [t for t in self.tensors() if t.numel()]
        order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
        parts = [tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in order]
        return torch.cat(parts, out=out) if out is not None else torch.cat(parts)

    def unpack(self, flat: Tensor) -> "TokenBatch":
        """A batch shaped like this one viewing `flat`, the `pack()` of a batch of the same
        shapes and dtypes, on any device. Empty tensors carry no bytes (and may have strides no
        byte view accepts): they are made on flat's device."""
        tensors = self.tensors()
        nonempty = [i for i, t in enumerate(tensors) if t.numel()]
        order = sorted(range(len(nonempty)), key=lambda j: -tensors[nonempty[j]].element_size())
        sizes = [tensors[nonempty[j]].numel() * tensors[nonempty[j]].element_size() for j in order]
        if flat.numel() != sum(sizes):
            raise ValueError(f"unpack: {flat.numel()} bytes for a batch of {sum(sizes)}")
        moved = {i: t.new_empty(t.shape, device=flat.device) for i, t in enumerate(tensors) if not t.numel()}
        for j, piece in zip(order, flat.split(sizes)):
            t = tensors[nonempty[j]]
            moved[nonempty[j]] = piece.view(t.dtype).view(t.shape)
        position = iter(range(len(tensors)))
        return self.map_tensors(lambda _: moved[next(position)])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "TokenBatch":
        """The batch on `device` with ONE host-to-device copy: every tensor packed into one byte
        buffer (`pack`), copied once, and viewed back (`unpack`). From the host to CUDA the pack
        goes straight into pinned memory from torch's caching host allocator: a pack into fresh
        pageable memory then `pin_memory()` cost a second host copy and the page faults of a new
        buffer each step."""
        device = torch.device(device)
        tensors = self.tensors()
        if all(t.device == device for t in tensors):
            return self
        staging = None
        if device.type == "cuda" and all(t.device.type == "cpu" for t in tensors):
            staging = torch.empty(sum(t.numel() * t.element_size() for t in tensors), dtype=torch.uint8,
                                  pin_memory=True)
        return self.unpack(self.pack(staging).to(device, non_blocking=non_blocking))
