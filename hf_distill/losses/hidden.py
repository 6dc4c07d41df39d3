"""Hidden-state distillation losses.

Every loss here is a pure function of tensors with the same signature::

    fn(student_hidden, teacher_hidden, mask=None, *, num_items_in_batch=None) -> scalar

Shapes:
    - ``student_hidden``, ``teacher_hidden``: ``(B, L, H)``, same shape. When the student is narrower than the
      teacher, the caller projects it to the teacher's width first (the trainer owns one projection per pairing).
    - ``mask``: ``(B, L)`` bool or 0/1 integer tensor (an attention mask), True/1 = the token counts; None = all.

Reduction: per-token values are summed over counted tokens and divided by the number of counted tokens, or by
``num_items_in_batch`` when given. Computed in fp32; the result is an fp32 scalar.
"""

import torch
import torch.nn.functional as F

from hf_distill.losses.logits import _check_mask, _divide_by_count, _reduce_per_position
from hf_distill.losses.squared import weighted_squared_error

__all__ = ["hidden_cosine_loss", "hidden_mse_loss"]


def _check_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden states have shape {tuple(student_hidden.shape)} but teacher hidden states have shape "
            f"{tuple(teacher_hidden.shape)}: batch and sequence dims must match. Tokenize once and feed the same "
            "input_ids to both models."
        )
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"student hidden states have shape {tuple(student_hidden.shape)} but teacher hidden states have shape "
            f"{tuple(teacher_hidden.shape)}: the widths differ ({student_hidden.shape[-1]} vs "
            f"{teacher_hidden.shape[-1]}). A projection is needed: map the student's hidden states to the teacher's "
            "width (e.g. nn.Linear(student_width, teacher_width)) before calling the loss."
        )


def hidden_mse_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between hidden states, per token.

    Intermediate-layer matching as in FitNets (https://arxiv.org/abs/1412.6550) and TinyBERT
    (https://arxiv.org/abs/1909.10351): per token, the mean over H of ``(student - teacher) ** 2``, in fp32.

    Args:
        student_hidden: ``(B, L, H)`` student hidden states (already projected to the teacher's width).
        teacher_hidden: ``(B, L, H)`` teacher hidden states.
        mask: ``(B, L)`` bool or 0/1 tensor, True/1 where the token counts; None = every token counts.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            tokens (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted tokens / (number of counted tokens or ``num_items_in_batch``).
    """
    _check_hidden(student_hidden, teacher_hidden)
    mask = _check_mask(mask, student_hidden.shape[:-1], "hidden states")
    width = max(student_hidden.shape[-1], 1)
    if mask is None:
        total = weighted_squared_error(student_hidden, teacher_hidden, 1.0 / width)
        return _divide_by_count(total, student_hidden.shape[:-1].numel(), num_items_in_batch)
    keep = mask[..., None]  # (B, L, 1): each counted token's mean over H, summed (see hf_distill.losses.squared)
    total = weighted_squared_error(student_hidden, teacher_hidden, keep / width, keep)
    return _divide_by_count(total, mask.sum(), num_items_in_batch)


def hidden_cosine_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine embedding loss between hidden states, per token.

    DistilBERT's cosine loss (Sanh et al. 2019, https://arxiv.org/abs/1910.01108): per token,
    ``1 - cosine_similarity(student, teacher)`` over H, in fp32. It aligns directions and ignores norms, so it lies in
    ``[0, 2]``: 0 for parallel vectors, 2 for opposite ones.

    Args:
        student_hidden: ``(B, L, H)`` student hidden states (already projected to the teacher's width).
        teacher_hidden: ``(B, L, H)`` teacher hidden states.
        mask: ``(B, L)`` bool or 0/1 tensor, True/1 where the token counts; None = every token counts.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            tokens (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted tokens / (number of counted tokens or ``num_items_in_batch``).
    """
    _check_hidden(student_hidden, teacher_hidden)
    mask = _check_mask(mask, student_hidden.shape[:-1], "hidden states")
    per_token = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return _reduce_per_position(per_token, mask, num_items_in_batch)
