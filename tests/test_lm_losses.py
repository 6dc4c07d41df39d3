"""Tests for hf_distill.losses.lm, the causal-LM divergences (bounded-memory versions: test_lm_losses_chunked.py).

Each divergence is checked against a slow reference written with Python loops and the `math` module, including
-inf teacher entries and masked positions, against the existing KL / JSD losses at its end points, and with
`torch.autograd.gradcheck` in float64.
"""

import itertools
import math

import pytest
import torch

from hf_distill.losses.lm import (
    LM_LOGIT_LOSSES,
    generalized_jsd_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    total_variation_loss,
)
from hf_distill.losses.logits import jsd_loss, kl_div_loss, reverse_kl_div_loss

# --------------------------------------------------------------------------------------------------------------------
# Slow references: one position at a time, plain floats
# --------------------------------------------------------------------------------------------------------------------


def ref_softmax(xs):
    top = max(x for x in xs if x != -math.inf)
    exps = [math.exp(x - top) for x in xs]  # exp(-inf) == 0.0
    return [e / sum(exps) for e in exps]


def ref_kl(p, q):
    """KL(p || q) with 0 * log 0 = 0 and p > 0 = q giving inf."""
    return sum(pi * (math.log(pi / qi) if qi > 0 else math.inf) for pi, qi in zip(p, q) if pi > 0)


def ref_mix(w, p, q):
    return [w * a + (1 - w) * b for a, b in zip(p, q)]


def ref_gjsd(p_s, p_t, beta):
    if beta == 0:
        return ref_kl(p_t, p_s)
    if beta == 1:
        return ref_kl(p_s, p_t)
    m = ref_mix(beta, p_t, p_s)
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


def ref_tv(p_s, p_t):
    return 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s))


def ref_skew_kl(p_s, p_t, alpha):
    return ref_kl(p_t, ref_mix(alpha, p_t, p_s))


def ref_skew_reverse_kl(p_s, p_t, alpha):
    return ref_kl(p_s, ref_mix(alpha, p_s, p_t))


def ref_loss(position_fn, student, teacher, mask=None, num_items=None, temperature=1.0, **kw):
    """Loops over the (B, L) positions of (B, L, V) tensors; sum over counted positions / count (or num_items)."""
    total, count = 0.0, 0
    for b, i in itertools.product(range(student.shape[0]), range(student.shape[1])):
        if mask is not None and not mask[b, i]:
            continue
        p_s = ref_softmax([x / temperature for x in student[b, i].double().tolist()])
        p_t = ref_softmax([x / temperature for x in teacher[b, i].double().tolist()])
        total += temperature**2 * position_fn(p_s, p_t, **kw)
        count += 1
    denominator = num_items if num_items is not None else count
    return total / denominator if denominator else 0.0


# (id, function, its keywords, reference per position, finite when the teacher alone has -inf entries)
CASES = [
    ("gjsd_0.5", generalized_jsd_loss, {"beta": 0.5}, ref_gjsd, True),
    ("gjsd_0.1", generalized_jsd_loss, {"beta": 0.1}, ref_gjsd, True),
    ("gjsd_0.9", generalized_jsd_loss, {"beta": 0.9}, ref_gjsd, True),
    ("gjsd_0", generalized_jsd_loss, {"beta": 0.0}, ref_gjsd, True),
    ("gjsd_1", generalized_jsd_loss, {"beta": 1.0}, ref_gjsd, False),
    ("total_variation", total_variation_loss, {}, ref_tv, True),
    ("skew_kl_0.1", skew_kl_loss, {"alpha": 0.1}, ref_skew_kl, True),
    ("skew_kl_0.5", skew_kl_loss, {"alpha": 0.5}, ref_skew_kl, True),
    ("skew_kl_0", skew_kl_loss, {"alpha": 0.0}, ref_skew_kl, True),
    ("skew_reverse_kl_0.1", skew_reverse_kl_loss, {"alpha": 0.1}, ref_skew_reverse_kl, True),
    ("skew_reverse_kl_0.7", skew_reverse_kl_loss, {"alpha": 0.7}, ref_skew_reverse_kl, True),
    ("skew_reverse_kl_0", skew_reverse_kl_loss, {"alpha": 0.0}, ref_skew_reverse_kl, False),
]
IDS = [c[0] for c in CASES]
FINITE_CASES = [c for c in CASES if c[4]]


def make_logits(shape=(3, 6, 7), seed=0, teacher_neg_inf="none", dtype=torch.float32):
    """Random logits and a labels-style mask (first row fully masked, last row with a counted position).

    teacher_neg_inf: "none"; "teacher" (two teacher vocabulary entries at -inf, the student's finite); "both" (the
    same entries at -inf in both models), each at every other position.
    """
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=g) * 2).to(dtype)
    teacher = (torch.randn(shape, generator=g) * 2).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.4
    mask[0] = False
    mask[-1, 0] = True
    if teacher_neg_inf != "none":
        teacher[:, ::2, :2] = -math.inf
        if teacher_neg_inf == "both":
            student[:, ::2, :2] = -math.inf
    return student, teacher, mask


def rel_diff(actual, expected):
    """max |actual - expected| / max |expected| over the tensor (element-wise ratios blow up near 0)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------------------------
# lm.py: the table, the references, the end points
# --------------------------------------------------------------------------------------------------------------------


def test_lm_logit_losses_table():
    assert LM_LOGIT_LOSSES == {
        "forward_kl": kl_div_loss,
        "reverse_kl": reverse_kl_div_loss,
        "generalized_jsd": generalized_jsd_loss,
        "total_variation": total_variation_loss,
        "skew_kl": skew_kl_loss,
        "skew_reverse_kl": skew_reverse_kl_loss,
    }


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("neg_inf", ["none", "teacher", "both"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_slow_reference(case, masked, neg_inf, temperature):
    _, fn, kw, position_fn, finite_with_teacher_inf = case
    student, teacher, mask = make_logits(teacher_neg_inf=neg_inf)
    mask = mask if masked else None
    expected = ref_loss(position_fn, student, teacher, mask, temperature=temperature, **kw)
    loss = fn(student, teacher, mask, temperature=temperature, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    if neg_inf == "teacher" and not finite_with_teacher_inf:
        assert expected == math.inf and loss.item() == math.inf  # reverse KL: the student puts mass where p_T = 0
        return
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    student.requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(student, teacher, mask, temperature=temperature, **kw), student)
    assert torch.isfinite(grad[torch.isfinite(student)]).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_num_items_in_batch_replaces_the_count(case):
    _, fn, kw, position_fn, _ = case
    student, teacher, mask = make_logits(seed=1)
    expected = ref_loss(position_fn, student, teacher, mask, num_items=40, **kw)
    for num_items in (40, torch.tensor(40)):
        loss = fn(student, teacher, mask, num_items_in_batch=num_items, **kw)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_end_points_equal_the_existing_losses(temperature):
    student, teacher, mask = make_logits(seed=2, teacher_neg_inf="both")
    pairs = [
        (generalized_jsd_loss, {"beta": 0.5}, jsd_loss),
        (generalized_jsd_loss, {"beta": 0.0}, kl_div_loss),
        (generalized_jsd_loss, {"beta": 1.0}, reverse_kl_div_loss),
        (skew_kl_loss, {"alpha": 0.0}, kl_div_loss),
        (skew_reverse_kl_loss, {"alpha": 0.0}, reverse_kl_div_loss),
    ]
    for fn, kw, existing in pairs:
        expected = existing(student, teacher, mask, temperature=temperature)
        torch.testing.assert_close(fn(student, teacher, mask, temperature=temperature, **kw), expected)


def test_generalized_jsd_follows_trl_beta_convention():
    """beta weighs the teacher: m = beta p_T + (1 - beta) p_S, loss = beta KL(p_T||m) + (1 - beta) KL(p_S||m)."""
    student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    m = 0.2 * p_t + 0.8 * p_s
    expected = 0.2 * (p_t * (p_t / m).log()).sum() + 0.8 * (p_s * (p_s / m).log()).sum()
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=0.2), expected)
    # Swapping the models mirrors beta.
    torch.testing.assert_close(generalized_jsd_loss(teacher, student, beta=0.8), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identical_inputs_give_zero(case):
    _, fn, kw, _, _ = case
    logits = torch.randn(2, 3, 5)
    torch.testing.assert_close(fn(logits, logits.clone(), **kw), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_total_variation_is_symmetric_and_bounded_by_t_squared():
    student, teacher, mask = make_logits(seed=3)
    for temperature in (1.0, 2.0):
        a = total_variation_loss(student * 10, teacher * 10, mask, temperature=temperature)
        b = total_variation_loss(teacher * 10, student * 10, mask, temperature=temperature)
        torch.testing.assert_close(a, b)
        assert 0 < a.item() <= temperature**2


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_float64(case):
    _, fn, kw, _, _ = case
    student, teacher, mask = make_logits(shape=(2, 3, 5), seed=4, teacher_neg_inf="both", dtype=torch.float64)
    student = student.masked_fill(torch.isinf(student), -30.0).requires_grad_(True)  # gradcheck perturbs every entry
    teacher[0, 1, 2] = -math.inf  # an entry only the teacher masks (finite cases only)
    if not case[4]:
        teacher = teacher.masked_fill(torch.isinf(teacher), -30.0)
    mask[0] = True
    assert fn(student, teacher, mask, **kw).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, mask, temperature=1.7, **kw), (student,))


@pytest.mark.parametrize("case", FINITE_CASES, ids=[c[0] for c in FINITE_CASES])
def test_masked_positions_change_neither_loss_nor_counted_grads(case):
    _, fn, kw, _, _ = case
    student, teacher, mask = make_logits(seed=5, teacher_neg_inf="teacher")
    student.requires_grad_(True)
    loss = fn(student, teacher, mask, **kw)
    (grad,) = torch.autograd.grad(loss, student)
    noisy_student = torch.where(mask[..., None], student.detach(), torch.randn_like(student) * 50).requires_grad_(True)
    noisy_teacher = torch.where(mask[..., None], teacher, torch.randn_like(teacher) * 50)
    noisy_loss = fn(noisy_student, noisy_teacher, mask, **kw)
    (noisy_grad,) = torch.autograd.grad(noisy_loss, noisy_student)
    torch.testing.assert_close(noisy_loss, loss)
    torch.testing.assert_close(noisy_grad, grad)
    # NaN teacher values at masked positions stay out of the value (like the other logit losses, not out of the
    # gradient there: 0 * NaN is NaN in backward).
    torch.testing.assert_close(fn(student, torch.where(mask[..., None], teacher, math.nan), mask, **kw), loss)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_masked_gives_connected_zero(case):
    _, fn, kw, _, _ = case
    student, teacher, _ = make_logits(seed=6)
    student.requires_grad_(True)
    loss = fn(student, teacher, torch.zeros(student.shape[:-1], dtype=torch.bool), **kw)
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_micro_batches_with_num_items_sum_to_full_batch_loss(case):
    _, fn, kw, _, _ = case
    student, teacher, mask = make_logits(shape=(4, 5, 6), seed=7)
    full = fn(student, teacher, mask, **kw)
    n = mask.sum()
    parts = [fn(student[i : i + 2], teacher[i : i + 2], mask[i : i + 2], num_items_in_batch=n, **kw) for i in (0, 2)]
    parts = sum(parts)
    torch.testing.assert_close(parts, full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_half_precision_inputs_are_upcast(case, dtype):
    _, fn, kw, _, _ = case
    student, teacher, mask = make_logits(seed=8, dtype=dtype)
    loss = fn(student, teacher, mask, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fn(student.float(), teacher.float(), mask, **kw))


@pytest.mark.parametrize(
    "fn, kw, pattern",
    [
        (generalized_jsd_loss, {"beta": 1.5}, r"beta must be in \[0, 1\], got 1.5"),
        (generalized_jsd_loss, {"beta": -0.1}, r"beta must be in \[0, 1\], got -0.1"),
        (skew_kl_loss, {"alpha": 1.0}, r"alpha must be in \[0, 1\), got 1.0. .*DistiLLM uses 0.1"),
        (skew_reverse_kl_loss, {"alpha": -1.0}, r"alpha must be in \[0, 1\), got -1.0"),
        (total_variation_loss, {"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
    ],
)
def test_bad_keywords_are_rejected(fn, kw, pattern):
    student, teacher, _ = make_logits()
    with pytest.raises(ValueError, match=pattern):
        fn(student, teacher, **kw)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vocabulary_mismatch_is_rejected(case):
    _, fn, kw, _, _ = case
    with pytest.raises(ValueError, match=r"shape \(2, 3, 5\).*\(2, 3, 6\).*logits\[\.\.\., :vocab_size\]"):
        fn(torch.randn(2, 3, 5), torch.randn(2, 3, 6), **kw)
