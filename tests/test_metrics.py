"""AUC and GAUC against scikit-learn and a hand-worked case."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtfm.platform.metrics import auc, gauc


def test_auc_hand_worked():
    # positives at 0.8 and 0.4; negatives at 0.4 (tie: half) and 0.1. Pairs: (0.8>0.4) (0.8>0.1) (0.4=0.4) (0.4>0.1)
    assert auc([1, 0, 1, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    labels = rng.random(n) < 0.2
    scores = np.round(rng.random(n) + labels * 0.3, 2)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_per_user_sklearn(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, size=3000)
    labels = rng.random(3000) < rng.random(60)[users]
    scores = np.round(rng.random(3000) + labels * 0.2, 2)
    total, weights, skipped = 0.0, 0.0, 0
    for u in np.unique(users):
        m = users == u
        if labels[m].all() or not labels[m].any():
            skipped += 1
            continue
        total += roc_auc_score(labels[m], scores[m]) * m.sum()
        weights += m.sum()
    result = gauc(users, labels, scores)
    assert result.gauc == pytest.approx(total / weights, abs=1e-12)
    assert result.users_skipped == skipped and result.users_scored == len(np.unique(users)) - skipped
