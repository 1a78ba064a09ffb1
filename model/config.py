"""Model configs (`configs/model/*.yaml`): parsing, validation and the HTA layout grammar.

A model config says which architecture to build and its sizes; the registry says what the
scenarios, sequences and features are. Every error names the file, the field and what was
expected (a `ModelConfigError` is a `RegistryError`, so the CLI reports both the same way).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtfm.kernels.backends import IMPLS
from mtfm.platform.registry import FieldReader, Registry, RegistryError, read_yaml_mapping

ARCHITECTURES = ("mtfm", "dlrm_mmoe", "dcnv2")
# No float16: its gradients underflow without loss scaling, which training does not do.
COMPUTE_DTYPES = ("float32", "bfloat16")
_BLOCK = re.compile(r"^\((\d+):(\d+)\)\*(\d+)$")
# What each architecture builds without reading: set to anything but its default, such a field is refused, not
# silently left out (the baselines pool with plain heads of dim d_model / num_heads and have no GLN or HTA stack).
_MTFM_ONLY = ("num_kv_heads", "head_dim", "hta_layout", "alpha", "norm_impl", "recompute_target_context")
UNREAD_FIELDS = {"mtfm": ("cross_layers",), "dlrm_mmoe": _MTFM_ONLY + ("cross_layers",), "dcnv2": _MTFM_ONLY}


class ModelConfigError(RegistryError):
    """A model config is invalid; the message names the file, the field and what was expected."""


@dataclass(frozen=True)
class MMoEConfig:
    """Shared experts (MLP d_model -> expert_dim) and one gate + tower per (scenario, task)."""

    num_experts: int = 4
    expert_dim: int = 64
    tower_dim: int = 32


@dataclass(frozen=True)
class ModelConfig:
    """One model. `hta_layout` fixes the layer count; `max_seq_len` is the attention normaliser n.

    alpha: scale inside silu(alpha * q.k); None means 1 / sqrt(head_dim).
    attention_impl / norm_impl: kernel choice ("auto": Triton on CUDA, reference on CPU); norm_impl
    also picks the projections' silu backward (`mtfm.kernels.linear_silu`) and the token split's
    row merge (`mtfm.kernels.merge_rows`).
    compute_dtype: what training/serving autocast to on GPU (parameters stay float32).
    recompute_target_context: per H/R row a target layer keeps only K and V for backward; the
    K/V projection's normalised input and pre-activation are recomputed in backward from the
    input the run of target layers shares (model/context_kv.py): less memory, one more stacked GLN
    and projection per run of target layers in backward.
    scenarios: None = every registered scenario; a list restricts the model (and its batches)
    to those, e.g. the single-scenario MTFM baseline.
    """

    name: str
    architecture: str = "mtfm"
    d_model: int = 64
    num_heads: int = 2
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hta_layout: str = "(0:2)*1"
    max_seq_len: int = 1024
    alpha: float | None = None
    attention_impl: str = "auto"
    norm_impl: str = "auto"
    dropout: float = 0.0
    tokenizer_hidden_dim: int | None = None
    mmoe: MMoEConfig = MMoEConfig()
    cross_layers: int = 3
    compute_dtype: str = "float32"
    recompute_target_context: bool = True
    scenarios: tuple[str, ...] | None = None
    source: str = "<dict>"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def attention_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 1.0 / math.sqrt(self.dim_per_head)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'target' or 'full' per layer, bottom to top, as `hta_layout` writes them."""
        return parse_hta_layout(self.hta_layout, self.source)

    @property
    def run_layer_kinds(self) -> tuple[str, ...]:
        """What each layer runs: `layer_kinds` with the top layer as target attention. Its non-T
        rows are never read, and by invariant 3 its T rows are those of a full layer, so this is
        the same model for less work."""
        return self.layer_kinds[:-1] + ("target",)

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def mlp_hidden_dim(self) -> int:
        return self.tokenizer_hidden_dim or self.d_model

    def to_dict(self) -> dict[str, Any]:
        """The fields as a file would hold them (what a checkpoint records): no source, lists for tuples."""
        raw = dataclasses.asdict(self)
        raw.pop("source")
        if raw["scenarios"] is not None:
            raw["scenarios"] = list(raw["scenarios"])
        return raw

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed, validated like a loaded file."""
        raw = self.to_dict() | changes
        if isinstance(raw["mmoe"], MMoEConfig):
            raw["mmoe"] = dataclasses.asdict(raw["mmoe"])
        return parse_model_config(raw, self.source)


def parse_hta_layout(layout: str, file: str = "<model config>") -> tuple[str, ...]:
    """'(T:F)*N[+(T:F)*N...]' -> per-layer kinds: N blocks of T target layers then F full ones.

    `(3:1)*4` is 4 x (3 target + 1 full) = 16 layers; `(0:16)*1` full only; `(16:0)*1` target only.
    """
    expected = ("expected blocks '(T:F)*N' joined by '+', e.g. '(3:1)*4' (4 blocks of 3 target-attention "
                "layers then 1 full-attention layer), '(0:16)*1' or '(16:0)*1', with N >= 1 and at least one layer")
    if not isinstance(layout, str) or not layout.strip():
        raise ModelConfigError(file, "hta_layout", f"{expected}; found {layout!r}")
    kinds: list[str] = []
    for block in layout.replace(" ", "").split("+"):
        match = _BLOCK.match(block)
        if match is None:
            raise ModelConfigError(file, "hta_layout", f"cannot parse block {block!r} of {layout!r}: {expected}")
        target, full, repeat = (int(g) for g in match.groups())
        if repeat < 1:
            raise ModelConfigError(file, "hta_layout", f"block {block!r} of {layout!r} repeats {repeat} times: {expected}")
        kinds += (["target"] * target + ["full"] * full) * repeat
    if not kinds:
        raise ModelConfigError(file, "hta_layout", f"{layout!r} has no layers: {expected}")
    return tuple(kinds)


def load_model_config(path: str | Path) -> ModelConfig:
    """Read and validate one `configs/model/<name>.yaml`."""
    raw = read_yaml_mapping(path, "model config file (expected e.g. configs/model/small.yaml)", ModelConfigError)
    path = Path(path)
    raw.setdefault("name", path.stem)
    return parse_model_config(raw, str(path))


def parse_model_config(raw: dict[str, Any], file: str = "<dict>", snapshot: bool = False) -> ModelConfig:
    """Validate a plain mapping (a loaded YAML file or, `snapshot`, a checkpoint's copy: a field its architecture
    does not read is refused in a file, but a checkpoint written before that rule still loads)."""
    fields = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "source")
    d = {x.name: x.default for x in dataclasses.fields(ModelConfig)}  # the defaults, written once: the dataclass's
    if "model" in raw:  # every train config names its model config so
        raise ModelConfigError(file, "model", "unknown key: this looks like a train config (configs/train/); pass the "
                               f"model config it names ({raw['model']}) instead")
    f = FieldReader(raw, file, "", fields, ModelConfigError)
    cfg = ModelConfig(
        name=f.get("name", str, what="a model name"),
        architecture=f.choice("architecture", ARCHITECTURES, d["architecture"]),
        d_model=f.positive("d_model", int, d["d_model"]),
        num_heads=f.positive("num_heads", int, d["num_heads"]),
        num_kv_heads=f.positive("num_kv_heads", int, d["num_kv_heads"]),
        head_dim=f.positive("head_dim", int, d["head_dim"]),
        hta_layout=f.get("hta_layout", str, d["hta_layout"], what="a layout string such as '(3:1)*4'"),
        max_seq_len=f.positive("max_seq_len", int, d["max_seq_len"]),
        alpha=f.finite("alpha", d["alpha"]),
        attention_impl=f.choice("attention_impl", IMPLS, d["attention_impl"]),
        norm_impl=f.choice("norm_impl", IMPLS, d["norm_impl"]),
        dropout=f.finite("dropout", d["dropout"]),
        tokenizer_hidden_dim=f.positive("tokenizer_hidden_dim", int, d["tokenizer_hidden_dim"]),
        mmoe=_parse_mmoe(f.get("mmoe", dict, {}), file),
        cross_layers=f.positive("cross_layers", int, d["cross_layers"]),
        compute_dtype=f.choice("compute_dtype", COMPUTE_DTYPES, d["compute_dtype"]),
        recompute_target_context=f.get("recompute_target_context", bool, d["recompute_target_context"]),
        scenarios=_parse_scenarios(raw.get("scenarios"), file),
        source=file,
    )
    if cfg.num_heads % cfg.kv_heads:
        raise ModelConfigError(file, "num_kv_heads", f"expected a divisor of num_heads ({cfg.num_heads}), "
                                                     f"found {cfg.kv_heads}")
    if cfg.head_dim is None and cfg.d_model % cfg.num_heads:
        raise ModelConfigError(file, "num_heads", f"expected a divisor of d_model ({cfg.d_model}) unless head_dim is "
                                                  f"set, found {cfg.num_heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ModelConfigError(file, "dropout", f"expected a probability in [0, 1), found {cfg.dropout}")
    if cfg.alpha is not None and cfg.alpha <= 0:  # finite: FieldReader.finite
        raise ModelConfigError(file, "alpha", f"expected a positive number, found {cfg.alpha}")
    parse_hta_layout(cfg.hta_layout, file)
    for name in () if snapshot else UNREAD_FIELDS[cfg.architecture]:
        if getattr(cfg, name) != d[name]:
            readers = [a for a in ARCHITECTURES if name not in UNREAD_FIELDS[a]]
            raise ModelConfigError(file, name, f"not read by architecture {cfg.architecture} (only by "
                                   f"{', '.join(readers)}); remove it, or leave it at its default {d[name]!r}")
    return cfg


def _parse_mmoe(raw: dict[str, Any], file: str) -> MMoEConfig:
    f, d = FieldReader(raw, file, "mmoe", tuple(x.name for x in dataclasses.fields(MMoEConfig)), ModelConfigError), \
        MMoEConfig()
    return MMoEConfig(f.positive("num_experts", int, d.num_experts), f.positive("expert_dim", int, d.expert_dim),
                      f.positive("tower_dim", int, d.tower_dim))


def _parse_scenarios(value: Any, file: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ModelConfigError(file, "scenarios", f"expected a non-empty list of scenario names (or nothing for all), "
                                                  f"found {value!r}")
    return tuple(value)


def restrict_registry(registry: Registry, scenarios: tuple[str, ...] | list[str] | None,
                      source: str | None = None) -> Registry:
    """The registry with only `scenarios` (all when None); sequences are always shared. `source`:
    the model config that named them, whose file and field an unknown one's error then gives."""
    if scenarios is None:
        return registry
    for i, name in enumerate(scenarios):
        if source is not None and name not in registry.scenarios:
            raise ModelConfigError(source, f"scenarios[{i}]", f"unknown scenario {name!r}; registered in "
                                   f"{registry.config_dir}: {', '.join(registry.scenarios)}")
        registry.scenario(name)
    return dataclasses.replace(registry, scenarios={n: s for n, s in registry.scenarios.items() if n in scenarios})
