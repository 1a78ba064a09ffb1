"""Helpers shared by the model tests: a tiny config, table round-trips, scores keyed by request."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mtfm.model import Collator, load_model_config
from mtfm.model.sample_tables import random_aggregated_table
from mtfm.platform.registry import Registry, exposures_column

REPO = Path(__file__).resolve().parents[2]


def tiny_config(**changes):
    """configs/model/tiny.yaml on the PyTorch reference kernels (the CPU specification)."""
    cfg = load_model_config(REPO / "configs/model/tiny.yaml")
    return cfg.replace(attention_impl="reference", norm_impl="reference", **changes)


def random_table(registry: Registry, num_users: int, seed: int, **kwargs) -> pa.Table:
    return random_aggregated_table(registry, num_users, np.random.default_rng(seed), **kwargs)


def rows_of(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def table_of(rows: list[dict], registry: Registry) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=registry.aggregated_schema())


@torch.no_grad()
def scores_by_request(model, table: pa.Table) -> dict[tuple[str, int, int], torch.Tensor]:
    """(scenario, user_id, request_id) -> (num_tasks,) probabilities. Request ids must be unique."""
    batch = Collator(model.registry)(table)
    probs = model(batch).probabilities()
    users = batch.user_id[batch.token_user()]
    out = {}
    for s, p in probs.items():
        feats = batch.features[s]
        for row, (user, req) in enumerate(zip(users[feats.index].tolist(), feats.request_id.tolist())):
            out[(s, user, req)] = p[row]
    return out


def assert_same_scores(expected: dict, actual: dict, keys=None, atol=1e-5, rtol=1e-4):
    for key in (keys if keys is not None else expected):
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


def exposures(row: dict, scenario: str) -> list[dict]:
    return row[exposures_column(scenario)]
