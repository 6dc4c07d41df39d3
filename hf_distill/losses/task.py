"""The task loss on the labels, computed here (not by the model) so its reduction matches the distillation terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REGRESSION = "regression"
MULTI_LABEL = "multi_label_classification"


def task_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift_labels: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    problem_type: str | None = None,
) -> torch.Tensor:
    """The supervised loss of a head, as transformers' heads compute it, with an exact sum / count reduction.

    - single-label (integer labels, `-100` ignored): cross-entropy per labelled item;
    - regression: squared error, per row the mean over the outputs;
    - multi-label: binary cross-entropy with logits, per row the mean over the classes (labels are multi-hot, read
      as floats), i.e. `BCEWithLogitsLoss` (mean over rows x classes) when nothing else divides.

    Args:
        logits: `(B, C)` for sequence classification, `(B, L, C)` for token classification or language modelling.
        labels: `(B,)` or `(B, L)` integer class ids with `-100` for positions that do not count; `(B,)` or
            `(B, 1)` floats for regression; `(B, C)` multi-hot for multi-label.
        shift_labels: causal LM: position i predicts label i + 1.
        num_items_in_batch: divide the summed loss by this (the labelled items, or rows for regression and
            multi-label, of the whole gradient-accumulation window) instead of by the count here. 0 is read as 1
            (the sum is then 0).
        problem_type: `"regression"`, `"single_label_classification"`, `"multi_label_classification"` or None, which
            infers as transformers does: float labels are regression with one output, multi-label with several.

    Returns:
        fp32 scalar; a zero connected to the graph when no label counts.
    """
    if problem_type is None and labels.is_floating_point():
        problem_type = REGRESSION if logits.shape[-1] == 1 else MULTI_LABEL
    if problem_type == REGRESSION:
        rows = labels.shape[0]
        targets = labels.float().view(rows, -1).to(logits.device)
        # A row of NaN labels is unlabelled (a transfer-set row): it scores nothing and is not counted.
        labelled = labelled_float_rows(targets)
        targets = torch.where(labelled[:, None], targets, 0.0)
        per_item = (logits.float().view(rows, -1) - targets) ** 2
        total, count = torch.where(labelled, per_item.mean(-1), 0.0).sum(), labelled.sum()
    elif problem_type == MULTI_LABEL:
        targets = labels.float().to(logits.device)
        if targets.shape != logits.shape:
            raise ValueError(
                f"multi-label labels have shape {tuple(labels.shape)} but the logits have shape "
                f"{tuple(logits.shape)}: give each row a multi-hot float vector of num_labels={logits.shape[-1]} "
                "entries (e.g. [1.0, 0.0, 1.0])."
            )
        labelled = labelled_float_rows(targets)
        targets = torch.where(labelled[:, None], targets, 0.0)
        per_item = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        total, count = torch.where(labelled, per_item.mean(-1), 0.0).sum(), labelled.sum()
    else:
        if shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        flat_logits = logits.float().reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1).to(flat_logits.device)
        # With every label ignored the sum is an exact, graph-connected 0.
        total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
        # Kept on the device: reading the count back (int(...)) would stall a GPU every step.
        count = flat_labels.ne(-100).sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    if torch.is_tensor(denominator):
        # A window without one labelled item divides by 1, not 0: the loss is an exact 0, never NaN.
        return total / denominator.to(device=total.device, dtype=torch.float32).clamp(min=1.0)
    return total / max(denominator, 1)


def labelled_float_rows(labels: torch.Tensor) -> torch.Tensor:
    """`(B,)` bool: the rows of float labels (`(B,)` or `(B, C)`) that are labelled, i.e. not all NaN.

    NaN labels mark unlabelled rows (a transfer set, see `hf_distill.data.UNLABELLED_COLUMN`).
    """
    return ~torch.isnan(labels.reshape(labels.shape[0], -1)).all(-1)
