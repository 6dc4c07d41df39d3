"""Tests for hf_distill.losses.lm (causal-LM divergences) and hf_distill.losses.chunked (bounded-memory versions).

Each divergence is checked against a slow reference written with Python loops and the `math` module, including
-inf teacher entries and masked positions, against the existing KL / JSD losses at its end points, and with
`torch.autograd.gradcheck` in float64. The chunked and fused versions are checked against the plain computation
(materialised logits, then the lm.py loss) for loss and gradients, within 1e-5 relative.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses import chunked
from hf_distill.losses.chunked import chunked_logit_loss, fused_linear_distill_loss
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


# --------------------------------------------------------------------------------------------------------------------
# chunked_logit_loss
# --------------------------------------------------------------------------------------------------------------------

LM_NAMES = list(LM_LOGIT_LOSSES)
KEYWORDS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("setting", ["all", "mask", "mask_num_items"])
@pytest.mark.parametrize("name", LM_NAMES)
def test_chunked_equals_unchunked_loss_and_grads(name, setting, chunk_size):
    fn, kw = LM_LOGIT_LOSSES[name], KEYWORDS.get(name, {})
    student, teacher, mask = make_logits(shape=(3, 7, 11), seed=9, teacher_neg_inf="both")
    mask = None if setting == "all" else mask
    num_items = torch.tensor(30) if setting == "mask_num_items" else None
    student.requires_grad_(True)
    options = {"temperature": 2.0, "num_items_in_batch": num_items, **kw}
    expected = fn(student, teacher, mask, **options)
    (expected_grad,) = torch.autograd.grad(expected, student)
    loss = chunked_logit_loss(fn, student, teacher, mask, chunk_size=chunk_size, **options)
    (grad,) = torch.autograd.grad(loss * 0.5, student)  # a grad_output != 1 is applied
    assert rel_diff(loss, expected) <= 1e-5
    assert rel_diff(grad, expected_grad * 0.5) <= 1e-5


def test_chunked_sees_only_counted_positions_one_chunk_at_a_time():
    student, teacher, mask = make_logits(shape=(4, 9, 5), seed=10)
    seen = []

    def recording_loss(s, t, m=None, **kw):
        seen.append(s.shape[0])
        return kl_div_loss(s, t, m, **kw)

    chunked_logit_loss(recording_loss, student.requires_grad_(True), teacher, mask, chunk_size=4)
    assert sum(seen) == mask.sum().item() and max(seen) <= 4


def test_chunked_without_grad_and_all_masked():
    student, teacher, mask = make_logits(seed=11)
    with torch.no_grad():
        loss = chunked_logit_loss(jsd_loss, student.requires_grad_(True), teacher, mask, chunk_size=2)
    torch.testing.assert_close(loss, jsd_loss(student, teacher, mask))
    none = chunked_logit_loss(kl_div_loss, student, teacher, torch.zeros_like(mask), chunk_size=2)
    none.backward()
    assert none.item() == 0.0 and (student.grad == 0).all()


def test_chunked_rejects_different_vocabularies():
    with pytest.raises(ValueError, match=r"vocabulary has 5 entries but the teacher's has 6.*same tokenizer"):
        chunked_logit_loss(kl_div_loss, torch.randn(2, 3, 5), torch.randn(2, 3, 6))


# --------------------------------------------------------------------------------------------------------------------
# fused_linear_distill_loss
# --------------------------------------------------------------------------------------------------------------------

VOCAB = 13
SETTINGS = ["plain", "mask", "num_items", "bias", "different_hidden", "everything"]


def make_heads(setting, seed=12, dtype=torch.float32):
    """Hidden states (2, 9, H) and LM heads for both models; the student's require grad."""
    g = torch.Generator().manual_seed(seed)
    different = setting in ("different_hidden", "everything")
    h_s, h_t = 6, (10 if different else 6)
    student_hidden = torch.randn(2, 9, h_s, generator=g).to(dtype).requires_grad_(True)
    student_weight = torch.randn(VOCAB, h_s, generator=g).to(dtype).requires_grad_(True)
    teacher_hidden = torch.randn(2, 9, h_t, generator=g).to(dtype)
    teacher_weight = torch.randn(VOCAB, h_t, generator=g).to(dtype)
    bias = setting in ("bias", "everything")
    student_bias = torch.randn(VOCAB, generator=g).to(dtype).requires_grad_(True) if bias else None
    teacher_bias = torch.randn(VOCAB, generator=g).to(dtype) if bias else None
    mask = None
    if setting in ("mask", "num_items", "everything"):
        mask = torch.rand(2, 9, generator=g) > 0.3
        mask[0, :3] = False
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", LM_NAMES)
def test_fused_equals_plain_loss_and_grads(name, setting):
    s_h, s_w, s_b, t_h, t_w, t_b, mask = make_heads(setting)
    num_items = {"num_items": 20, "everything": torch.tensor(25)}.get(setting)
    temperature = 2.0 if setting == "everything" else 1.0
    kw = KEYWORDS.get(name, {})
    params = [p for p in (s_h, s_w, s_b) if p is not None]

    with torch.no_grad():
        teacher_logits = F.linear(t_h, t_w, t_b)
    expected = LM_LOGIT_LOSSES[name](
        F.linear(s_h, s_w, s_b), teacher_logits, mask, temperature=temperature, num_items_in_batch=num_items, **kw
    )
    expected_grads = torch.autograd.grad(expected, params)
    loss = fused_linear_distill_loss(
        s_h, s_w, t_h, t_w, mask, divergence=name, temperature=temperature, chunk_size=4,
        num_items_in_batch=num_items, student_bias=s_b, teacher_bias=t_b, **kw,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, params)
    assert rel_diff(loss, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.shape == expected_grad.shape and rel_diff(grad, expected_grad) <= 1e-5


def test_fused_computes_logits_one_chunk_of_counted_positions_at_a_time(monkeypatch):
    s_h, s_w, _, t_h, t_w, _, mask = make_heads("mask")
    rows = []
    linear = F.linear

    def recording_linear(x, w, b=None):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(chunked.F, "linear", recording_linear)
    fused_linear_distill_loss(s_h, s_w, t_h, t_w, mask, chunk_size=3).backward()
    assert max(rows) <= 3 and sum(rows) == 2 * mask.sum().item()  # student and teacher chunks


def test_fused_teacher_gets_no_gradient_and_grad_output_is_applied():
    s_h, s_w, s_b, t_h, t_w, t_b, mask = make_heads("everything")
    t_h.requires_grad_(True), t_w.requires_grad_(True), t_b.requires_grad_(True)
    (3.0 * fused_linear_distill_loss(s_h, s_w, t_h, t_w, mask, student_bias=s_b, teacher_bias=t_b)).backward()
    assert t_h.grad is None and t_w.grad is None and t_b.grad is None
    expected = kl_div_loss(F.linear(s_h, s_w, s_b), F.linear(t_h, t_w, t_b).detach(), mask)
    grads = torch.autograd.grad(3.0 * expected, (s_h, s_w, s_b))
    for param, grad in zip((s_h, s_w, s_b), grads):
        assert rel_diff(param.grad, grad) <= 1e-5


def test_fused_without_grad_all_masked_and_frozen_weight():
    s_h, s_w, _, t_h, t_w, _, mask = make_heads("mask")
    with torch.no_grad():
        loss = fused_linear_distill_loss(s_h, s_w, t_h, t_w, mask, divergence="total_variation")
    torch.testing.assert_close(loss, total_variation_loss(F.linear(s_h, s_w), F.linear(t_h, t_w), mask))
    none = fused_linear_distill_loss(s_h, s_w, t_h, t_w, torch.zeros_like(mask))
    none.backward()
    assert none.item() == 0.0 and (s_h.grad == 0).all() and (s_w.grad == 0).all()
    frozen = s_w.detach()  # an LM head that is not trained: only the hidden states get a gradient
    (grad,) = torch.autograd.grad(fused_linear_distill_loss(s_h, frozen, t_h, t_w, mask), s_h)
    (expected,) = torch.autograd.grad(kl_div_loss(F.linear(s_h, frozen), F.linear(t_h, t_w), mask), s_h)
    assert rel_diff(grad, expected) <= 1e-5


@pytest.mark.parametrize("name", ["generalized_jsd", "total_variation", "skew_kl", "skew_reverse_kl"])
def test_fused_gradcheck_float64(name):
    s_h, s_w, s_b, t_h, t_w, t_b, mask = make_heads("everything", dtype=torch.float64)

    def fn(hidden, weight, bias):
        return fused_linear_distill_loss(
            hidden, weight, t_h, t_w, mask, divergence=name, temperature=1.5, chunk_size=5, student_bias=bias,
            teacher_bias=t_b, **KEYWORDS.get(name, {}),
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (s_h, s_w, s_b))


def test_fused_half_precision_keeps_dtypes_and_stays_close():
    s_h, s_w, _, t_h, t_w, _, mask = make_heads("mask", dtype=torch.bfloat16)
    loss = fused_linear_distill_loss(s_h, s_w, t_h, t_w, mask, divergence="skew_kl")
    loss.backward()
    assert loss.dtype == torch.float32 and s_h.grad.dtype == s_w.grad.dtype == torch.bfloat16
    expected = skew_kl_loss(F.linear(s_h.float(), s_w.float()), F.linear(t_h.float(), t_w.float()), mask)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            {"teacher_weight": torch.randn(VOCAB + 3, 6)},
            r"has 13 entries but the teacher's has 16.*tokenizer.*slice both",
        ),
        ({"divergence": "kl"}, r"divergence must be one of \['forward_kl', .*got 'kl'"),
        ({"divergence": "forward_kl", "beta": 0.3}, r"beta=0.3 was given but divergence='forward_kl' takes no beta"),
        ({"divergence": "generalized_jsd", "alpha": 0.3}, r"alpha=0.3 .* takes no alpha.*'skew_kl'"),
        (
            {"student_weight": torch.randn(VOCAB, 7)},
            r"student_hidden has hidden size 6 but student_weight .*\(13, 7\)",
        ),
        ({"student_bias": torch.randn(VOCAB + 1)}, r"student_bias has shape \(14,\) but the vocabulary has 13"),
        ({"teacher_hidden": torch.randn(2, 8, 6)}, r"leading shape \(2, 9\) but teacher_hidden has \(2, 8\)"),
        ({"mask": torch.ones(2, 8, dtype=torch.bool)}, r"mask has shape \(2, 8\) but hidden states needs .*\(2, 9\)"),
        ({"chunk_size": 0}, r"chunk_size must be a positive int, got 0"),
        ({"temperature": -1.0}, r"temperature must be > 0, got -1.0"),
    ],
)
def test_fused_rejects_bad_inputs_with_the_fix(change, pattern):
    s_h, s_w, _, t_h, t_w, _, _ = make_heads("plain")
    args = {"student_hidden": s_h, "student_weight": s_w, "teacher_hidden": t_h, "teacher_weight": t_w, **change}
    with pytest.raises(ValueError, match=pattern):
        fused_linear_distill_loss(**args)
