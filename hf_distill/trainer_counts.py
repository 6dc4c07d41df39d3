"""The counts every term of `DistillationTrainer` is normalised by, over a whole gradient-accumulation window.

`Trainer` hands `compute_loss` the `num_items_in_batch` of its window, computed by `_get_num_items_in_batch` from
all the window's micro-batches before the first one runs. Here that is a tensor of counts (`window_counts` reads it
back): rows, labelled items (rows for regression / multi-label), real tokens, and the positions the token-level
logit term scores (see `DistillationConfig.distill_on`). Each term divides its sum by the matching count, so the
micro-batch losses add up to the exact window mean, and with `average_tokens_across_devices` to the exact mean over
every process (`ddp_loss_scale` then undoes DDP's averaging of the gradients, as `Trainer.compute_loss` does).
"""

from __future__ import annotations

import torch

from .losses.task import labelled_float_rows
from .tasks import MULTI_LABEL, REGRESSION, distill_positions, problem_type_of_labels

# Index of each count in the tensor `_get_num_items_in_batch` returns for a gradient-accumulation window: rows,
# labelled items (rows for regression / multi-label), real tokens, and the positions the token-level logit term
# scores (see `DistillationConfig.distill_on`).
ROWS, LABELS, TOKENS, KD_POSITIONS = 0, 1, 2, 3
NUM_COUNTS = 4


def window_counts(num_items_in_batch, num_counts: int) -> torch.Tensor | None:
    """The window's counts tensor, or None when `Trainer` gave none (e.g. evaluation): terms use their own counts."""
    if torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == num_counts:
        return num_items_in_batch
    return None


def ddp_loss_scale(trainer, counts: torch.Tensor | None) -> int:
    """Under DDP gradients are averaged over processes; a loss normalised by counts summed over all processes must
    be scaled back up by their number (as `Trainer.compute_loss` does)."""
    if counts is not None and trainer.args.average_tokens_across_devices:
        return trainer.accelerator.num_processes
    return 1


def gather_counts(trainer, counts: torch.Tensor, num_counts: int) -> torch.Tensor:
    """`counts` summed over every process when `average_tokens_across_devices` (one gather, no host sync)."""
    if trainer.args.average_tokens_across_devices and trainer.args.world_size > 1:
        return trainer.accelerator.gather(counts).view(-1, num_counts).sum(0)
    return counts


class WindowCountsMixin:
    """`DistillationTrainer`'s `_get_num_items_in_batch` and the per-batch counts `compute_loss` uses with it."""

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Counts over the whole gradient-accumulation window: rows, labelled items, real tokens, scored positions.

        Every term divides its sum by the matching count, so the micro-batch losses add up to the exact window mean
        (and, with `average_tokens_across_devices`, the exact mean over all processes). The counts are the very ones
        `compute_loss` uses (`_label_count`, `_logit_positions`), summed on the device without a host sync.
        """
        if not batch_samples:
            return None
        counts = torch.zeros(NUM_COUNTS, dtype=torch.long, device=device)
        for batch in batch_samples:
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            labels = batch.get("labels")
            counts[ROWS] += input_ids.shape[0]
            counts[TOKENS] += mask.sum().to(device) if mask is not None else input_ids.numel()
            if labels is not None:
                counts[LABELS] += self._label_count(labels).to(device)
            positions = self._logit_positions(labels, mask)
            if self._sequence_level:
                counts[KD_POSITIONS] += input_ids.shape[0]
            else:
                counts[KD_POSITIONS] += positions.sum().to(device) if positions is not None else input_ids.numel()
        return gather_counts(self, counts, NUM_COUNTS)

    def _problem_type(self, labels: torch.Tensor | None) -> str | None:
        """The head's problem type for this batch (None for token-level students)."""
        if not self._sequence_level:
            return None
        if self.problem_type is not None or labels is None:
            return self.problem_type
        return problem_type_of_labels(labels, self.model.config.num_labels)

    def _label_count(self, labels: torch.Tensor) -> torch.Tensor:
        """Items the task loss scores: labelled (not NaN) rows for regression / multi-label, else labels != -100
        (shifted for LMs)."""
        if labels.is_floating_point():
            return labelled_float_rows(labels).sum()
        if self._problem_type(labels) in (REGRESSION, MULTI_LABEL):
            return torch.tensor(labels.shape[0], device=labels.device)
        return (labels[..., 1:] if self._shift_labels else labels).ne(-100).sum()

    def _logit_positions(self, labels: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """`(B, L)` positions the token-level logit term scores (see `DistillationConfig.distill_on`)."""
        if self._sequence_level:
            return None
        return distill_positions(labels, mask, distill_on=self.args.distill_on, shift_labels=self._shift_labels)
