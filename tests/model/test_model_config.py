"""Model configs: the seed files load, the HTA grammar, clear errors, and `mtfm model summary`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_test_utils import random_table
from mtfm.kernels.mask import build_dynamic_mask
from mtfm.model import Collator, ModelConfigError, build_model, load_model_config, parse_hta_layout, parse_model_config
from mtfm.model.summary import TokenMix, forward_flops
from mtfm.platform.cli import main
from mtfm.platform.registry import load_registry

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
REGISTRY = load_registry(CONFIGS.parent)


@pytest.mark.parametrize("name,layers,d_model,heads", [("tiny", 2, 32, 2), ("small", 3, 512, 2),
                                                       ("medium", 5, 768, 3), ("large", 15, 768, 3)])
def test_seed_configs_follow_mtgr_table_2(name, layers, d_model, heads):
    cfg = load_model_config(CONFIGS / f"{name}.yaml")
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads) == (layers, d_model, heads)


@pytest.mark.parametrize("layout,kinds", [
    ("(3:1)*4", (["target"] * 3 + ["full"]) * 4), ("(0:16)*1", ["full"] * 16), ("(16:0)*1", ["target"] * 16),
    ("(1:1)*8", ["target", "full"] * 8), ("(5:1)*3", (["target"] * 5 + ["full"]) * 3),
    ("(2:0)*1 + (0:1)*2", ["target", "target", "full", "full"]),
])
def test_hta_layouts(layout, kinds):
    assert parse_hta_layout(layout) == tuple(kinds)
    config = parse_model_config({"name": "m", "hta_layout": layout}, "m.yaml")
    assert config.layer_kinds == tuple(kinds) and config.run_layer_kinds == tuple(kinds[:-1]) + ("target",)


@pytest.mark.parametrize("layout", ["3:1*4", "(3:1)", "(3;1)*4", "(0:0)*3", "(1:1)*0", "", "(a:1)*2"])
def test_malformed_layout_names_the_string_and_the_grammar(layout):
    with pytest.raises(ModelConfigError) as err:
        parse_hta_layout(layout, "m.yaml")
    assert "m.yaml: hta_layout" in str(err.value) and repr(layout) in str(err.value) and "(T:F)*N" in str(err.value)


@pytest.mark.parametrize("raw,field,expected", [
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads", "divisor of num_heads"),
    ({"d_model": 30, "num_heads": 4}, "num_heads", "divisor of d_model"),
    ({"architecture": "gpt"}, "architecture", "one of mtfm, dlrm_mmoe, dcnv2"),
    ({"attention_impl": "cuda"}, "attention_impl", "one of auto, triton, reference"),
    ({"d_model": "big"}, "d_model", "expected an integer >= 1, found a string 'big'"),
    ({"d_model": 0}, "d_model", "expected an integer >= 1, found 0"),
    ({"alpha": float("inf")}, "alpha", "expected a finite number, found inf"),
    ({"alpha": float("nan")}, "alpha", "expected a finite number, found nan"),
    ({"alpha": 0}, "alpha", "expected a positive number"),
    ({"dropout": float("nan")}, "dropout", "expected a finite number"),
    ({"head_dim": True}, "head_dim", "found a boolean True"),
    ({"mmoe": {"num_experts": 2.5}}, "mmoe.num_experts", "expected an integer >= 1, found a number 2.5"),
    ({"mmoe": [1]}, "mmoe", "expected a mapping, found a list"),
    ({"mmoe": {"experts": 3}}, "mmoe.experts", "unknown key"),
    ({"dropout": 1.5}, "dropout", "probability"),
    ({"recompute_target_context": "yes"}, "recompute_target_context", "true or false"),
    ({"layers": 3}, "layers", "unknown key"),
    ({"scenarios": "hp"}, "scenarios", "list of scenario names"),
    ({"compute_dtype": "float16"}, "compute_dtype", "one of float32, bfloat16"),
    # a field the architecture does not read is not silently left out
    ({"architecture": "dlrm_mmoe", "num_kv_heads": 1}, "num_kv_heads",
     "not read by architecture dlrm_mmoe (only by mtfm); remove it, or leave it at its default None"),
    ({"architecture": "dcnv2", "hta_layout": "(3:1)*4"}, "hta_layout", "not read by architecture dcnv2 (only by mtfm)"),
    ({"architecture": "dcnv2", "alpha": 0.5}, "alpha", "not read by architecture dcnv2"),
    ({"architecture": "dlrm_mmoe", "cross_layers": 4}, "cross_layers", "not read by architecture dlrm_mmoe (only by "
                                                                         "dcnv2)"),
    ({"cross_layers": 2}, "cross_layers", "not read by architecture mtfm (only by dcnv2)"),
])
def test_invalid_config_names_file_field_and_expectation(raw, field, expected):
    with pytest.raises(ModelConfigError) as err:
        parse_model_config({"name": "m"} | raw, "configs/model/m.yaml")
    assert str(err.value).startswith(f"configs/model/m.yaml: {field}: ") and expected in str(err.value)


def test_a_checkpoints_copy_of_a_baseline_config_loads_with_fields_it_does_not_read():
    """Written before unread fields were refused: a baseline's checkpoint recorded, say, norm_impl: reference."""
    recorded = {"name": "m", "architecture": "dcnv2", "norm_impl": "reference", "alpha": 0.5}
    with pytest.raises(ModelConfigError, match="alpha: not read by architecture dcnv2"):
        parse_model_config(recorded, "configs/model/m.yaml")
    config = parse_model_config(recorded, "run/checkpoint_00000003/meta.json", snapshot=True)
    assert (config.architecture, config.norm_impl, config.alpha) == ("dcnv2", "reference", 0.5)


def test_a_train_config_given_as_the_model_config_is_named_as_such():
    with pytest.raises(ModelConfigError, match=r"tiny.yaml: model: unknown key: this looks like a train config "
                                               r"\(configs/train/\); pass the model config it names"):
        load_model_config(CONFIGS.parent / "train" / "tiny.yaml")


@pytest.mark.parametrize("name", ["tiny", "large", "single_scenario_hp", "dlrm_mmoe_tiny"])
def test_a_config_as_a_checkpoint_records_it_reads_back_the_same(name):
    import json

    config = load_model_config(CONFIGS / f"{name}.yaml")
    recorded = json.loads(json.dumps(config.to_dict()))  # as meta.json holds it
    assert "source" not in recorded
    assert parse_model_config(recorded, config.source) == config
    assert config.replace(d_model=2 * config.d_model) == parse_model_config(recorded | {"d_model": 2 * config.d_model},
                                                                          config.source)
    with pytest.raises(ModelConfigError, match=rf"{name}.yaml: d_model: "):
        config.replace(d_model=-1)


def _summary_section(out: str, title: str) -> dict[str, str]:
    """The `  name  value` lines under the line starting with `title` in `mtfm model summary` output."""
    lines = out.split("\n\n" + title, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return dict(line.split()[:2] for line in lines)


@pytest.mark.parametrize("name", ["tiny", "dlrm_mmoe_tiny", "dcnv2_tiny"])
def test_model_summary_cli_counts_the_parameters_of_the_built_model(name, capsys):
    assert main(["model", "summary", "--config", str(CONFIGS / f"{name}.yaml"), "--config-dir", "configs"]) == 0
    printed = _summary_section(capsys.readouterr().out, "parameters")
    parts = {part: int(n.replace(",", "")) for part, n in printed.items()}
    model = build_model(load_model_config(CONFIGS / f"{name}.yaml"), REGISTRY)
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    assert parts["total"] == sum(n for part, n in parts.items() if part != "total")
    # one hashed table per categorical feature name, buckets x dim, counted from the registry
    tables = {f.name: f.buckets * f.dim for g in [*REGISTRY.sequences.values(), *REGISTRY.scenarios.values()]
              for f in g.features if f.type in ("categorical", "categorical_list")}
    assert parts["embedding_tables"] == sum(tables.values())


def test_model_summary_cli_attention_flops_on_the_typical_mix(tmp_path, capsys):
    """Hand-worked: sequences at max_len (n_h H, n_r R), the T-tokens interleaved uniformly with the R
    events. H queries see the n_h H keys (R events come later); the k-th R query sees n_h H, k-1 earlier R
    and itself; a T query sees n_h H, half the R on average, and itself. Attention FLOPs: 4 Hq dh per
    visible pair per layer; layout (1:3)*8 runs 9 target layers (8, and the top one) and 23 full ones."""
    config = tmp_path / "deep.yaml"
    config.write_text("architecture: mtfm\nd_model: 32\nnum_heads: 2\nnum_kv_heads: 1\nhta_layout: '(1:3)*8'\n"
                      "tokenizer_hidden_dim: 32\nmmoe: {num_experts: 2, expert_dim: 16, tower_dim: 8}\n")
    assert main(["model", "summary", "--config", str(config), "--config-dir", "configs", "--targets", "50"]) == 0
    out = capsys.readouterr().out
    n_h, n_r, targets = 256, 32, 50  # configs/sequences.yaml: history and realtime max_len
    assert [s.max_len for s in REGISTRY.history_sequences] == [n_h]
    assert [s.max_len for s in REGISTRY.realtime_sequences] == [n_r]
    target_pairs = targets * (n_h + n_r // 2 + 1)
    full_pairs = n_h * n_h + n_r * n_h + n_r * (n_r + 1) // 2 + target_pairs
    assert (target_pairs, full_pairs) == (13_650, 87_906)
    pairs = re.search(r"; ([\d,]+) visible pairs with every token a query, ([\d,]+) with T only\)", out)
    assert pairs and pairs.groups() == (f"{full_pairs:,}", f"{target_pairs:,}")
    attention = 4 * 2 * 16 * (9 * target_pairs + 23 * full_pairs)
    assert attention == 274_520_064
    assert _summary_section(out, "forward FLOPs")["attention"] == f"{attention / 1e9:.4f}"
    forward_total = float(_summary_section(out, "forward FLOPs")["total"]) * 1e9
    training = 3 * forward_total + 0.5 * attention  # DESIGN.md: backward 2x forward, 2.5x for attention
    assert float(_summary_section(out, "training FLOPs")["total"]) == pytest.approx(training / 1e9, abs=1e-4)


@pytest.mark.parametrize("layout,targets_runs,full_runs", [("(1:1)*1", 2, 0), ("(1:1)*2", 3, 1), ("(0:3)*1", 1, 2)])
def test_attention_flops_on_a_batch_count_its_visible_pairs(layout, targets_runs, full_runs):
    """forward_flops' attention on a collated batch's mix = 4 Hq dh x visible (query, key) pairs per
    layer, averaged over users; the pairs counted here token by token with the DESIGN.md rule (key j
    visible to query i iff j is H, or R with ts_j < ts_i, or j == i)."""
    config = load_model_config(CONFIGS / "tiny.yaml").replace(hta_layout=layout, num_heads=4, head_dim=12)
    batch = Collator(REGISTRY)(random_table(REGISTRY, 3, 5, lengths={"history": (2, 6), "realtime": (2, 6),
                                                                     "hp": (1, 3), "phf": (0, 3), "sqs": (1, 3)}))
    kind, ts, bounds = batch.kind.tolist(), batch.ts.tolist(), batch.offsets.tolist()
    full = target = 0
    realtime_rule = set()  # (T query, R key) visibilities met: both must occur for the batch to test the rule
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            seen = sum(kind[j] == 0 or (kind[j] == 1 and ts[j] < ts[i]) or j == i for j in range(start, end))
            full += seen
            target += seen if kind[i] == 2 else 0
            realtime_rule |= {ts[j] < ts[i] for j in range(start, end) if kind[i] == 2 and kind[j] == 1}
    assert batch.num_users == 3 and realtime_rule == {True, False}
    assert full == sum(int(m.sum()) for m in build_dynamic_mask(batch.offsets, batch.kind, batch.ts))
    flops = forward_flops(config, REGISTRY, TokenMix.from_batch(batch))
    assert flops["attention"] == pytest.approx(4 * 4 * 12 * (targets_runs * target + full_runs * full) / 3, rel=1e-12)


@pytest.mark.parametrize("name, interaction", [("dlrm_mmoe_tiny", "top MLP"), ("dcnv2_tiny", "3 cross layers")])
def test_model_summary_of_a_baseline_describes_its_own_parts(name, interaction, capsys):
    assert main(["model", "summary", "--config", str(CONFIGS / f"{name}.yaml"), "--config-dir", "configs"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "target-attention pooling with 2 heads of dim 16" in header and interaction in header
    assert "layout" not in header and "kv heads" not in header and "GLN" not in header


def test_model_summary_cli_reports_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hta_layout: '(3:1)'\n")
    assert main(["model", "summary", "--config", str(bad)]) == 1
    assert "hta_layout" in capsys.readouterr().err


def _counted_flops(module, *args) -> int:
    """FLOPs of one forward call as torch's FlopCounterMode counts them (matmuls: 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


def test_forward_flops_per_layer_heads_and_tokenizer_by_hand():
    """The per-layer linear FLOPs of the module docstring written out by hand (the output projection of a
    target layer runs on its NT queries only), and the heads' and tokenizer's FLOPs against FlopCounterMode
    run on the built model's MMoE heads and group MLPs (every Linear, the towers' output layer included)."""
    tokens = {"history": 5.0, "realtime": 2.0, "hp": 1.0, "phf": 1.0, "sqs": 1.0}  # N = 10, NT = 3
    mix = TokenMix(tokens, full_pairs=0.0, target_pairs=0.0, scenarios=("hp", "phf", "sqs"))
    assert (mix.num_tokens, mix.num_targets) == (10, 3)
    base = load_model_config(CONFIGS / "tiny.yaml").replace(
        d_model=8, num_heads=2, num_kv_heads=1, tokenizer_hidden_dim=6, attention_impl="reference",
        norm_impl="reference", mmoe={"num_experts": 3, "expert_dim": 5, "tower_dim": 7})
    n, nt, d, hq, hkv, dh, experts, expert_dim = 10, 3, 8, 2, 1, 4, 3, 5
    full = 2 * n * d * (2 * hq * dh + 2 * hkv * dh) + 2 * n * hq * dh * d
    target = 2 * n * d * (2 * hkv * dh) + 2 * nt * d * (2 * hq * dh) + 2 * nt * hq * dh * d
    assert (full, target) == (5120, 2432)
    target_only = forward_flops(base.replace(hta_layout="(1:0)*1"), REGISTRY, mix)  # runs: target
    full_then_top = forward_flops(base.replace(hta_layout="(0:2)*1"), REGISTRY, mix)  # runs: full, target (top)
    assert target_only["layer_linear"] == target
    assert full_then_top["layer_linear"] == full + target
    assert target_only["attention"] == 0

    torch.manual_seed(0)
    model = build_model(base, REGISTRY).eval()
    k = 4  # rows run through each module; FLOPs per row times the mix's tokens of that group
    heads = 0.0
    for s in mix.scenarios:
        tasks = len(REGISTRY.scenario(s).tasks)
        counted = _counted_flops(model.heads, torch.randn(k, d), s) / k
        # the gate-weighted sum of the experts is element-wise (not a matmul FlopCounterMode sees): E x expert_dim
        # multiply-adds per task
        heads += tokens[s] * (counted + tasks * 2 * experts * expert_dim)
    assert target_only["heads"] == pytest.approx(heads, rel=1e-12)
    tokenizer = 0.0
    for name, group in model.tokenizer.groups.items():
        mlp = group.mlp
        tokenizer += tokens[name] * _counted_flops(mlp, torch.randn(k, mlp[0].in_features)) / k
    assert target_only["tokenizer"] == pytest.approx(tokenizer, rel=1e-12)
