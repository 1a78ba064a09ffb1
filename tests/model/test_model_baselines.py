"""Baselines: same batch in, same output and loss out; they keep candidate independence too."""
from __future__ import annotations

import pytest
import torch

from model_test_utils import REPO, assert_same_scores, random_table, rows_of, scores_by_request, table_of
from mtfm.model import Collator, build_model, load_model_config, multitask_bce_loss
from mtfm.model.baselines import DCNv2, DLRMMMoE
from mtfm.platform.registry import exposures_column, load_registry

REGISTRY = load_registry(REPO / "configs")


def baseline(name):
    torch.manual_seed(0)
    cfg = load_model_config(REPO / f"configs/model/{name}.yaml").replace(attention_impl="reference")
    return build_model(cfg, REGISTRY)


@pytest.mark.parametrize("name,cls", [("dlrm_mmoe_tiny", DLRMMMoE), ("dcnv2_tiny", DCNv2)])
def test_baseline_trains_on_the_same_batches(name, cls):
    model = baseline(name)
    assert isinstance(model, cls)
    table = random_table(REGISTRY, 4, 3, lengths={"hp": (1, 3), "phf": (1, 3), "sqs": (1, 3)})
    batch = Collator(model.registry)(table)
    out = model(batch)
    assert {s: v.shape for s, v in out.logits.items()} == {
        s: (batch.features[s].num_tokens, len(REGISTRY.scenario(s).tasks)) for s in REGISTRY.scenarios}
    loss, _ = multitask_bce_loss(out, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["dlrm_mmoe_tiny", "dcnv2_tiny"])
def test_baseline_scores_do_not_depend_on_other_candidates(name):
    model = baseline(name).eval()
    table = random_table(REGISTRY, 3, 8)
    before = scores_by_request(model, table)
    rows = rows_of(table)
    for row in rows:
        row[exposures_column("hp")] = row[exposures_column("hp")][::-1][:-1]
        row[exposures_column("sqs")] = []
    after = scores_by_request(model, table_of(rows, REGISTRY))
    assert_same_scores(before, after, [k for k in after])


def test_single_scenario_mtfm_is_a_registry_restriction():
    cfg = load_model_config(REPO / "configs/model/single_scenario_hp.yaml").replace(
        d_model=16, tokenizer_hidden_dim=16, attention_impl="reference", norm_impl="reference")
    model = build_model(cfg, REGISTRY)
    assert tuple(model.registry.scenarios) == ("hp",)
    batch = Collator(model.registry)(random_table(REGISTRY, 3, 1))
    assert batch.scenarios == ("hp",) and set(model(batch).logits) <= {"hp"}
    assert not any(".phf" in n or ".sqs" in n for n, _ in model.named_parameters())
