"""ONNX export of a scenario subgraph, and the onnx / tensorrt scoring backend that runs it.

The jagged kernels (a torch.library op over packed users) do not export. `DenseRequestRanker`
computes the same math for ONE request with dense tensors, in the user-side-reuse form
(H and R tokens never see T-tokens):

    user tokens U (H and R, L_u of them), per layer:
        K_U, V_U = silu(W_kv GLN_1(x_U));  full layer: x_U += W_o GLN_2(A_UU * u_U)
        A_UU[i] = sum_j silu(alpha q_i.k_j) m_ij v_j / n,  m_ij = H_j or (R_j and ts_j < ts_i) or i == j
    candidates T (K of them, all at the request's ts), every layer:
        A_t = (sum_{j in U} silu(alpha q_t.k_j) m_tj v_j + silu(alpha q_t.k_t) v_t) / n
        x_t += W_o GLN_2(A_t * u_t)
    scores = sigmoid(MMoE_s(GLN_final(x_T)))

Token order does not matter in this form (the mask depends on kind and ts only), so the graph
takes each group's tokens as given by the collator. Its inputs, per group in the collator's
order (sequences, then the scenario): `ts` (n,); for a sequence `kind` (n,) (its kind, and
one invisible padding token: see `request_inputs`); then per feature a categorical (n,) int64
row, a numeric (n,) float32 raw value, or a categorical list as (n, width) int64 rows plus
(n, width) float32 presence weights (mean of the present rows: embedding_bag's mean).
Parity with the PyTorch subgraph is tested (tests/deployments/test_serve_backends.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtfm.kernels import group_layer_norm_reference
from mtfm.kernels.mask import TokenKind, dynamic_mask_block
from mtfm.model import ScenarioRanker, TokenBatch
from mtfm.model.tokenizer import transform_numeric
from mtfm.platform.registry import Feature

from .rank_request import RankRequest, RankRequestParser, example_request

ONNX_OPSET = 17
# The kind of the padding token of each user group: neither H nor R, so no other token sees it.
PADDING_KIND = -1


@dataclass(frozen=True)
class _GroupSpec:
    name: str
    kind: TokenKind
    features: tuple[Feature, ...]


class DenseRequestRanker(nn.Module):
    """One request of a `ScenarioRanker`, dense and export-friendly (see the module docstring).
    Shares the ranker's modules (no copy of the weights)."""

    def __init__(self, ranker: ScenarioRanker):
        super().__init__()
        self.ranker = ranker
        self.scenario = ranker.scenario
        tokenizer = ranker.tokenizer
        self.user_groups = tuple(
            _GroupSpec(s.name, TokenKind.H if s.kind == "history" else TokenKind.R, tokenizer.groups[s.name].features)
            for s in ranker.registry.sequences.values())
        self.target_group = _GroupSpec(self.scenario, TokenKind.T, tokenizer.groups[self.scenario].features)

    @property
    def groups(self) -> tuple[_GroupSpec, ...]:
        return (*self.user_groups, self.target_group)

    def input_names(self) -> list[str]:
        names = []
        for g in self.groups:
            names += [f"{g.name}.ts"] if g.kind == TokenKind.T else [f"{g.name}.ts", f"{g.name}.kind"]
            for f in g.features:
                names += [f"{g.name}.{f.name}.rows", f"{g.name}.{f.name}.weights"] if f.type == "categorical_list" \
                    else [f"{g.name}.{f.name}"]
        return names

    def forward(self, *inputs: Tensor) -> Tensor:
        """inputs in `input_names()` order -> (K, num_tasks) probabilities."""
        r, s = self.ranker, self.scenario
        flat = list(inputs)
        user_tokens, kinds, ts_parts, group_ids = [], [], [], []
        for index, g in enumerate(self.user_groups):
            ts, kind, x = self._group_tokens(g, flat)
            user_tokens.append(x)
            kinds.append(kind)
            ts_parts.append(ts)
            group_ids.append(torch.full_like(ts, index))
        target_ts, _, x_t = self._group_tokens(self.target_group, flat)
        x_u, kind_u, ts_u, group_u = (torch.cat(p) for p in (user_tokens, kinds, ts_parts, group_ids))
        user_names = tuple(g.name for g in self.user_groups)
        visible_uu = dynamic_mask_block(kind_u, ts_u, ts_u, torch.arange(x_u.shape[0]))
        visible_tu = dynamic_mask_block(kind_u, ts_u, target_ts, None)  # each T-token sees itself: `own` below
        for layer in r.stack.layers:
            a = layer.attn
            kv_heads, rep = a.num_kv_heads, a.num_heads // a.num_kv_heads
            h_u = _gln(layer.input_norm, x_u, group_u, user_names)
            k_u, v_u = _heads(layer.key_value(h_u), kv_heads, a.head_dim)
            h_t = _gln(layer.input_norm, x_t, None, (s,))
            k_t, v_t = _heads(layer.key_value(h_t), kv_heads, a.head_dim)
            q_t, u_t = _heads(layer.query_gate(h_t), a.num_heads, a.head_dim)
            if layer.kind == "full":
                q_u, u_u = _heads(layer.query_gate(h_u), a.num_heads, a.head_dim)
                attended_u = _attention(q_u, k_u, v_u, visible_uu, a.alpha, kv_heads, rep)
                gated_u = (attended_u * u_u.unflatten(1, (kv_heads, rep))).flatten(1) / a.norm
                x_u = x_u + layer.output(_gln(layer.output_norm, gated_u, group_u, user_names))
            q_own = q_t.unflatten(1, (kv_heads, rep))
            own = F.silu(a.alpha * (q_own * k_t[:, :, None, :]).sum(-1, keepdim=True)) * v_t[:, :, None, :]
            attended_t = _attention(q_t, k_u, v_u, visible_tu, a.alpha, kv_heads, rep) + own
            gated_t = (attended_t * u_t.unflatten(1, (kv_heads, rep))).flatten(1) / a.norm
            x_t = x_t + layer.output(_gln(layer.output_norm, gated_t, None, (s,)))
        logits = r.heads(_gln(r.final_norm, x_t, None, (s,)), s)
        return torch.sigmoid(logits)

    def _group_tokens(self, g: _GroupSpec, flat: list[Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        """Pops one group's inputs off `flat`: its ts (n,), kind (n,) (None for T: all at the
        request's ts) and tokens (n, d_model)."""
        tokenizer = self.ranker.tokenizer
        ts = flat.pop(0)
        kind = None if g.kind == TokenKind.T else flat.pop(0)
        parts = []
        for f in g.features:
            if f.type == "categorical":
                parts.append(tokenizer.tables[f.name](flat.pop(0)))
            elif f.type == "categorical_list":
                rows, weights = flat.pop(0), flat.pop(0)
                summed = (tokenizer.tables[f.name](rows) * weights[:, :, None]).sum(1)
                parts.append(summed / weights.sum(1, keepdim=True).clamp_min(1.0))
            else:
                parts.append(transform_numeric(flat.pop(0), f.transform)[:, None])
        return ts, kind, tokenizer.groups[g.name].mlp(torch.cat(parts, dim=1))

    def request_inputs(self, batch: TokenBatch) -> list[np.ndarray]:
        """The graph's inputs for a collated one-request batch. Every user group gets one
        padding token of kind PADDING_KIND (visible to no other token), because onnxruntime
        fails on zero-size tensors (a request without events of some sequence)."""
        if batch.num_users != 1:
            raise ValueError(f"DenseRequestRanker scores one request at a time, got a batch of {batch.num_users}")
        out: list[np.ndarray] = []
        for g in self.groups:
            feats = batch.features[g.name]
            pad = 0 if g.kind == TokenKind.T else 1
            out.append(_padded(batch.ts[feats.index].numpy(), pad))
            if pad:
                out.append(np.append(np.full(feats.num_tokens, int(g.kind), np.int64), PADDING_KIND))
            for f in g.features:
                if f.type == "categorical":
                    out.append(_padded(feats.categorical[f.name].numpy(), pad))
                elif f.type == "numeric":
                    out.append(_padded(feats.numeric[f.name].numpy(), pad))
                else:
                    offsets = feats.list_offsets[f.name].numpy()
                    offsets = np.append(offsets, offsets[-1:]) if pad else offsets
                    out += _padded_list(feats.list_values[f.name].numpy(), offsets)
        return out


def export_onnx(ranker: ScenarioRanker, example: TokenBatch, path: str | Path) -> list[str]:
    """Writes the scenario's `DenseRequestRanker` to `path` with every token count dynamic;
    returns the input names."""
    dense = DenseRequestRanker(ranker).eval()
    names = dense.input_names()
    args = tuple(torch.from_numpy(a) for a in dense.request_inputs(example))
    dynamic = {name: {0: f"{name}.n", 1: f"{name}.width"} if name.endswith((".rows", ".weights")) else {0: f"{name}.n"}
               for name in names}
    with torch.no_grad():
        torch.onnx.export(dense, args, str(path), input_names=names, output_names=["scores"],
                          dynamic_axes=dynamic | {"scores": {0: "candidates"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    return names


class OnnxBackend:
    """Runs the exported subgraph with onnxruntime, one request at a time (the export-friendly
    formulation is single-request); `providers` picks CPU, CUDA or TensorRT."""

    def __init__(self, ranker: ScenarioRanker, *, providers: list[str], name: str = "onnx", threads: int | None = None):
        import onnxruntime

        self.name = name
        self.cuda_graphs = False
        self.collator = ranker.collator()
        self.dense = DenseRequestRanker(ranker.cpu().eval())
        body = example_request(ranker.registry, ranker.scenario, candidates=2, events=2)
        parser = RankRequestParser(ranker.registry, ranker.scenario, max_candidates=2)
        example = self.collator(parser.parse(body, now_ms=body["ts"]).table)
        self.directory = tempfile.TemporaryDirectory(prefix=f"mtfm-onnx-{ranker.scenario}-")
        path = Path(self.directory.name) / f"{ranker.scenario}.onnx"
        self.input_names = export_onnx(ranker, example, path)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)

    def score(self, requests: list[RankRequest]) -> list[np.ndarray]:
        out = []
        for request in requests:
            inputs = self.dense.request_inputs(self.collator(request.table))
            (scores,) = self.session.run(None, dict(zip(self.input_names, inputs)))
            out.append(scores.astype(np.float32))
        return out


def _heads(projection: Tensor, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    # unflatten, not view(-1, ...): a -1 cannot be resolved for zero tokens (a user with no events).
    first, second = F.silu(projection).unflatten(1, (2 * num_heads, head_dim)).chunk(2, dim=1)
    return first, second


def _attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, alpha: float, kv_heads: int, rep: int) -> Tensor:
    """sum_j silu(alpha q_i.k_j) visible_ij v_j as (M, Hkv, rep, dh), without the 1/n.

    GQA by grouping the queries (query head h = g * rep + r reads kv head g) rather than
    repeating k and v, whose reshape the exporter writes with a -1 that fails for zero tokens."""
    grouped = q.unflatten(1, (kv_heads, rep))
    p = F.silu(alpha * torch.einsum("igrd,jgd->grij", grouped, k)) * visible.to(q.dtype)
    return torch.einsum("grij,jgd->igrd", p, v)


def _gln(norm: nn.Module, x: Tensor, group: Tensor | None, names: tuple[str, ...]) -> Tensor:
    """The module's Group LayerNorm, as its reference computes it (plain torch ops, which export);
    group None: every row is of names[0]."""
    group = torch.zeros_like(x[:, 0], dtype=torch.int64) if group is None else group
    weight, bias = norm.affine(names)
    return group_layer_norm_reference.group_layer_norm(x, group, weight, bias, norm.eps)


def _padded(values: np.ndarray, pad: int) -> np.ndarray:
    return np.concatenate([values, np.zeros(pad, values.dtype)]) if pad else values


def _padded_list(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Lists as (n, width) rows and presence weights (an empty list: all weights 0)."""
    lengths = np.diff(offsets)
    width = max(int(lengths.max(initial=0)), 1)
    rows = np.zeros((len(lengths), width), dtype=np.int64)
    weights = np.zeros((len(lengths), width), dtype=np.float32)
    token = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    rows[token, position] = values
    weights[token, position] = 1.0
    return [rows, weights]
