"""Output-distribution (logit) distillation losses.

Every loss here is a pure function of tensors with the same signature::

    fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_items_in_batch=None) -> scalar

Shapes:
    - ``student_logits``, ``teacher_logits``: ``(..., C)``, e.g. ``(B, C)`` for sequence classification or
      ``(B, L, V)`` for token classification / language modelling. Both must have the same shape.
    - ``mask``: bool (or 0/1 integer) tensor of the leading shape ``(...)``; ``True`` means the position counts.
      ``None`` means every position counts. Callers build it from an attention mask or from ``labels != -100``.

Reduction (shared by every loss in this package, see :func:`_reduce_per_position`): the per-position values of
counted positions are summed, then divided by the number of counted positions (``batchmean`` for ``(B, C)``) or,
when given, by ``num_items_in_batch``. Softmaxes are computed in fp32 and the result is an fp32 scalar.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["binary_kl_div_loss", "jsd_loss", "kl_div_loss", "logits_mse_loss", "reverse_kl_div_loss"]


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers (also used by hidden.py and attention.py)
# --------------------------------------------------------------------------------------------------------------------


def _check_mask(mask: torch.Tensor | None, expected_shape: torch.Size, what: str) -> torch.Tensor | None:
    """Returns ``mask`` as a bool tensor after checking it has ``expected_shape``."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {what} needs shape {tuple(expected_shape)}. Pass a bool (or 0/1) "
            "mask with one entry per position, e.g. the attention mask or labels != -100."
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _reduce_per_position(
    per_position: torch.Tensor,
    mask: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """Sums per-position losses over counted positions and divides by the count (or ``num_items_in_batch``).

    Masked positions are dropped with ``torch.where`` (not multiplied by 0), so inf/NaN values computed for padding
    cannot leak into the result. Nothing here synchronises with the host, and when no position counts the result is
    a zero that is still connected to the graph, so ``backward()`` yields zero gradients.

    Args:
        per_position: fp32 tensor of shape ``(...)``, one loss value per position.
        mask: bool tensor of shape ``(...)`` or ``None`` (every position counts).
        num_items_in_batch: the number of counted positions in the whole gradient-accumulation window, as passed by
            ``Trainer.compute_loss``. Dividing every micro-batch by it makes the sum of micro-batch losses the exact
            mean over the window. ``None`` divides by this call's own count.

    Returns:
        fp32 scalar. A count of 0 is treated as 1 (the sum is then 0 anyway).
    """
    if mask is None:
        total = per_position.sum()
        count = per_position.numel()
    else:
        total = torch.where(mask, per_position, 0.0).sum()
        count = mask.sum()
    return _divide_by_count(total, count, num_items_in_batch)


def _divide_by_count(
    total: torch.Tensor, count: int | torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """``total / count``, or ``total / num_items_in_batch`` when given; a denominator below 1 counts as 1."""
    denominator = count if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=total.device, dtype=torch.float32).clamp(min=1.0)
    else:
        denominator = max(denominator, 1)
    return total / denominator


# --------------------------------------------------------------------------------------------------------------------
# Logit losses
# --------------------------------------------------------------------------------------------------------------------


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | None) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits have shape "
            f"{tuple(teacher_logits.shape)}. Student and teacher must share the label set / vocabulary (same "
            "num_labels, same tokenizer and positions); if only the vocabularies' padding differs, slice both to "
            "the shared vocabulary, e.g. logits[..., :vocab_size]."
        )
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}. Use e.g. 2.0.")


def _kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probabilities, with 0 * log 0 = 0 (entries where p == 0 add nothing)."""
    p = log_p.exp()
    # p == 0 exactly where log_p == -inf (masked vocabulary entries). Selecting the log-ratio before multiplying keeps
    # -inf - (-inf) = NaN out of the forward pass and out of the gradient (0 * NaN would still be NaN).
    log_ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * log_ratio).sum(-1)


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return log_s, log_t


def kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL divergence KL(p_T || p_S) between temperature-softened distributions, times T².

    Classic knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531): per position,
    ``T**2 * sum_c p_T[c] * (log p_T[c] - log p_S[c])`` with ``p = softmax(logits / T)`` computed in fp32. The T²
    factor keeps gradient magnitudes independent of T. Teacher logits of ``-inf`` (masked vocabulary entries) give
    ``p_T = 0`` and contribute nothing (0 * log 0 = 0), so they never produce NaN.

    For ``(B, C)`` inputs and no mask this equals
    ``F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction="batchmean", log_target=True) * T**2``.

    Args:
        student_logits: ``(..., C)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., C)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: softmax temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    per_position = _kl_per_position(log_t, log_s) * temperature**2
    return _reduce_per_position(per_position, mask, num_items_in_batch)


def reverse_kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL divergence KL(p_S || p_T) between temperature-softened distributions, times T².

    Mode-seeking counterpart of :func:`kl_div_loss`, used for generative students (MiniLLM,
    https://arxiv.org/abs/2306.08543; GKD, https://arxiv.org/abs/2306.13649): per position
    ``T**2 * sum_c p_S[c] * (log p_S[c] - log p_T[c])``, fp32 softmax. If the teacher masks vocabulary entries with
    ``-inf`` the student must mask the same entries, otherwise the divergence is (correctly) infinite.

    Args:
        student_logits: ``(..., C)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., C)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: softmax temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    per_position = _kl_per_position(log_s, log_t) * temperature**2
    return _reduce_per_position(per_position, mask, num_items_in_batch)


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence with beta = 0.5, times T².

    From GKD (Agarwal et al. 2023, https://arxiv.org/abs/2306.13649): per position
    ``T**2 * (0.5 * KL(p_T || m) + 0.5 * KL(p_S || m))`` with ``m = 0.5 * (p_S + p_T)``, fp32 softmax. ``log m`` is
    computed stably as ``logsumexp(log p_S, log p_T) - log 2``. The loss is symmetric in its two arguments and bounded
    by ``ln(2) * T**2`` per position; ``-inf`` teacher logits are handled (0 * log 0 = 0).

    Args:
        student_logits: ``(..., C)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., C)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: softmax temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    # logaddexp is the two-argument logsumexp. Its gradient is NaN where both inputs are -inf (an entry masked in both
    # models) even when unused, so feed it zeros there; such entries have p_S = p_T = 0 and add nothing to either term.
    masked_in_both = torch.isneginf(log_s) & torch.isneginf(log_t)
    log_m = torch.logaddexp(log_s.masked_fill(masked_in_both, 0.0), log_t.masked_fill(masked_in_both, 0.0))
    log_m = log_m - math.log(2.0)
    per_position = 0.5 * _kl_per_position(log_t, log_m) + 0.5 * _kl_per_position(log_s, log_m)
    return _reduce_per_position(per_position * temperature**2, mask, num_items_in_batch)


def logits_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between raw logits.

    Logit matching (Ba & Caruana 2014, https://arxiv.org/abs/1312.6184; compared with KL in Kim et al. 2021,
    https://arxiv.org/abs/2105.08919): per position, the mean over the class dim of
    ``(student_logits - teacher_logits) ** 2``, in fp32. ``temperature`` is accepted so every logit loss shares one
    signature, but it is ignored: MSE compares raw logits, no softmax, no T² factor.

    Args:
        student_logits: ``(..., C)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., C)`` teacher logits, same shape as ``student_logits``; must be finite.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: ignored.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature=None)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    per_position = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return _reduce_per_position(per_position, mask, num_items_in_batch)


def binary_kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class binary KL divergence between sigmoid outputs at temperature T, times T², for multi-label heads.

    A multi-label head makes C independent yes/no decisions, so each class c is distilled as its own Bernoulli
    distribution ``p = sigmoid(logit_c / T)`` (the softmax over ``[logit_c / T, 0]``): per class,
    ``T**2 * (p_T log(p_T / p_S) + (1 - p_T) log((1 - p_T) / (1 - p_S)))``, computed in fp32 from log-sigmoids.
    Each row scores the **mean over its C classes**, so for ``(B, C)`` inputs and no mask the result is the mean over
    rows x classes, the reduction of ``BCEWithLogitsLoss`` (and of the multi-label task loss).

    Args:
        student_logits: ``(..., C)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., C)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the row counts; None = every row counts.
        temperature: sigmoid temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it (the rows of the whole gradient-accumulation
            window) instead of by this call's number of counted rows.

    Returns:
        fp32 scalar: sum over counted rows of the class-mean / (number of counted rows or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    # log sigmoid(x) and log(1 - sigmoid(x)) = log sigmoid(-x), stacked as a 2-way distribution per class.
    log_s = torch.stack([F.logsigmoid(s), F.logsigmoid(-s)], dim=-1)
    log_t = torch.stack([F.logsigmoid(t), F.logsigmoid(-t)], dim=-1)
    per_row = _kl_per_position(log_t, log_s).mean(-1) * temperature**2
    return _reduce_per_position(per_row, mask, num_items_in_batch)
