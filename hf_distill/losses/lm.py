"""Token-level divergences for causal-LM distillation.

Every loss here has the signature of the logit losses in :mod:`hf_distill.losses.logits` plus one keyword of its own::

    fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_items_in_batch=None, <beta | alpha>)

Shapes: ``student_logits`` and ``teacher_logits`` are ``(..., V)``, typically ``(B, L, V)`` (already shifted so that
position i scores token i + 1); ``mask`` is ``(...)``, True where the position counts, e.g. ``labels != -100``.

Reduction, exactly as for the other logit losses (:func:`~hf_distill.losses.logits._reduce_per_position`): per-position
values of counted positions are summed and divided by the number of counted positions or, when given, by
``num_items_in_batch``. Softmaxes are taken in fp32 (fp64 inputs stay fp64, so ``torch.autograd.gradcheck`` applies),
per-position values are multiplied by T² like every logit loss of the package, and teacher logits of ``-inf`` (masked
vocabulary entries) are probability 0 and add nothing (0 * log 0 = 0).

``LM_LOGIT_LOSSES`` maps the names used for causal-LM distillation to these functions (forward and reverse KL are the
ones of :mod:`hf_distill.losses.logits`).
"""

import math

import torch
import torch.nn.functional as F

from hf_distill.losses.logits import (
    _check_logits,
    _check_mask,
    _kl_per_position,
    _reduce_per_position,
    kl_div_loss,
    reverse_kl_div_loss,
)

__all__ = [
    "LM_LOGIT_LOSSES",
    "generalized_jsd_loss",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "total_variation_loss",
]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-softened log-softmaxes of both models, in fp32 (or fp64 for fp64 inputs)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return log_s, log_t


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a * p_a + (1 - weight_a) * p_b)`` from log-probabilities, without leaving log space.

    ``logaddexp`` has a NaN gradient where both inputs are -inf (an entry masked in both models) even though such
    entries are never used (both probabilities are 0 there), so those inputs are replaced by zeros first.
    """
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    masked_in_both = torch.isneginf(log_a) & torch.isneginf(log_b)
    return torch.logaddexp(
        log_a.masked_fill(masked_in_both, 0.0) + math.log(weight_a),
        log_b.masked_fill(masked_in_both, 0.0) + math.log1p(-weight_a),
    )


def _check_unit_interval(name: str, value: float, *, allow_one: bool, hint: str) -> None:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}. {hint}")


# --------------------------------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------------------------------


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD, with TRL's convention for ``beta``, times T².

    GKD (Agarwal et al. 2024, https://arxiv.org/abs/2306.13649, Eq. 1), as computed by TRL's
    ``GKDTrainer.generalized_jsd_loss``: per position, with ``p = softmax(logits / T)`` in fp32,

        m = beta * p_T + (1 - beta) * p_S
        JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

    i.e. ``beta`` weighs the **teacher** both in the mixture and in front of ``KL(p_T || m)``; ``1 - beta`` weighs the
    student. Like TRL, the two end points are not the (vanishing) limits of that formula but the KLs GKD interpolates
    between: ``beta = 0`` is the forward KL ``KL(p_T || p_S)`` (:func:`~hf_distill.losses.logits.kl_div_loss`) and
    ``beta = 1`` the reverse KL ``KL(p_S || p_T)`` (:func:`~hf_distill.losses.logits.reverse_kl_div_loss`).
    ``beta = 0.5`` is the symmetric JSD (:func:`~hf_distill.losses.logits.jsd_loss`). Unlike TRL, the value is
    multiplied by T² like every logit loss of this package (the same at T = 1). ``log m`` is computed in log space.

    Args:
        student_logits: ``(..., V)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., V)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: softmax temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).
        beta: teacher weight in [0, 1] (TRL's ``GKDConfig.beta``).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    _check_unit_interval(
        "beta", beta, allow_one=True, hint="0 is the forward KL, 1 the reverse KL, 0.5 the symmetric JSD."
    )
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    if beta == 0.0:
        per_position = _kl_per_position(log_t, log_s)
    elif beta == 1.0:
        per_position = _kl_per_position(log_s, log_t)
    else:
        log_m = _log_mixture(log_t, log_s, beta)
        per_position = beta * _kl_per_position(log_t, log_m) + (1.0 - beta) * _kl_per_position(log_s, log_m)
    return _reduce_per_position(per_position * temperature**2, mask, num_items_in_batch)


def total_variation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation distance between the token distributions, times T².

    One of the symmetric divergences of f-distill (sequence-level KD as f-divergence minimisation, Wen et al. 2023,
    https://arxiv.org/abs/2307.15190): per position ``T**2 * 0.5 * sum_v |p_T[v] - p_S[v]|`` with
    ``p = softmax(logits / T)`` in fp32. Symmetric, bounded by ``T**2`` per position. The T² factor is kept so every
    logit loss of the package shares one scale convention (it is 1 at T = 1).

    Args:
        student_logits: ``(..., V)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., V)`` teacher logits, same shape as ``student_logits``.
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
    per_position = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return _reduce_per_position(per_position * temperature**2, mask, num_items_in_batch)


_ALPHA_HINT = "alpha = 0 is the plain KL, alpha = 1 makes the divergence 0 for every input; DistiLLM uses 0.1."


def skew_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew KL divergence of DistiLLM, ``KL(p_T || alpha p_T + (1 - alpha) p_S)``, times T².

    DistiLLM (Ko et al. 2024, https://arxiv.org/abs/2402.03898): per position
    ``T**2 * sum_v p_T[v] * (log p_T[v] - log(alpha p_T[v] + (1 - alpha) p_S[v]))`` with ``p = softmax(logits / T)``
    in fp32. Mixing a little of the teacher into the student's distribution bounds the log-ratio by ``-log(alpha)``,
    which keeps the gradient stable where the student puts almost no mass. The mixture's log is computed in log space
    (``logaddexp(log alpha + log p_T, log(1 - alpha) + log p_S)``). ``alpha = 0`` is the forward KL.

    Args:
        student_logits: ``(..., V)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., V)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: softmax temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).
        alpha: skew in [0, 1): the teacher's share of the mixture.

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    _check_unit_interval("alpha", alpha, allow_one=False, hint=_ALPHA_HINT)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    per_position = _kl_per_position(log_t, _log_mixture(log_t, log_s, alpha))
    return _reduce_per_position(per_position * temperature**2, mask, num_items_in_batch)


def skew_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL divergence of DistiLLM, ``KL(p_S || alpha p_S + (1 - alpha) p_T)``, times T².

    DistiLLM (Ko et al. 2024, https://arxiv.org/abs/2402.03898): per position
    ``T**2 * sum_v p_S[v] * (log p_S[v] - log(alpha p_S[v] + (1 - alpha) p_T[v]))`` with ``p = softmax(logits / T)``
    in fp32, the mixture's log computed in log space. With ``alpha > 0`` the value stays finite where the teacher
    masks an entry (``-inf``) that the student does not; ``alpha = 0`` is the reverse KL.

    Args:
        student_logits: ``(..., V)`` student logits, any float dtype (upcast to fp32).
        teacher_logits: ``(..., V)`` teacher logits, same shape as ``student_logits``.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts.
        temperature: softmax temperature T > 0.
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).
        alpha: skew in [0, 1): the student's share of the mixture.

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_logits(student_logits, teacher_logits, temperature)
    _check_unit_interval("alpha", alpha, allow_one=False, hint=_ALPHA_HINT)
    mask = _check_mask(mask, student_logits.shape[:-1], "logits")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    per_position = _kl_per_position(log_s, _log_mixture(log_s, log_t, alpha))
    return _reduce_per_position(per_position * temperature**2, mask, num_items_in_batch)


LM_LOGIT_LOSSES = {
    "forward_kl": kl_div_loss,
    "reverse_kl": reverse_kl_div_loss,
    "generalized_jsd": generalized_jsd_loss,
    "total_variation": total_variation_loss,
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": skew_reverse_kl_loss,
}
