"""MTFM model: jagged batches, heterogeneous tokenizer, GLN, HSTU+GQA layers, HTA stack, MMoE
heads, scenario subgraphs, the loss, and the baselines (DLRM-MMoE, DCNv2).

Training, evaluation and serving use it like this (one model definition for all three):

    from mtfm.platform.registry import load_registry
    from mtfm.model import (Collator, build_model, load_model_config, multitask_bce_loss,
                            token_budget_batches)

    registry = load_registry("configs")
    config = load_model_config("configs/model/small.yaml")   # errors name file, field, expected
    model = build_model(config, registry)      # picks config.architecture: mtfm | dlrm_mmoe | dcnv2
    collator = Collator(model.registry)        # model.registry: restricted to config.scenarios
    for batch in token_budget_batches(dataset.iter_batches(batch_format="pyarrow"), collator,
                                      max_tokens=65536):  # whole users, <= max_tokens tokens each
        batch = batch.to(device)                          # one host-to-device copy
        with model.autocast(device.type):                 # bf16 on CUDA when compute_dtype says so
            output = model(batch)                         # ModelOutput: logits[s] (n_s, tasks_s)
        loss, terms = multitask_bce_loss(output, batch)   # terms: "scenario/task" -> mean BCE
        if loss.requires_grad:
            loss.backward()

    # Training wraps the batches in `BatchPrefetcher(batches, device)` (prefetch.py): the next
    # batches are collated in a thread and copied to the device while the current step computes.

    probs = output.probabilities()             # scenario -> (n_s, tasks_s), rows = batch.features[s]
    labels = batch.features[s].labels          # (n_s, tasks_s), label_mask says which exist
    users = batch.token_user()[batch.features[s].index]   # the batch row of each T-token (GAUC)

Under DistributedDataParallel pass find_unused_parameters=True: a scenario with no T-token in
a batch runs none of its tokenizer, GLN parameters, gates or towers (they get no gradient and
the optimizer leaves them untouched).

A scenario's subgraph: `ranker = model.subgraph("phf")` holds only what scenario phf needs (Ray
Serve builds the same `ScenarioRanker` from a checkpoint, `mtfm.deployments.scenario.load_scenario_ranker`);
`ranker(ranker.collator()(table))` -> (candidates, tasks) probabilities, equal to the full
model's; `ranker.encode_users(batch)` once, then `ranker.score_candidates(user, chunk)` per
candidate chunk gives the same scores (H and R tokens never see T-tokens).
"""
from .batch import GroupFeatures, TokenBatch
from .collate import Collator, split_by_token_budget, token_budget_batches
from .config import ModelConfig, ModelConfigError, load_model_config, parse_hta_layout, parse_model_config
from .factory import build_model
from .loss import multitask_bce_loss
from .mtfm import MTFM, ModelOutput, RecommenderBase
from .prefetch import BatchPrefetcher
from .ranker import ScenarioRanker, UserSide

__all__ = [
    "BatchPrefetcher", "Collator", "GroupFeatures", "MTFM", "ModelConfig", "ModelConfigError", "ModelOutput",
    "RecommenderBase", "ScenarioRanker", "TokenBatch", "build_model", "load_model_config", "multitask_bce_loss",
    "parse_hta_layout", "parse_model_config", "split_by_token_budget", "token_budget_batches", "UserSide",
]
