"""Closed-form value and student-logit gradient of each causal-LM divergence on a chunk of positions.

Used by :mod:`hf_distill.losses.chunked`, which needs, per chunk of ``n`` counted positions, the chunk's share of the
loss and its gradient with respect to the chunk's ``(n, V)`` student logits, without keeping an autograd graph. A
local autograd pass over the :mod:`hf_distill.losses.lm` function would give the same numbers, but it keeps every
fp32 intermediate of the forward pass until its backward (measured in the fused loss: about 8 ``(n, V)`` tensors at
the peak for the forward KL, 13 for the generalised JSD); written out by hand, with in-place updates, 4 to 6 exist
at a time (forward / reverse KL 4, skew reverse KL 6), which is what bounds the peak memory of the fused loss
(Liger-Kernel's fused linear JSD computes its gradient in place the same way, ``liger_kernel/ops/jsd.py``).

Notation, per position: ``z = logits / T``, ``q = log_softmax(z_S)``, ``r = log_softmax(z_T)``, ``p_S = exp(q)``,
``p_T = exp(r)``. Each divergence below returns the sum over the chunk of its per-position value (without T²) and
``G = d(sum) / d z_S``, obtained from ``g = d(sum) / d q`` through the log-softmax: ``G = g - p_S * sum_v g``. The
caller's loss is ``T² * sum / D`` (``D`` the number of counted positions or ``num_items_in_batch``), so its gradient
with respect to the student logits is ``G * T / D``. Entries with probability 0 (``-inf`` logits) are dropped exactly
as :func:`~hf_distill.losses.logits._kl_per_position` drops them, so they never produce NaN.

    forward KL  sum p_T (r - q)                        g = -p_T
    reverse KL  sum p_S (q - r)                        g = p_S (q - r + 1)
    gen. JSD    beta KL(p_T||m) + (1-beta) KL(p_S||m)  g = (1 - beta) p_S (q - log m),  m = beta p_T + (1-beta) p_S
    total var.  0.5 sum |p_T - p_S|                    g = 0.5 p_S sign(p_S - p_T)
    skew KL     KL(p_T || m)                           g = -(1 - alpha) p_T p_S / m,    m = alpha p_T + (1-alpha) p_S
    skew rev.   KL(p_S || m)                           g = p_S (q - log m + 1 - alpha p_S / m),  m = alpha p_S + ...
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["ANALYTIC_DIVERGENCES", "chunk_value_and_grad", "softened_log_probs"]

ANALYTIC_DIVERGENCES = (
    "forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "skew_kl", "skew_reverse_kl",
)  # fmt: skip


def softened_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in fp32 (fp64 for fp64 logits), as the lm.py losses compute it; a new tensor."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a p_a + (1 - weight_a) p_b)`` for 0 < weight_a < 1 (no autograd here, so -inf + -inf is just
    -inf: the entry is dropped by the probability-0 masks below)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _masked_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``log p - log q`` where ``p > 0``, else 0 (a new tensor)."""
    return torch.sub(log_p, log_q).masked_fill_(p == 0, 0.0)


def _project(g: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """``g - p_S * sum_v g``, in place: the log-softmax's backward."""
    return g.addcmul_(p_s, g.sum(-1, keepdim=True), value=-1.0)


def _forward_kl(log_s, log_t, need_grad):
    p_t = log_t.exp()
    total = _masked_log_ratio(log_t, log_s, p_t).mul_(p_t).sum()
    if not need_grad:
        return total, None
    # g = -p_T, so G = p_S * sum_v p_T - p_T (log_s is not needed any more: it becomes p_S in place).
    return total, log_s.exp_().mul_(p_t.sum(-1, keepdim=True)).sub_(p_t)


def _reverse_kl(log_s, log_t, need_grad):
    p_s = log_s.exp()
    weighted = _masked_log_ratio(log_s, log_t, p_s).mul_(p_s)  # p_S (q - r)
    total = weighted.sum()
    if not need_grad:
        return total, None
    return total, _project(weighted.add_(p_s), p_s)


def _generalized_jsd(log_s, log_t, need_grad, beta):
    log_m = _log_mixture(log_t, log_s, beta)
    p_t = log_t.exp()
    kl_t = _masked_log_ratio(log_t, log_m, p_t).mul_(p_t).sum()
    del p_t
    p_s = log_s.exp()
    weighted = _masked_log_ratio(log_s, log_m, p_s).mul_(p_s)  # p_S (q - log m)
    del log_m
    total = beta * kl_t + (1.0 - beta) * weighted.sum()
    if not need_grad:
        return total, None
    return total, _project(weighted.mul_(1.0 - beta), p_s)


def _total_variation(log_s, log_t, need_grad):
    p_s = log_s.exp()
    difference = p_s - log_t.exp()
    total = 0.5 * difference.norm(p=1)
    if not need_grad:
        return total, None
    return total, _project(difference.sign_().mul_(p_s).mul_(0.5), p_s)


def _skew_kl(log_s, log_t, need_grad, alpha):
    log_m = _log_mixture(log_t, log_s, alpha)
    p_t = log_t.exp()
    total = _masked_log_ratio(log_t, log_m, p_t).mul_(p_t).sum()
    if not need_grad:
        return total, None
    # p_T p_S / m = exp(r + q - log m); where p_T = 0 it is 0 (and NaN if log m = -inf too, hence the fill).
    g = torch.add(log_t, log_s).sub_(log_m).exp_().masked_fill_(p_t == 0, 0.0).mul_(-(1.0 - alpha))
    del log_m, p_t
    return total, _project(g, log_s.exp_())


def _skew_reverse_kl(log_s, log_t, need_grad, alpha):
    log_m = _log_mixture(log_s, log_t, alpha)
    p_s = log_s.exp()
    weighted = _masked_log_ratio(log_s, log_m, p_s).mul_(p_s)  # p_S (q - log m)
    total = weighted.sum()
    if not need_grad:
        return total, None
    # p_S (1 - alpha p_S / m), with p_S / m = exp(q - log m) (set to 0 where p_S = 0: NaN if log m = -inf too).
    rest = torch.sub(log_s, log_m).exp_().masked_fill_(p_s == 0, 0.0).mul_(-alpha).add_(1.0).mul_(p_s)
    del log_m
    return total, _project(weighted.add_(rest), p_s)


def chunk_value_and_grad(
    divergence: str,
    log_s: torch.Tensor,
    log_t: torch.Tensor,
    *,
    temperature: float,
    denominator: int | torch.Tensor,
    need_grad: bool,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's share of ``LM_LOGIT_LOSSES[divergence]`` and its gradient with respect to the student logits.

    The caller passes log-probabilities rather than logits so that each model's ``(n, V)`` logits can be freed as
    soon as its log-softmax exists (arguments stay referenced by the caller until this function returns):
    ``chunk_value_and_grad(name, softened_log_probs(student_logits, T), softened_log_probs(teacher_logits, T), ...)``.

    Args:
        divergence: one of ``ANALYTIC_DIVERGENCES``. Inputs are assumed validated (the caller runs the lm.py
            function on zero rows first, which raises its own errors for bad ``temperature`` / ``beta`` / ``alpha``).
        log_s: ``(n, V)`` the chunk's student :func:`softened_log_probs`; overwritten (it becomes the gradient's
            workspace), so pass a tensor of your own.
        log_t: ``(n, V)`` the chunk's teacher :func:`softened_log_probs`; not modified.
        temperature: softmax temperature T.
        denominator: what the whole loss divides by (counted positions of the whole call, or ``num_items_in_batch``).
        need_grad: compute the gradient too.
        beta: ``generalized_jsd``'s teacher weight.
        alpha: ``skew_kl`` / ``skew_reverse_kl``'s skew.

    Returns:
        ``(value, grad)``: the scalar ``T² * sum_chunk / denominator`` in the dtype of the log-probabilities, and its
        gradient with respect to the student logits, ``(n, V)`` in the same dtype, or None when ``need_grad`` is False.
    """
    # The end points are the plain KLs, as in lm.py (and the mixture formulas would meet log(0) there).
    if (
        divergence == "forward_kl"
        or (divergence == "generalized_jsd" and beta == 0.0)
        or (divergence == "skew_kl" and alpha == 0.0)
    ):
        total, grad = _forward_kl(log_s, log_t, need_grad)
    elif (
        divergence == "reverse_kl"
        or (divergence == "generalized_jsd" and beta == 1.0)
        or (divergence == "skew_reverse_kl" and alpha == 0.0)
    ):
        total, grad = _reverse_kl(log_s, log_t, need_grad)
    elif divergence == "generalized_jsd":
        total, grad = _generalized_jsd(log_s, log_t, need_grad, beta)
    elif divergence == "total_variation":
        total, grad = _total_variation(log_s, log_t, need_grad)
    elif divergence == "skew_kl":
        total, grad = _skew_kl(log_s, log_t, need_grad, alpha)
    elif divergence == "skew_reverse_kl":
        total, grad = _skew_reverse_kl(log_s, log_t, need_grad, alpha)
    else:
        raise ValueError(f"divergence must be one of {list(ANALYTIC_DIVERGENCES)}, got {divergence!r}.")
    # As _reduce_per_position: a tensor denominator is used in fp32 on the loss's device, and a count of 0 counts 1.
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=total.device, dtype=torch.float32).clamp(min=1.0)
    else:
        denominator = max(denominator, 1)
    value = total * temperature**2 / denominator
    if grad is not None:
        grad.mul_(temperature / denominator)
    return value, grad
