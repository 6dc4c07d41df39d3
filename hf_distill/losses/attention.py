"""Self-attention distillation losses.

Every loss here is a pure function of tensors with the same signature::

    fn(student_attn, teacher_attn, mask=None, *, num_items_in_batch=None) -> scalar

Shapes:
    - ``student_attn``, ``teacher_attn``: ``(B, heads, L, L)`` attention probabilities (what HF models return with
      ``output_attentions=True``): row ``[b, h, i]`` is query token i's distribution over keys j, summing to 1
      over the valid keys. Student and teacher must have the same number of heads.
    - ``mask``: ``(B, L)`` bool or 0/1 token mask (an attention mask); None = all tokens. It masks both query rows
      (padding queries are not counted) and key columns (padding keys are left out of each row).

Reduction: per (b, head, query i) row value -> mean over heads -> per-token value; per-token values are summed over
counted query tokens and divided by their number, or by ``num_items_in_batch`` when given. fp32 compute and output.
"""

import torch

from hf_distill.losses.logits import _check_mask, _divide_by_count, _reduce_per_position
from hf_distill.losses.squared import weighted_squared_error

__all__ = ["attention_kl_loss", "attention_mse_loss"]

_TINY = torch.finfo(torch.float32).tiny


def _check_attention(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validates shapes; returns the ``(B, 1, 1, L)`` key mask and ``(B, L)`` query mask, or (None, None)."""
    if student_attn.ndim != 4 or teacher_attn.ndim != 4:
        raise ValueError(
            "attention maps must have shape (batch, heads, seq_len, seq_len), got student "
            f"{tuple(student_attn.shape)} and teacher {tuple(teacher_attn.shape)}. Pass one layer's attentions, e.g. "
            "outputs.attentions[i]."
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"student attention has shape {tuple(student_attn.shape)} but teacher attention has shape "
            f"{tuple(teacher_attn.shape)}: {student_attn.shape[1]} vs {teacher_attn.shape[1]} heads. Attention "
            "transfer pairs heads one to one, so the student needs the teacher's number of heads; otherwise use a "
            "hidden-state loss for this layer."
        )
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"student attention has shape {tuple(student_attn.shape)} but teacher attention has shape "
            f"{tuple(teacher_attn.shape)}: batch and sequence dims must match. Feed the same input_ids to both models."
        )
    batch, _, _, seq_len = student_attn.shape
    query_mask = _check_mask(mask, torch.Size((batch, seq_len)), "attention maps")
    if query_mask is None:
        return None, None
    return query_mask[:, None, None, :], query_mask


def attention_mse_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between attention probabilities.

    TinyBERT's attention-based distillation (Jiao et al. 2019, https://arxiv.org/abs/1909.10351), applied to
    probabilities: for each (b, head, query i), the mean over valid keys j of ``(s[b,h,i,j] - t[b,h,i,j]) ** 2``;
    each query token's value is the mean over heads.

    Args:
        student_attn: ``(B, heads, L, L)`` student attention probabilities, any float dtype (upcast to fp32).
        teacher_attn: ``(B, heads, L, L)`` teacher attention probabilities.
        mask: ``(B, L)`` bool or 0/1 token mask, masking query rows and key columns; None = every token counts.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            query tokens (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted query tokens / (number of counted tokens or ``num_items_in_batch``).
    """
    key_mask, query_mask = _check_attention(student_attn, teacher_attn, mask)
    batch, heads, seq_len, _ = student_attn.shape
    # Each counted (b, h, i, j) entry weighs 1 / (valid keys of row b * heads): the per-row mean over keys, then the
    # mean over heads, summed over counted query tokens in one weighted sum (see hf_distill.losses.squared).
    if key_mask is None:
        total = weighted_squared_error(student_attn, teacher_attn, 1.0 / max(seq_len * heads, 1))
        return _divide_by_count(total, batch * seq_len, num_items_in_batch)
    num_keys = key_mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1, 1, 1); a row with no valid key counts 0 anyway
    keep = query_mask[:, None, :, None] & key_mask  # (B, 1, L, L): counted query rows x valid key columns
    total = weighted_squared_error(student_attn, teacher_attn, keep / (num_keys * heads), keep)
    return _divide_by_count(total, query_mask.sum(), num_items_in_batch)


def attention_kl_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL divergence KL(t || s) between teacher and student attention distributions, per query row.

    MiniLM's self-attention distribution transfer (Wang et al. 2020, https://arxiv.org/abs/2002.10957): for each
    (b, head, query i), ``sum_j t[b,h,i,j] * (log t[b,h,i,j] - log s[b,h,i,j])`` over valid keys j; each query
    token's value is the mean over heads. Entries with ``t == 0`` contribute 0, and ``s`` is clamped to
    ``torch.finfo(torch.float32).tiny`` before the log, so the result is never NaN or inf.

    Args:
        student_attn: ``(B, heads, L, L)`` student attention probabilities, any float dtype (upcast to fp32).
        teacher_attn: ``(B, heads, L, L)`` teacher attention probabilities.
        mask: ``(B, L)`` bool or 0/1 token mask, masking query rows and key columns; None = every token counts.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            query tokens (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted query tokens / (number of counted tokens or ``num_items_in_batch``).
    """
    key_mask, query_mask = _check_attention(student_attn, teacher_attn, mask)
    s = student_attn.float()
    t = teacher_attn.float()
    counts = t > 0 if key_mask is None else (t > 0) & key_mask
    # Select before multiplying so padding entries (t may be anything there) can put neither NaN/inf in the value nor
    # 0 * inf = NaN in the gradient; log(1) = 0 keeps -inf out of the unselected branch.
    log_ratio = torch.where(counts, torch.where(counts, t, 1.0).log() - s.clamp(min=_TINY).log(), 0.0)
    per_row = (torch.where(counts, t, 0.0) * log_ratio).sum(-1)
    return _reduce_per_position(per_row.mean(1), query_mask, num_items_in_batch)
