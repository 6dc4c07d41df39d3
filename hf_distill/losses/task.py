"""The task loss on the labels, computed here (not by the model) so its reduction matches the distillation terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift_labels: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on integer labels (`-100` ignored), or MSE for float labels with one output (regression).

    Args:
        logits: `(B, C)` for sequence classification, `(B, L, C)` for token classification or language modelling.
        labels: `(B,)` or `(B, L)` integer class ids with `-100` for positions that do not count; `(B,)` or
            `(B, 1)` floats for regression.
        shift_labels: causal LM: position i predicts label i + 1.
        num_items_in_batch: divide the summed loss by this (the labelled items of the whole gradient-accumulation
            window) instead of by the labelled items here.

    Returns:
        fp32 scalar; a zero connected to the graph when no label counts.
    """
    if labels.is_floating_point():
        per_item = (logits.float().view(labels.shape[0], -1) - labels.float().view(labels.shape[0], -1)) ** 2
        total, count = per_item.mean(-1).sum(), labels.shape[0]
    else:
        if shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        flat_logits = logits.float().reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1).to(flat_logits.device)
        # With every label ignored the sum is an exact, graph-connected 0.
        total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
        # Kept on the device: reading the count back (int(...)) would stall a GPU every step.
        count = flat_labels.ne(-100).sum().clamp(min=1)
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    return total / denominator
