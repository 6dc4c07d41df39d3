"""One weighted sum of squared errors with its gradient written out: the core of the hidden-state and attention MSE.

``hidden_mse_loss`` and ``attention_mse_loss`` are both ``sum(where(keep, s - t, 0) ** 2 * weight)`` divided by a
count, with ``keep`` and ``weight`` broadcast from the token mask. Left to autograd, that expression keeps a squared
copy, a masked copy and a per-row sum of tensors as large as the attention maps ``(B, heads, L, L)``, and its backward
walks each of them again. Written as one `torch.autograd.Function`, the forward makes the masked difference and the
weighted difference (kept for the backward) and reduces them with one dot product, and the backward is one
multiplication: ``d/ds = 2 * where(keep, s - t, 0) * weight`` (and its negative for ``t``). The values and gradients
are those of the autograd expression (tests/test_losses.py checks them against it).
"""

import torch

__all__ = ["weighted_squared_error"]


class _WeightedSquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, keep):
        diff = student.float() - teacher  # fp32 (a half-precision teacher is promoted inside the subtraction)
        if diff.dtype != torch.float32:  # a float64 teacher
            diff = diff.float()
        if keep is not None:  # masked entries may hold anything (NaN, inf): they are selected away, not multiplied
            diff = torch.where(keep, diff, 0.0)
        weighted = diff * weight
        total = torch.dot(diff.reshape(-1), weighted.reshape(-1))
        ctx.save_for_backward(weighted)
        ctx.dtypes = (student.dtype, teacher.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        (weighted,) = ctx.saved_tensors
        grad_diff = weighted * (2.0 * grad)
        student_dtype, teacher_dtype = ctx.dtypes
        grad_student = grad_diff.to(student_dtype) if ctx.needs_input_grad[0] else None
        grad_teacher = (-grad_diff).to(teacher_dtype) if ctx.needs_input_grad[1] else None
        return grad_student, grad_teacher, None, None


def weighted_squared_error(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor | float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum(where(keep, s - t, 0) ** 2 * weight)`` over every entry, in fp32, as an fp32 scalar.

    Args:
        student: any float tensor; its gradient comes back in its dtype.
        teacher: a tensor of the same shape (any float dtype; it gets a gradient too if it requires one).
        weight: a float, or a tensor broadcastable to ``student``'s shape (not differentiated).
        keep: None (every entry counts) or a bool tensor broadcastable to ``student``'s shape; entries where it is
            False count 0 whatever ``student`` and ``teacher`` hold there, NaN and inf included, and get 0 gradient.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape."
        )
    return _WeightedSquaredError.apply(student, teacher, weight, keep)
