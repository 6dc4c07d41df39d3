"""Relation-based distillation losses: the student imitates how the teacher relates the samples of a batch.

Instead of matching each sample's representation to the teacher's (which needs a projection when the widths
differ), these losses match *relations between samples*: pairwise distances and triplet angles (RKD, Park et al.
2019, https://arxiv.org/abs/1904.05068) or the batch's pairwise similarity matrix (similarity-preserving KD, Tung &
Mori 2019, https://arxiv.org/abs/1907.09682). Each relation is a B x B (or B x B x B) object whatever the width, so
the student and teacher hidden sizes may differ and no projection is learned.

Every loss here is a pure function with the same signature::

    fn(student, teacher) -> scalar

Shapes:
    - ``student``: ``(B, Ds)`` pooled student representations (one row per sample of the batch).
    - ``teacher``: ``(B, Dt)`` pooled teacher representations of the same samples; ``Dt`` may differ from ``Ds``.

Reduction: a relation over B samples does not split into per-sample items, so each loss is a *mean over the batch's
relations* (pairs or triplets), not a per-item sum. Under gradient accumulation the trainer weights each
micro-batch's value by its rows over the window's rows (see `hf_distill.relation_term`). Computed in fp32; the result
is an fp32 scalar; the teacher is detached. A batch too small for any relation (B < 2 pairs, B < 3 triplets) gives
0, still connected to the student's graph.

Duplicate rows (two identical sentences in a batch) are handled exactly: their distance is 0 and its gradient is 0
(never the NaN of ``sqrt'(0)``), their difference direction is the zero vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "RELATION_LOSSES",
    "RKD_ANGLE_WEIGHT",
    "pairwise_distances",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "similarity_preserving_loss",
]

# RKD's weights of its two terms in the paper's metric-learning experiments and its official code (lambda_D = 1,
# lambda_A = 2), used by `rkd_loss`.
RKD_ANGLE_WEIGHT = 2.0


def _check_pooled(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"relation losses take pooled (batch, width) representations, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}. Pool the hidden states over the sequence first (relation_pooling)."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student has {student.shape[0]} rows but teacher has {teacher.shape[0]}: a relation compares the same "
            "samples in both models. Feed both models the same batch."
        )


def _safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm over `dim` whose gradient at the zero vector is 0 instead of NaN."""
    squared = x.pow(2).sum(dim)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(), 0.0)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """`(B, D)` -> `(B, B)` Euclidean distances `||x_i - x_j||`, exactly 0 between equal rows (gradient 0 there).

    Computed from the differences, not from `|x_i|² + |x_j|² - 2 x_i·x_j`, so equal rows give exactly 0 instead of a
    rounding residue whose square root has a huge gradient; this costs a `(B, B, D)` intermediate.
    """
    return _safe_norm(x[:, None, :] - x[None, :, :])


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by their mean over the B(B-1) pairs i != j (RKD's mu), in fp32."""
    batch = x.shape[0]
    distances = pairwise_distances(x)
    mean = distances.sum() / (batch * (batch - 1))  # the diagonal is 0
    return distances / mean.clamp_min(torch.finfo(torch.float32).tiny)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss (Park et al. 2019, https://arxiv.org/abs/1904.05068).

    `psi_D(t_i, t_j) = ||t_i - t_j|| / mu`, with mu the mean distance over the batch's pairs, for both models; the loss
    is the Huber loss (smooth-L1, delta 1) between the student's and the teacher's normalised distances, averaged
    over the B(B-1) ordered pairs i != j. Dividing by mu makes it invariant to the scale of either model's
    representations (the widths may differ). B < 2: 0.

    Args:
        student: `(B, Ds)` pooled student representations.
        teacher: `(B, Dt)` pooled teacher representations.

    Returns:
        fp32 scalar.
    """
    _check_pooled(student, teacher)
    batch = student.shape[0]
    if batch < 2:
        return student.float().sum() * 0.0
    s = _normalised_distances(student.float())
    t = _normalised_distances(teacher.detach().float())
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=s.device)
    huber = F.smooth_l1_loss(s, t, reduction="none", beta=1.0)
    return (huber * off_diagonal).sum() / (batch * (batch - 1))


def _triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """`(B, D)` -> `(B, B, B)`: entry `[j, i, k]` is `cos angle(x_i, x_j, x_k)` at vertex x_j, i.e. the dot product
    of the unit vectors from x_j to x_i and from x_j to x_k (0 where one of them is the zero vector)."""
    differences = x[None, :, :] - x[:, None, :]  # [j, i] = x_i - x_j
    norms = _safe_norm(differences)
    units = differences / torch.where(norms > 0, norms, 1.0).unsqueeze(-1)
    return torch.bmm(units, units.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss (Park et al. 2019, https://arxiv.org/abs/1904.05068).

    `psi_A(t_i, t_j, t_k) = cos angle t_i t_j t_k = <e_ij, e_kj>` with `e_ij = (t_i - t_j) / ||t_i - t_j||`, for
    both models; the loss is the Huber loss (smooth-L1, delta 1) between the student's and the teacher's cosines,
    averaged over the B(B-1)(B-2) ordered triplets of distinct samples. Invariant to the scale and translation of
    either model's representations. B < 3: 0.

    Args:
        student: `(B, Ds)` pooled student representations.
        teacher: `(B, Dt)` pooled teacher representations.

    Returns:
        fp32 scalar.
    """
    _check_pooled(student, teacher)
    batch = student.shape[0]
    if batch < 3:
        return student.float().sum() * 0.0
    s = _triplet_cosines(student.float())
    t = _triplet_cosines(teacher.detach().float())
    eye = torch.eye(batch, dtype=torch.bool, device=s.device)
    # [j, i, k]: i != j, k != j, i != k.
    distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
    huber = F.smooth_l1_loss(s, t, reduction="none", beta=1.0)
    return (huber * distinct).sum() / (batch * (batch - 1) * (batch - 2))


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD's combined loss, distance + `RKD_ANGLE_WEIGHT` (2) x angle, the weights of the paper's experiments."""
    return rkd_distance_loss(student, teacher) + RKD_ANGLE_WEIGHT * rkd_angle_loss(student, teacher)


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, https://arxiv.org/abs/1907.09682).

    `G = A A^T` is the batch's `(B, B)` matrix of dot products, each row L2-normalised (`G~[i] = G[i] / ||G[i]||`);
    the loss is `||G~_T - G~_S||_F² / B²`, the squared Frobenius norm of the difference over B². Invariant to the
    scale of either model's representations; the widths may differ.

    Args:
        student: `(B, Ds)` pooled student representations.
        teacher: `(B, Dt)` pooled teacher representations.

    Returns:
        fp32 scalar.
    """
    _check_pooled(student, teacher)
    s, t = student.float(), teacher.detach().float()
    g_s = F.normalize(s @ s.T, p=2, dim=1)
    g_t = F.normalize(t @ t.T, p=2, dim=1)
    return (g_t - g_s).pow(2).sum() / student.shape[0] ** 2


# `DistillationConfig.relation_loss` -> function.
RELATION_LOSSES = {
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
    "rkd": rkd_loss,
    "sp": similarity_preserving_loss,
}
