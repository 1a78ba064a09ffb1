"""The multi-task loss: per (scenario, task) binary cross-entropy on the labelled T-tokens.

    L = mean over present pairs (s, t) of  mean_{r: label_mask[r, t]} BCE(logit_s[r, t], y_s[r, t])
A pair is present when scenario s has at least one T-token with a label for task t in the
batch; absent pairs contribute nothing (not a zero term), and an absent scenario's towers were
never run, so they get no gradient at all. No host-device synchronisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import TokenBatch
from .mtfm import ModelOutput


def multitask_bce_loss(output: ModelOutput, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, terms): the scalar loss to backpropagate, and each (scenario, task) pair's mean
    BCE keyed "scenario/task", detached, NaN when the pair has no label in the batch (for logging).

    When no scenario has T-tokens the loss is a 0 that does not require grad; skip the
    backward step then (`if loss.requires_grad: loss.backward()`).
    """
    means, presents, terms = [], [], {}
    for scenario, logits in output.logits.items():
        feats = batch.features[scenario]
        mask = feats.label_mask.float()
        # A row without a label may hold any logit, inf or NaN: it is replaced before the BCE, not
        # multiplied by 0 after it (0 * inf is NaN, in the loss and in the gradient).
        labelled = torch.where(feats.label_mask, logits.float(), 0)
        bce = F.binary_cross_entropy_with_logits(labelled, feats.labels.float(), reduction="none")
        count = mask.sum(0)
        mean = torch.where(feats.label_mask, bce, 0).sum(0) / count.clamp_min(1)
        means.append(mean)
        presents.append(count > 0)
        for t, task in enumerate(batch.scenario_tasks[scenario]):
            terms[f"{scenario}/{task}"] = torch.where(count[t] > 0, mean[t], torch.nan).detach()
    if not means:
        return torch.zeros((), device=batch.device), {}
    mean, present = torch.cat(means), torch.cat(presents).float()
    return (mean * present).sum() / present.sum().clamp_min(1), terms
