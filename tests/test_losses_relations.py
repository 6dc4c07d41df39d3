"""Tests for hf_distill.losses.relations (RKD distance / angle, similarity-preserving KD).

Each loss is checked against a slow reference written from the papers' formulas with Python loops and `math`
(Park et al. 2019, https://arxiv.org/abs/1904.05068; Tung & Mori 2019, https://arxiv.org/abs/1907.09682), against
analytic cases (invariances under which the relations do not change), and for finite gradients on duplicate rows.
"""

import itertools
import math

import pytest
import torch

from hf_distill.losses.relations import (
    RELATION_LOSSES,
    RKD_ANGLE_WEIGHT,
    pairwise_distances,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    similarity_preserving_loss,
)

# --------------------------------------------------------------------------------------------------------------------
# Slow references: plain floats, one pair / triplet at a time
# --------------------------------------------------------------------------------------------------------------------


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def huber(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = rows(s), rows(t)
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
    mu_s = sum(dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(huber(dist(s[i], s[j]) / mu_s, dist(t[i], t[j]) / mu_t) for i, j in pairs) / len(pairs)


def cos_at(x: list[list[float]], i: int, j: int, k: int) -> float:
    """cos of the angle x_i x_j x_k, at vertex x_j."""
    a = [p - q for p, q in zip(x[i], x[j])]
    b = [p - q for p, q in zip(x[k], x[j])]
    return sum(p * q for p, q in zip(a, b)) / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))


def ref_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = rows(s), rows(t)
    triplets = list(itertools.permutations(range(len(s)), 3))
    return sum(huber(cos_at(s, i, j, k), cos_at(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def ref_sp(s: torch.Tensor, t: torch.Tensor) -> float:
    def normalised_gram(a):
        gram = [[sum(p * q for p, q in zip(a[i], a[j])) for j in range(len(a))] for i in range(len(a))]
        return [[g / math.sqrt(sum(h * h for h in row)) for g in row] for row in gram]

    gs, gt = normalised_gram(rows(s)), normalised_gram(rows(t))
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


REFERENCES = {
    "rkd_distance": ref_rkd_distance,
    "rkd_angle": ref_rkd_angle,
    "rkd": lambda s, t: ref_rkd_distance(s, t) + RKD_ANGLE_WEIGHT * ref_rkd_angle(s, t),
    "sp": ref_sp,
}


def pooled(batch: int, width: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------------------------------

# (batch, student width, teacher width, student scale): widths differ, scales put Huber on both of its branches.
CASES = [(2, 3, 3, 1.0), (3, 4, 6, 1.0), (5, 3, 8, 1.0), (7, 16, 4, 0.1), (6, 5, 5, 30.0)]


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
@pytest.mark.parametrize("batch,ds,dt,scale", CASES)
def test_matches_reference(name, batch, ds, dt, scale):
    if name in ("rkd_angle", "rkd") and batch < 3:
        pytest.skip("no triplet in a batch of 2 (tested below)")
    s, t = pooled(batch, ds, 1, scale), pooled(batch, dt, 2)
    # Skew the student so its normalised distances differ from the teacher's by more than Huber's delta somewhere.
    s[0] *= 4
    value = RELATION_LOSSES[name](s, t)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(REFERENCES[name](s, t), rel=1e-5, abs=1e-7)


def test_huber_is_exercised_on_both_branches():
    # The cases above must cover |difference| >= 1 too, else a squared loss would pass them.
    s, t = pooled(5, 3, 1), pooled(5, 8, 2)
    s[0] *= 4
    ds = pairwise_distances(s) / (pairwise_distances(s).sum() / 20)
    dt = pairwise_distances(t) / (pairwise_distances(t).sum() / 20)
    assert (ds - dt).abs().max() > 1


def test_rkd_is_distance_plus_twice_angle():
    s, t = pooled(5, 4, 3), pooled(5, 6, 4)
    assert torch.allclose(rkd_loss(s, t), rkd_distance_loss(s, t) + 2 * rkd_angle_loss(s, t))


# --------------------------------------------------------------------------------------------------------------------
# Analytic cases: invariances
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
def test_zero_when_the_student_is_the_teacher_rotated_scaled_and_embedded_in_a_wider_space(name):
    # Distances up to scale, angles and normalised dot products are preserved by rotation and global scaling, and by
    # embedding into more dimensions (zero-padding): the teacher may be wider than the student.
    s = pooled(6, 4, 5)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(6)))
    t = torch.cat([3.0 * s @ rotation, torch.zeros(6, 5)], dim=1)  # (6, 9)
    assert RELATION_LOSSES[name](s, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e3])
def test_invariant_to_the_scale_of_either_model(name, factor):
    s, t = pooled(5, 4, 7), pooled(5, 6, 8)
    base = RELATION_LOSSES[name](s, t)
    assert torch.allclose(RELATION_LOSSES[name](factor * s, t), base, rtol=1e-4, atol=1e-7)
    assert torch.allclose(RELATION_LOSSES[name](s, factor * t), base, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "rkd"])
def test_rkd_is_invariant_to_translation(name):
    s, t = pooled(5, 4, 9), pooled(5, 6, 10)
    shifted = s + torch.tensor([5.0, -3.0, 1.0, 2.0])
    assert torch.allclose(RELATION_LOSSES[name](shifted, t), RELATION_LOSSES[name](s, t), rtol=1e-4, atol=1e-6)


def test_relations_do_not_depend_on_row_order():
    s, t = pooled(6, 4, 11), pooled(6, 5, 12)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    for fn in RELATION_LOSSES.values():
        assert torch.allclose(fn(s[perm], t[perm]), fn(s, t), rtol=1e-5, atol=1e-7)


def test_small_batches_give_zero_connected_to_the_graph():
    for batch, names in ((1, ["rkd_distance", "rkd_angle", "rkd", "sp"]), (2, ["rkd_angle"])):
        for name in names:
            s = pooled(batch, 4, 0).requires_grad_()
            value = RELATION_LOSSES[name](s, pooled(batch, 6, 1))
            assert value.item() == 0.0, (name, batch)
            value.backward()
            assert s.grad is not None and torch.all(s.grad == 0)


def test_mismatched_rows_or_unpooled_inputs_are_refused():
    with pytest.raises(ValueError, match=r"student has 3 rows but teacher has 4"):
        rkd_distance_loss(pooled(3, 4, 0), pooled(4, 4, 1))
    with pytest.raises(ValueError, match=r"pooled \(batch, width\).*relation_pooling"):
        similarity_preserving_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
def test_gradients_are_finite_with_duplicate_rows_and_the_teacher_gets_none(name):
    s = pooled(5, 4, 13)
    s[3] = s[1]  # two identical sentences in the batch
    s = s.requires_grad_()
    t = pooled(5, 6, 14)
    t[4] = t[0]
    t.requires_grad_()
    value = RELATION_LOSSES[name](s, t)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None  # detached inside


def test_duplicate_rows_have_distance_exactly_zero():
    x = pooled(4, 3, 15)
    x[2] = x[0]
    d = pairwise_distances(x)
    assert d[0, 2] == 0 and d[2, 0] == 0 and torch.all(d.diagonal() == 0)
    assert torch.allclose(d, torch.cdist(x.double(), x.double()).float(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
def test_gradient_matches_finite_differences(name):
    s = pooled(4, 3, 16).double().requires_grad_()
    t = pooled(4, 5, 17).double()

    def f(x):
        return RELATION_LOSSES[name](x, t).double()

    # The losses compute in fp32, so compare autograd with central differences at a tolerance fp32 allows.
    f(s).backward()
    eps = 1e-3
    numeric = torch.zeros_like(s)
    for idx in itertools.product(range(4), range(3)):
        plus, minus = s.detach().clone(), s.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (f(plus) - f(minus)) / (2 * eps)
    assert torch.allclose(s.grad, numeric, rtol=2e-2, atol=2e-4)
