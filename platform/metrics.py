"""Ranking metrics: AUC and GAUC, vectorized in NumPy.

AUC is the Mann-Whitney statistic with tied scores counted as half (average ranks).
GAUC is the per-user AUC averaged over users that have both a positive and a negative label,
weighted by the user's number of exposures (impressions), as in DIN and MTGR; users with one
class only are skipped and counted in `users_skipped`.

A metric that cannot be computed (a task whose test exposures hold one class) is NaN. The files the
platform writes hold it as null (`metrics_json`): NaN is not JSON, and strict readers refuse it;
`metric_value` reads it back as NaN.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def metrics_json(record: Any, **kwargs) -> str:
    """`record` as strict JSON: every float that is not finite (NaN, inf) written as null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(record), allow_nan=False, **kwargs)


def metric_value(value: float | None) -> float:
    """A metric as read back from such a file: null is NaN."""
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class GroupAuc:
    gauc: float
    users_scored: int
    users_skipped: int


def _average_ranks(keys: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by (key, score); return the order and 1-based ranks within each key, ties averaged."""
    order = np.lexsort((scores, keys))
    k, s = keys[order], scores[order]
    n = len(order)
    new_key = np.r_[True, k[1:] != k[:-1]]
    new_tie = new_key | np.r_[True, s[1:] != s[:-1]]
    key_start = np.maximum.accumulate(np.where(new_key, np.arange(n), 0))
    pos = np.arange(n) - key_start + 1.0  # rank within the key, before tie averaging
    tie_id = np.cumsum(new_tie) - 1
    tie_sum = np.bincount(tie_id, weights=pos)
    tie_cnt = np.bincount(tie_id)
    return order, (tie_sum / tie_cnt)[tie_id]


def _per_key_auc(keys: np.ndarray, labels: np.ndarray, scores: np.ndarray):
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    _, inverse = np.unique(keys, return_inverse=True)
    order, ranks = _average_ranks(inverse, scores)
    pos = labels[order]
    grp = inverse[order]
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    n_pos = np.bincount(grp, weights=pos, minlength=n_groups)
    n_all = np.bincount(grp, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(grp, weights=np.where(pos, ranks, 0.0), minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    auc = np.full(n_groups, np.nan)
    auc[valid] = (rank_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2) / (n_pos[valid] * n_neg[valid])
    return auc, n_all, valid


def auc(labels, scores) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels)
    value, _, valid = _per_key_auc(np.zeros(len(labels), dtype=np.int64), labels, scores)
    return float(value[0]) if len(value) and valid[0] else float("nan")


def gauc(user_ids, labels, scores) -> GroupAuc:
    """Impression-weighted mean of per-user AUC over users with both classes."""
    value, weight, valid = _per_key_auc(np.asarray(user_ids), labels, scores)
    if not valid.any():
        return GroupAuc(float("nan"), 0, int(len(valid)))
    return GroupAuc(float(np.average(value[valid], weights=weight[valid])), int(valid.sum()), int((~valid).sum()))
