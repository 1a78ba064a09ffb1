"""AUC and GAUC against scikit-learn and a hand-worked case; `mtfm eval`'s table notes and flags."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtfm.platform.metrics import auc, gauc
from repo_paths import CONFIGS, REPO_ROOT


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


def test_gauc_ties_do_not_reach_across_users():
    # User 0: negative 0.1 < positive 0.5 (AUC 1); user 1: negative 0.5 < positive 0.9 (AUC 1). The 0.5s of the
    # two users are not a tie: a rank averaged across users would score each 0.75.
    assert gauc([0, 0, 1, 1], [0, 1, 0, 1], [0.1, 0.5, 0.5, 0.9]).gauc == pytest.approx(1.0)


@pytest.mark.parametrize("seed,shared_scores", [(0, False), (1, False), (2, False), (3, True), (4, True)])
def test_gauc_matches_per_user_sklearn(seed, shared_scores):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, size=3000)
    labels = rng.random(3000) < rng.random(60)[users]
    scores = np.round(rng.random(3000) + labels * 0.2, 2)
    if shared_scores:  # each user's scores on a coarse grid that overlaps the next user's: ties at users' edges
        scores = users * 0.5 + rng.integers(0, 3, 3000) * 0.25 + labels * 0.25
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


def test_eval_table_notes_rows_scored_on_too_few_users_or_positives():
    from mtfm.platform.eval import FEW, format_table

    row = dict(auc=0.7, gauc=0.6, exposures=5000, positives=400, users_scored=200, users_skipped=3)
    table = format_table({"hp/click": row, "hp/order": row | dict(positives=FEW - 1),
                          "sqs/click": row | dict(users_scored=2)})
    notes = [line for line in table.splitlines() if line.startswith("note: ")]
    assert len(table.splitlines()) == 4 + len(notes)
    assert [n.split(":")[1].strip() for n in notes] == ["hp/order", "sqs/click"]
    assert f"{FEW - 1} positive(s)" in notes[0] and "2 user(s)" in notes[1] and "--test-windows" in notes[1]


def test_eval_table_has_a_row_for_each_task_of_the_model_with_no_labelled_exposure():
    from mtfm.platform.eval import format_table, not_evaluated
    from mtfm.platform.registry import load_registry

    registry = load_registry(CONFIGS)
    row = dict(auc=0.7, gauc=0.6, exposures=5000, positives=400, users_scored=200, users_skipped=3)
    results = {"hp/click": row, "sqs/click": row}
    missing = not_evaluated(results, registry)
    assert missing == [f"{s}/{t}" for s, scenario in registry.scenarios.items() for t in scenario.task_names
                       if f"{s}/{t}" not in results] and "phf/click" in missing and "hp/order" in missing
    lines = format_table(results, missing).splitlines()
    assert len(lines) == 1 + len(results) + len(missing) + 1
    assert [line.split()[0] for line in lines[3:-1]] == missing and lines[3].split()[1:] == ["-"] * 5
    assert lines[-1].startswith(f"note: {', '.join(missing)}: no labelled exposure in the test windows")


@pytest.mark.parametrize("windows", ["0", "-1", "two"])
def test_eval_refuses_a_test_window_count_below_one(windows, capsys):
    from mtfm.platform.cli import main

    with pytest.raises(SystemExit) as exc:  # before any checkpoint or data is read
        main(["eval", "--checkpoint", "runs/none", "--data", "data/none", "--test-windows", windows])
    assert exc.value.code == 2 and f"expected a positive integer, found '{windows}'" in capsys.readouterr().err


def test_eval_names_the_runs_missing_data_and_a_bad_json_path_before_evaluating(tmp_path, capsys):
    import json
    import sys

    from mtfm.platform.cli import main
    from mtfm.platform.registry import load_registry

    sys.path.insert(0, str(REPO_ROOT / "tests" / "deployments"))
    from serve_test_utils import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(load_registry(REPO_ROOT / "configs"), tmp_path / "run" / "checkpoint_00000007")
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps(meta | {"train_config": {"data": str(tmp_path / "gone")}}))
    assert main(["eval", "--checkpoint", str(tmp_path / "run")]) == 1  # --data: the run's own
    assert (f"{tmp_path / 'gone'}: the samples {checkpoint} was trained on (its train config's data) are not there"
            in capsys.readouterr().err)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", str(tmp_path)]) == 1
    assert f"--json {tmp_path}: a folder; expected a file name" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", str(tmp_path / "no" / "e.json")]) == 1
    assert f"no folder {tmp_path / 'no'} to write it in" in capsys.readouterr().err


def test_evaluate_batches_equals_sklearn_on_the_exposures_it_scored():
    """Metrics over several token-budget batches, against sklearn on (user, label, score) triples read off
    the sample table itself; the scores come from one pass over the whole table, keyed by request id."""
    import torch

    from mtfm.model import Collator, build_model, load_model_config
    from mtfm.model.collate import token_budget_batches
    from mtfm.model.sample_tables import random_aggregated_table
    from mtfm.platform.eval import evaluate_batches
    from mtfm.platform.registry import exposures_column, load_registry

    registry = load_registry(REPO_ROOT / "configs")
    config = load_model_config(REPO_ROOT / "configs/model/tiny.yaml").replace(attention_impl="reference",
                                                                               norm_impl="reference")
    torch.manual_seed(0)
    model = build_model(config, registry).eval()
    table = random_aggregated_table(registry, 40, np.random.default_rng(3), label_null_fraction=0.2,
                                    lengths={"hp": (0, 12), "phf": (0, 8), "sqs": (0, 4)})
    collator = Collator(registry)
    batch = collator(table)
    with torch.no_grad():
        probs = model(batch).probabilities()
    users = batch.user_id[batch.token_user()]
    score = {}  # (scenario, user_id, request_id) -> per-task probabilities
    for name, p in probs.items():
        feats = batch.features[name]
        for u, r, row in zip(users[feats.index].tolist(), feats.request_id.tolist(), p.numpy()):
            score[(name, u, r)] = row
    batches = list(token_budget_batches([table], collator, max_tokens=300))
    assert len(batches) >= 3

    got = evaluate_batches(model, batches, torch.device("cpu"))

    want = {}
    for name, scenario in registry.scenarios.items():
        rows = [(sample["user_id"], e) for sample in table.to_pylist() for e in sample[exposures_column(name)]]
        for t, task in enumerate(scenario.task_names):
            labelled = [(u, e[task], score[(name, u, e["request_id"])][t]) for u, e in rows if e[task] is not None]
            if not labelled:
                continue
            u, y, p = (np.array(c) for c in zip(*labelled))
            per_user = [(roc_auc_score(y[u == v], p[u == v]), (u == v).sum()) for v in np.unique(u)
                        if 0 < y[u == v].sum() < (u == v).sum()]
            want[f"{name}/{task}"] = {
                "auc": roc_auc_score(y, p), "gauc": sum(a * n for a, n in per_user) / sum(n for _, n in per_user),
                "exposures": len(y), "positives": int(y.sum()), "users_scored": len(per_user),
                "users_skipped": len(np.unique(u)) - len(per_user)}
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g["auc"] == pytest.approx(w["auc"], abs=1e-6) and g["gauc"] == pytest.approx(w["gauc"], abs=1e-6), key
        assert {k: g[k] for k in ("exposures", "positives", "users_scored", "users_skipped")} == {
            k: w[k] for k in ("exposures", "positives", "users_scored", "users_skipped")}, key


def test_metrics_files_hold_strict_json_with_null_for_a_metric_that_cannot_be_computed():
    """NaN (the AUC of a task whose test exposures hold one class) is not JSON: strict readers refuse it."""
    import json
    import math

    from mtfm.platform.eval import format_table
    from mtfm.platform.metrics import metric_value, metrics_json

    record = {"step": 4, "eval": {"sqs/order": {"auc": auc([1, 1], [0.2, 0.3]), "gauc": math.inf, "exposures": 2,
                                                "positives": 2, "users_scored": 0}}, "lr": [0.5, -math.inf]}

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    read = json.loads(metrics_json(record), parse_constant=refuse)
    assert read == {"step": 4, "eval": {"sqs/order": {"auc": None, "gauc": None, "exposures": 2, "positives": 2,
                                                      "users_scored": 0}}, "lr": [0.5, None]}
    assert math.isnan(metric_value(None)) and metric_value(0.75) == 0.75
    assert format_table(read["eval"]).splitlines()[1].split()[:3] == ["sqs/order", "nan", "nan"]
