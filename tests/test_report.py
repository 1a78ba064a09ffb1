"""`mtfm report`'s attention heatmap (platform/report.py): which history tokens it draws. In process, no Ray."""
from __future__ import annotations

import numpy as np
import torch

from mtfm.kernels.mask import TokenKind
from mtfm.model import Collator, build_model, load_model_config
from mtfm.model.sample_tables import random_aggregated_table
from mtfm.platform.registry import load_registry
from mtfm.platform.report import attention_maps
from repo_paths import CONFIGS

REGISTRY = load_registry(CONFIGS)


def test_attention_map_draws_the_newest_history_tokens():
    """With max_history below a user's H tokens, the heatmap keeps the newest ones (the last H rows of the
    packed sequence, as the module docstring says), not the oldest: its rows are the last max_history rows
    of the map drawn against every H token, with the same T columns."""
    torch.manual_seed(0)
    config = load_model_config(CONFIGS / "model" / "tiny.yaml").replace(attention_impl="reference",
                                                                       norm_impl="reference")
    model = build_model(config, REGISTRY).eval()
    table = random_aggregated_table(REGISTRY, 2, np.random.default_rng(1),
                                    lengths={"history": (10, 14), "realtime": (1, 3), "hp": (1, 3), "phf": (0, 2),
                                             "sqs": (0, 2)})
    batch = Collator(REGISTRY)(table)
    first = batch.kind[int(batch.offsets[0]):int(batch.offsets[1])]
    num_history = int((first == TokenKind.H).sum())
    assert num_history >= 10

    every, newest = attention_maps(model, batch, 10_000), attention_maps(model, batch, 3)
    assert len(every) == len(newest) == batch.num_users
    (all_rows, labels), (rows, newest_labels) = every[0], newest[0]
    assert all_rows.shape[0] == num_history and rows.shape == (3, all_rows.shape[1])
    assert newest_labels == labels and set(labels) <= set(REGISTRY.scenarios)
    # the einsum over 3 keys or all of them: float32 rounding apart
    np.testing.assert_allclose(rows, all_rows[-3:], rtol=1e-5, atol=0)
    assert not np.allclose(rows, all_rows[:3], rtol=1e-2, atol=0)  # the oldest rows differ: the check tells them apart
