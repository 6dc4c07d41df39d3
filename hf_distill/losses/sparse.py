"""Forward KL against a sparse teacher: its top-k log-probabilities plus the mass of everything else.

A teacher cache of an LM cannot hold the full distribution (49,152 float32 per token for SmolLM2: 192 KiB), but the
top-k log-probabilities and the log of the remaining mass, ``log(1 - Σ_top-k p)``, take ``8k + 4`` bytes and are a
*proper* distribution over k + 1 buckets: the k ids and one "tail" bucket for the rest of the vocabulary. The loss
here compares the student with it, coarsened the same way::

    q_i = softmax(z / T)_i at the teacher's k ids,   q_tail = 1 - Σ_i q_i   (= Σ of the student's other entries)
    loss = T² · [ Σ_i p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail) ]

Compared with the full-vocabulary KL this drops only the term ``p_tail · KL(p_rest/p_tail ‖ q_rest/q_tail)`` (the
chain rule of KL), so it is a lower bound of the full KL (data-processing inequality), equal to it when the teacher
puts no mass outside its top-k, or when the tail is a single entry (k = V − 1) or empty (k = V). Unlike the
renormalised top-k (``hf_distill.cache.densify_top_k``) the student is not pushed to put all of its mass on the k
ids: it is asked to put ``p_tail`` outside them, wherever it likes.

No dense ``(tokens, vocabulary)`` teacher tensor is made: the teacher enters as ``(..., k)`` ids and log-probabilities
and a ``(...)`` tail. The student's own logits are dense; its tail is the log-sum-exp over its logits with the k ids
masked out, minus its full log-sum-exp, which is exact even when its top-k mass is within float rounding of 1
(``log(1 - Σ q_i)`` computed from the sum would round to ``-inf`` there). This costs one masked copy of the student's
scaled logits, as a ``log_softmax`` would.

Reduction, masking and T² scaling are those of :mod:`hf_distill.losses.logits` (``_reduce_per_position``): per-position
values of counted positions are summed and divided by their count or by ``num_items_in_batch``; fp32 (fp64 inputs
stay fp64, for ``torch.autograd.gradcheck``).
"""

import torch

from hf_distill.losses.logits import _check_mask, _reduce_per_position

__all__ = ["sparse_kl_loss", "sparse_teacher_distribution"]


def _masked_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp(x, -1)`` that is ``-inf`` with a zero (not NaN) gradient where every entry is ``-inf``.

    ``torch.logsumexp`` back-propagates ``exp(x - result)``, which is ``exp(-inf + inf) = NaN`` for an all ``-inf``
    row even when the incoming gradient is 0 (an empty tail, k = V).
    """
    shift = x.detach().amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    total = (x - shift).exp().sum(-1)
    empty = total == 0  # the maximum entry contributes exp(0) = 1 unless every entry is -inf
    return torch.where(empty, float("-inf"), torch.where(empty, 1.0, total).log() + shift.squeeze(-1))


def _tail_logprob(scaled_logits: torch.Tensor, ids: torch.Tensor, log_normaliser: torch.Tensor) -> torch.Tensor:
    """``log Σ_{j not in ids} softmax(scaled_logits)_j`` per position, from the complement (no cancellation)."""
    rest = scaled_logits.scatter(-1, ids, float("-inf"))
    return _masked_logsumexp(rest) - log_normaliser


def sparse_teacher_distribution(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse form of a teacher's distribution: its k most likely ids, their log-probabilities and the tail.

    What ``TeacherCacheSpec(top_k=k, top_k_tail=True, temperature=T)`` stores per position. The tail is the
    log-sum-exp of the logits outside the top-k minus the full one (exact; ``-inf`` when k covers the vocabulary).

    Args:
        teacher_logits: ``(..., V)`` logits.
        k: ids kept per position, ``1 <= k <= V``.
        temperature: T > 0; log-probabilities are those of ``softmax(teacher_logits / T)``.

    Returns:
        ``(ids, logprobs, tail_logprob)``: ``(..., k)`` int32 ids in decreasing probability, ``(..., k)`` and ``(...)``
        log-probabilities in fp32 (fp64 for fp64 logits).
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}. Use e.g. 32.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}. Use e.g. 1.0.")
    scaled = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)) / temperature
    log_normaliser = torch.logsumexp(scaled, -1)
    top = scaled.topk(k, dim=-1)
    logprobs = top.values - log_normaliser.unsqueeze(-1)
    return top.indices.to(torch.int32), logprobs, _tail_logprob(scaled, top.indices, log_normaliser)


def _check_sparse(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    temperature: float,
) -> None:
    positions, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if teacher_ids.shape != teacher_logprobs.shape or tuple(teacher_ids.shape[:-1]) != positions:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} must both "
            f"have shape (*positions, k) with the student logits' positions {positions} (student logits: "
            f"{tuple(student_logits.shape)}). Pass one row of k ids and log-probabilities per student position."
        )
    if tuple(teacher_tail_logprob.shape) != positions:
        raise ValueError(
            f"teacher_tail_logprob has shape {tuple(teacher_tail_logprob.shape)}, expected the positions {positions} "
            "of the student logits (one tail per position; squeeze a trailing dim of 1)."
        )
    if teacher_ids.shape[-1] > vocab:
        raise ValueError(
            f"the teacher has k={teacher_ids.shape[-1]} ids per position, more than the student's vocabulary of "
            f"{vocab}. Student and teacher must share the vocabulary; slice both to it."
        )
    if teacher_ids.is_floating_point() or teacher_ids.is_complex():
        raise ValueError(f"teacher_ids must be integer token ids, got dtype {teacher_ids.dtype}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}. Use e.g. 2.0.")


def sparse_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL from the teacher's (k + 1)-bucket distribution to the student's coarsened alike, times T².

    See the module docstring for the formula and why it is a lower bound of the full-vocabulary ``kl_div_loss``,
    equal to it when the teacher has no mass outside its top-k. Teacher entries of probability 0 (log-probability
    ``-inf``, e.g. an empty tail when k = V) add nothing (0 · log 0 = 0) and never produce NaN.

    Args:
        student_logits: ``(..., V)`` student logits, any float dtype (upcast to fp32).
        teacher_ids: ``(..., k)`` integer ids of the teacher's top-k (any order; no id twice at a counted position).
        teacher_logprobs: ``(..., k)`` teacher log-probabilities at those ids, at temperature ``temperature``.
        teacher_tail_logprob: ``(...)`` log of the teacher's mass outside the k ids, at the same temperature.
        mask: ``(...)`` bool tensor, True where the position counts; None = every position counts. Padded positions
            of a cached batch hold zeros (not a distribution) and must be masked.
        temperature: T > 0 of the student's softmax and of the T² factor; must be the one the teacher's
            log-probabilities were taken at (a teacher cache stores it in its key).
        num_items_in_batch: if given, divide the summed loss by it instead of by this call's number of counted
            positions (exact means under gradient accumulation).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    _check_sparse(student_logits, teacher_ids, teacher_logprobs, teacher_tail_logprob, temperature)
    mask = _check_mask(mask, student_logits.shape[:-1], "student_logits")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    ids = teacher_ids.long()
    scaled = student_logits.to(dtype) / temperature
    log_normaliser = torch.logsumexp(scaled, -1)
    student_top = scaled.gather(-1, ids) - log_normaliser.unsqueeze(-1)
    student_tail = _tail_logprob(scaled, ids, log_normaliser)

    teacher = torch.cat([teacher_logprobs.to(dtype), teacher_tail_logprob.to(dtype).unsqueeze(-1)], -1)
    student = torch.cat([student_top, student_tail.unsqueeze(-1)], -1)
    p = teacher.exp()
    # Select the log-ratio before multiplying: where p == 0, -inf - (-inf) = NaN must stay out of both passes.
    log_ratio = torch.where(p > 0, teacher - student, 0.0)
    per_position = (p * log_ratio).sum(-1) * temperature**2
    return _reduce_per_position(per_position, mask, num_items_in_batch)
