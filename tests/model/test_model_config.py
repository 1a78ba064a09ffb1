"""Model configs: the seed files load, the HTA grammar, clear errors, and `mtfm model summary`."""
from __future__ import annotations

from pathlib import Path

import pytest

from mtfm.model import ModelConfigError, load_model_config, parse_hta_layout, parse_model_config
from mtfm.platform.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


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
    ({"d_model": "big"}, "d_model", "positive integer"),
    ({"mmoe": {"experts": 3}}, "mmoe.experts", "unknown key"),
    ({"dropout": 1.5}, "dropout", "probability"),
    ({"recompute_target_context": "yes"}, "recompute_target_context", "true or false"),
    ({"layers": 3}, "layers", "unknown key"),
    ({"scenarios": "hp"}, "scenarios", "list of scenario names"),
    ({"compute_dtype": "float16"}, "compute_dtype", "one of float32, bfloat16"),
])
def test_invalid_config_names_file_field_and_expectation(raw, field, expected):
    with pytest.raises(ModelConfigError) as err:
        parse_model_config({"name": "m"} | raw, "configs/model/m.yaml")
    assert str(err.value).startswith(f"configs/model/m.yaml: {field}: ") and expected in str(err.value)


def test_a_train_config_given_as_the_model_config_is_named_as_such():
    with pytest.raises(ModelConfigError, match=r"tiny.yaml: model: unknown key: this looks like a train config "
                                               r"\(configs/train/\); pass the model config it names"):
        load_model_config(CONFIGS.parent / "train" / "tiny.yaml")


def test_model_summary_cli(capsys):
    assert main(["model", "summary", "--config", str(CONFIGS / "tiny.yaml"), "--config-dir", "configs"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "total" in out and "GFLOP" in out


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
