"""Tests for hf_distill.losses.

Each loss is checked against a slow reference written with Python loops and the `math` module (not the vectorised
formula), against analytic cases, and for its masking, reduction, gradient-accumulation and gradient behaviour.
"""

import functools
import itertools
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses import (
    ATTENTION_LOSSES,
    HIDDEN_LOSSES,
    LOGIT_LOSSES,
    attention_kl_loss,
    attention_mse_loss,
    binary_kl_div_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    jsd_loss,
    kl_div_loss,
    logits_mse_loss,
    reverse_kl_div_loss,
)
from hf_distill.losses.squared import weighted_squared_error

TINY = torch.finfo(torch.float32).tiny
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------------------------
# Slow references: one position / row at a time, plain floats
# --------------------------------------------------------------------------------------------------------------------


def ref_softmax(xs: list[float]) -> list[float]:
    top = max(x for x in xs if x != -math.inf)
    exps = [math.exp(x - top) for x in xs]  # exp(-inf) == 0.0
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) with 0 * log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_position_kl(s: list[float], t: list[float], temperature: float) -> float:
    p_s, p_t = ref_softmax([x / temperature for x in s]), ref_softmax([x / temperature for x in t])
    return temperature**2 * ref_kl(p_t, p_s)


def ref_position_reverse_kl(s: list[float], t: list[float], temperature: float) -> float:
    p_s, p_t = ref_softmax([x / temperature for x in s]), ref_softmax([x / temperature for x in t])
    return temperature**2 * ref_kl(p_s, p_t)


def ref_position_jsd(s: list[float], t: list[float], temperature: float) -> float:
    p_s, p_t = ref_softmax([x / temperature for x in s]), ref_softmax([x / temperature for x in t])
    m = [0.5 * (a + b) for a, b in zip(p_s, p_t)]
    return temperature**2 * (0.5 * ref_kl(p_t, m) + 0.5 * ref_kl(p_s, m))


def ref_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ref_position_binary_kl(s: list[float], t: list[float], temperature: float) -> float:
    """Mean over classes of KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T))), times T², one class at a time."""
    total = 0.0
    for s_c, t_c in zip(s, t):
        q, p = ref_sigmoid(s_c / temperature), ref_sigmoid(t_c / temperature)
        total += ref_kl([p, 1.0 - p], [q, 1.0 - q])
    return temperature**2 * total / len(s)


def ref_position_mse(s: list[float], t: list[float], temperature: float = 1.0) -> float:
    return sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)


def ref_position_cosine(s: list[float], t: list[float], temperature: float = 1.0) -> float:
    dot = sum(a * b for a, b in zip(s, t))
    return 1.0 - dot / (math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in t)))


def ref_row_attention_mse(s: list[float], t: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)


def ref_row_attention_kl(s: list[float], t: list[float]) -> float:
    return sum(b * (math.log(b) - math.log(max(a, TINY))) for a, b in zip(s, t) if b > 0)


def ref_per_position_loss(position_fn, student, teacher, mask=None, num_items=None, temperature=1.0) -> torch.Tensor:
    """Loops over every leading index of ``(..., C)`` tensors; sum over counted positions / count (or num_items)."""
    s, t = student.double().tolist(), teacher.double().tolist()
    m = mask.tolist() if mask is not None else None
    total, count = 0.0, 0
    for index in itertools.product(*(range(n) for n in student.shape[:-1])):
        if m is not None and not functools.reduce(operator.getitem, index, m):
            continue
        row_s = functools.reduce(operator.getitem, index, s)
        row_t = functools.reduce(operator.getitem, index, t)
        total += position_fn(row_s, row_t, temperature)
        count += 1
    denominator = num_items if num_items is not None else count
    return torch.tensor(total / denominator if denominator else 0.0, dtype=torch.float32)


def ref_attention_loss(row_fn, student, teacher, mask=None, num_items=None) -> torch.Tensor:
    """Loops over (b, query i, head h); keys restricted to the valid ones; mean over heads per query token."""
    batch, heads, seq_len, _ = student.shape
    s, t = student.double().tolist(), teacher.double().tolist()
    m = mask.bool().tolist() if mask is not None else [[True] * seq_len for _ in range(batch)]
    total, count = 0.0, 0
    for b in range(batch):
        keys = [j for j in range(seq_len) if m[b][j]]
        for i in range(seq_len):
            if not m[b][i]:
                continue
            rows = [row_fn([s[b][h][i][j] for j in keys], [t[b][h][i][j] for j in keys]) for h in range(heads)]
            total += sum(rows) / heads
            count += 1
    denominator = num_items if num_items is not None else count
    return torch.tensor(total / denominator if denominator else 0.0, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Inputs and the table of cases every generic test runs over
# --------------------------------------------------------------------------------------------------------------------


def make_logits(shape, masked: bool, seed: int = 0):
    """Random logits; for ``(B, L, V)`` a mask built like a caller would, from labels with -100 entries."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g) * 2
    teacher = torch.randn(shape, generator=g) * 2
    if not masked:
        return student, teacher, None
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < 0.4] = -100
    labels[0, ...] = -100  # a fully masked first row ...
    labels[-1].view(-1)[0] = 1  # ... and at least one counted position in the last
    return student, teacher, labels != -100


def make_hidden(seed: int = 0, width: int = 8):
    """(B=3, L=5, H) hidden states with a right-padded 0/1 integer attention mask (lengths 5, 3, 1)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, width, generator=g)
    teacher = torch.randn(3, 5, width, generator=g)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 3, 1])[:, None]).long()
    return student, teacher, mask


def make_attention(seed: int = 0, heads: int = 2):
    """(B=3, heads, L=5, L) attention probabilities over the valid keys, with a (B, L) bool mask (lengths 5, 3, 1)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1])[:, None]

    def probs():
        scores = torch.randn(3, heads, 5, 5, generator=g) * 2
        return scores.masked_fill(~mask[:, None, None, :], -math.inf).softmax(-1)

    return probs(), probs(), mask


@dataclass
class Case:
    name: str
    fn: Callable[..., torch.Tensor]
    family: str  # "logits", "hidden" or "attention"
    ref: Callable[..., torch.Tensor]  # (student, teacher, mask, num_items[, temperature]) -> reference loss


def _per_position_ref(position_fn):
    def ref(student, teacher, mask, num_items=None, temperature=1.0):
        return ref_per_position_loss(position_fn, student, teacher, mask, num_items, temperature)

    return ref


CASES = [
    Case("kl", kl_div_loss, "logits", _per_position_ref(ref_position_kl)),
    Case("reverse_kl", reverse_kl_div_loss, "logits", _per_position_ref(ref_position_reverse_kl)),
    Case("jsd", jsd_loss, "logits", _per_position_ref(ref_position_jsd)),
    Case("logits_mse", logits_mse_loss, "logits", _per_position_ref(ref_position_mse)),
    Case("binary_kl", binary_kl_div_loss, "logits", _per_position_ref(ref_position_binary_kl)),
    Case("hidden_mse", hidden_mse_loss, "hidden", _per_position_ref(ref_position_mse)),
    Case("hidden_cosine", hidden_cosine_loss, "hidden", _per_position_ref(ref_position_cosine)),
    Case(
        "attention_mse", attention_mse_loss, "attention", functools.partial(ref_attention_loss, ref_row_attention_mse)
    ),
    Case("attention_kl", attention_kl_loss, "attention", functools.partial(ref_attention_loss, ref_row_attention_kl)),
]
LOGIT_CASES = [c for c in CASES if c.family == "logits"]
DIVERGENCE_CASES = [c for c in LOGIT_CASES if c.name != "logits_mse"]
HIDDEN_AND_ATTENTION_CASES = [c for c in CASES if c.family != "logits"]


def make_inputs(case: Case, seed: int = 0):
    if case.family == "logits":
        return make_logits((3, 6, 7), masked=True, seed=seed)
    if case.family == "hidden":
        return make_hidden(seed)
    return make_attention(seed)


def ignored_entries(case: Case, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor shaped like ``student``: True for every entry the mask says must not matter."""
    mask = mask.bool()
    if case.family == "attention":  # padding query rows and padding key columns
        return ~(mask[:, None, :, None] & mask[:, None, None, :]).expand_as(student)
    return ~mask[..., None].expand_as(student)


def ids(cases):
    return [c.name for c in cases]


# --------------------------------------------------------------------------------------------------------------------
# The dicts
# --------------------------------------------------------------------------------------------------------------------


def test_loss_dicts_map_names_to_functions():
    assert LOGIT_LOSSES == {
        "kl": kl_div_loss,
        "reverse_kl": reverse_kl_div_loss,
        "jsd": jsd_loss,
        "mse": logits_mse_loss,
    }
    assert HIDDEN_LOSSES == {"mse": hidden_mse_loss, "cosine": hidden_cosine_loss}
    assert ATTENTION_LOSSES == {"mse": attention_mse_loss, "kl": attention_kl_loss}


# --------------------------------------------------------------------------------------------------------------------
# Against the slow references
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(
    "shape, masked", [((4, 5), False), ((4, 5), True), ((3, 6, 7), True), ((3, 6, 7), False)], ids=str
)
@pytest.mark.parametrize("case", LOGIT_CASES, ids=ids(LOGIT_CASES))
def test_logit_loss_matches_reference(case, shape, masked, temperature):
    student, teacher, mask = make_logits(shape, masked)
    expected = case.ref(student, teacher, mask, temperature=temperature)
    actual = case.fn(student, teacher, mask, temperature=temperature)
    assert actual.dtype == torch.float32 and actual.ndim == 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("case", HIDDEN_AND_ATTENTION_CASES, ids=ids(HIDDEN_AND_ATTENTION_CASES))
def test_hidden_and_attention_losses_match_reference(case, with_mask):
    student, teacher, mask = make_inputs(case, seed=1)
    mask = mask if with_mask else None
    torch.testing.assert_close(case.fn(student, teacher, mask), case.ref(student, teacher, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_num_items_in_batch_replaces_the_count(case):
    student, teacher, mask = make_inputs(case, seed=2)
    expected = case.ref(student, teacher, mask, num_items=11)
    torch.testing.assert_close(case.fn(student, teacher, mask, num_items_in_batch=11), expected, rtol=1e-5, atol=1e-6)
    actual = case.fn(student, teacher, mask, num_items_in_batch=torch.tensor(11))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", [c for c in DIVERGENCE_CASES if c.name != "reverse_kl"], ids=["kl", "jsd", "binary_kl"]
)
def test_teacher_minus_inf_logits_give_finite_loss_and_grads(case):
    """Masked vocabulary entries (-inf teacher logits) count as probability 0: 0 * log 0 = 0, no NaN."""
    student, teacher, mask = make_logits((3, 6, 7), masked=True, seed=3)
    teacher[..., :2] = -math.inf
    student.requires_grad_()
    loss = case.fn(student, teacher, mask, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss, case.ref(student.detach(), teacher, mask, temperature=2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=ids(DIVERGENCE_CASES))
def test_entries_masked_in_both_models_give_finite_loss_and_grads(case):
    student, teacher, mask = make_logits((3, 6, 7), masked=True, seed=4)
    student[..., -2:] = -math.inf
    teacher[..., -2:] = -math.inf
    student.requires_grad_()
    loss = case.fn(student, teacher, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss, case.ref(student.detach(), teacher, mask), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_identical_inputs_give_zero(case):
    student, _, mask = make_inputs(case, seed=5)
    loss = case.fn(student, student.clone(), mask)
    torch.testing.assert_close(loss, torch.tensor(0.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=ids(DIVERGENCE_CASES))
def test_temperature_scales_by_t_squared(case):
    """Loss at T equals T² times the same divergence between the softened distributions (logits / T at T=1)."""
    student, teacher, mask = make_logits((3, 6, 7), masked=True, seed=6)
    at_t2 = case.fn(student, teacher, mask, temperature=2.0)
    softened = case.fn(student / 2.0, teacher / 2.0, mask, temperature=1.0)
    torch.testing.assert_close(at_t2, 4.0 * softened, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(at_t2, case.fn(student, teacher, mask, temperature=1.0))


# p_S = softmax([0, 0]) = (1/2, 1/2); p_T = softmax([ln 3, 0]) = (3/4, 1/4); m = (5/8, 3/8).
HAND_STUDENT = torch.tensor([[0.0, 0.0]])
HAND_TEACHER = torch.tensor([[math.log(3.0), 0.0]])
HAND_CASES = [
    (kl_div_loss, 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)),
    (reverse_kl_div_loss, 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)),
    (
        jsd_loss,
        0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))
        + 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)),
    ),
    (logits_mse_loss, math.log(3.0) ** 2 / 2),
]


@pytest.mark.parametrize("fn, expected", HAND_CASES, ids=["kl", "reverse_kl", "jsd", "mse"])
def test_two_class_example_by_hand(fn, expected):
    torch.testing.assert_close(fn(HAND_STUDENT, HAND_TEACHER), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # Two copies of the same row: batchmean gives the same value.
    doubled = fn(HAND_STUDENT.repeat(2, 1), HAND_TEACHER.repeat(2, 1))
    torch.testing.assert_close(doubled, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_mse_ignores_temperature():
    student, teacher, mask = make_logits((3, 6, 7), masked=True)
    assert logits_mse_loss(student, teacher, mask, temperature=4.0) == logits_mse_loss(student, teacher, mask)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_is_symmetric_and_bounded_by_ln2_t_squared(temperature):
    student, teacher, mask = make_logits((3, 6, 7), masked=True, seed=7)
    forward = jsd_loss(student, teacher, mask, temperature=temperature)
    torch.testing.assert_close(forward, jsd_loss(teacher, student, mask, temperature=temperature))
    assert 0 < forward <= LN2 * temperature**2
    # Disjoint distributions reach the bound.
    far = jsd_loss(torch.tensor([[200.0, -200.0]]), torch.tensor([[-200.0, 200.0]]), temperature=temperature)
    torch.testing.assert_close(far, torch.tensor(LN2 * temperature**2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("other, expected", [(2.0, 0.0), (-1.0, 2.0), (-0.5, 2.0)])
def test_cosine_of_scaled_vectors(other, expected):
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(hidden_cosine_loss(x, other * x), torch.tensor(expected), rtol=0, atol=1e-6)


def test_attention_row_example_by_hand():
    """One query row over three keys; the third key has t = s = 0 (must add 0, not NaN)."""
    teacher = torch.tensor([0.5, 0.5, 0.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    student = torch.tensor([0.25, 0.75, 0.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    expected_kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(attention_kl_loss(student, teacher), torch.tensor(expected_kl))
    expected_mse = (0.25**2 + 0.25**2 + 0.0) / 3
    torch.testing.assert_close(attention_mse_loss(student, teacher), torch.tensor(expected_mse))
    # With the third token masked, it leaves the mean over keys (and its query row leaves the token mean).
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(attention_mse_loss(student, teacher, mask), torch.tensor(0.25**2))


def test_attention_kl_is_finite_when_student_puts_zero_where_teacher_does_not():
    teacher = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    student = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2).clone().requires_grad_()
    loss = attention_kl_loss(student, teacher)
    loss.backward()
    expected = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - math.log(TINY))
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# batchmean
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_on_sequence_classification_logits_is_batchmean(temperature):
    student, teacher, _ = make_logits((8, 3), masked=False, seed=9)
    expected = (
        F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.log_softmax(teacher / temperature, -1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    torch.testing.assert_close(kl_div_loss(student, teacher, temperature=temperature), expected)


# --------------------------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_masked_entries_change_neither_loss_nor_counted_grads(case):
    student, teacher, mask = make_inputs(case, seed=10)
    ignored = ignored_entries(case, student, mask)
    g = torch.Generator().manual_seed(11)
    garbage_student = torch.where(ignored, torch.rand(student.shape, generator=g) * 50 + 3, student)
    garbage_teacher = torch.where(ignored, torch.randn(student.shape, generator=g) * 100, teacher)

    clean = student.clone().requires_grad_()
    dirty = garbage_student.clone().requires_grad_()
    clean_loss = case.fn(clean, teacher, mask)
    dirty_loss = case.fn(dirty, garbage_teacher, mask)
    clean_loss.backward()
    dirty_loss.backward()

    torch.testing.assert_close(dirty_loss, clean_loss)
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[ignored] == 0).all()
    torch.testing.assert_close(dirty.grad, clean.grad)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_nan_teacher_values_at_masked_entries_do_not_leak_into_the_loss(case):
    student, teacher, mask = make_inputs(case, seed=12)
    poisoned = teacher.masked_fill(ignored_entries(case, student, mask), math.nan)
    torch.testing.assert_close(case.fn(student, poisoned, mask), case.fn(student, teacher, mask))


@pytest.mark.parametrize("num_items", [None, 0, 7, torch.tensor(7)], ids=["count", "zero", "int", "tensor"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_all_masked_gives_connected_zero(case, num_items):
    student, teacher, mask = make_inputs(case, seed=13)
    student.requires_grad_()
    loss = case.fn(student, teacher, torch.zeros_like(mask), num_items_in_batch=num_items)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and (student.grad == 0).all()


def test_int_and_bool_masks_agree():
    student, teacher, mask = make_hidden(seed=14)
    assert mask.dtype == torch.long
    assert hidden_mse_loss(student, teacher, mask) == hidden_mse_loss(student, teacher, mask.bool())


# --------------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_micro_batches_with_num_items_sum_to_full_batch_loss(case, as_tensor):
    student, teacher, mask = make_inputs(case, seed=15)
    num_items = int(mask.bool().sum())
    assert 0 < num_items < mask.numel()
    if as_tensor:
        num_items = torch.tensor(num_items)
    full = case.fn(student, teacher, mask)
    window = sum(
        case.fn(student[part], teacher[part], mask[part], num_items_in_batch=num_items)
        for part in (slice(0, 1), slice(1, None))
    )
    torch.testing.assert_close(window, full)
    # Averaging the two micro-batch means instead would be wrong: their token counts differ.
    naive = (case.fn(student[:1], teacher[:1], mask[:1]) + case.fn(student[1:], teacher[1:], mask[1:])) / 2
    assert not torch.allclose(naive, full)


# --------------------------------------------------------------------------------------------------------------------
# Gradients and dtypes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_gradients_flow_to_student_only(case):
    student, teacher, mask = make_inputs(case, seed=16)
    student.requires_grad_()
    loss = case.fn(student, teacher, mask)
    loss.backward()
    assert teacher.grad is None and not teacher.requires_grad
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_gradient_matches_finite_differences(case):
    """Directional derivative check in fp32 (gradcheck needs fp64, and the losses compute in fp32 by design)."""
    student, teacher, mask = make_inputs(case, seed=17)
    g = torch.Generator().manual_seed(18)
    direction = torch.randn(student.shape, generator=g) * student.abs()  # relative: attention stays in [0, 1]
    student.requires_grad_()
    case.fn(student, teacher, mask).backward()
    eps = 1e-2
    with torch.no_grad():
        plus = case.fn(student + eps * direction, teacher, mask)
        minus = case.fn(student - eps * direction, teacher, mask)
    numeric = (plus - minus) / (2 * eps)
    torch.testing.assert_close(numeric, (student.grad * direction).sum(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_half_precision_inputs_are_upcast(case, dtype):
    student, teacher, mask = make_inputs(case, seed=19)
    student, teacher = student.to(dtype).requires_grad_(), teacher.to(dtype)
    loss = case.fn(student, teacher, mask)
    assert loss.dtype == torch.float32
    # The fp32 math on the upcast values gives the same number: nothing is computed in half precision.
    torch.testing.assert_close(loss, case.fn(student.detach().float(), teacher.float(), mask))
    loss.backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def _shapes_pattern(student_shape, teacher_shape, hint):
    return re.escape(str(student_shape)) + ".*" + re.escape(str(teacher_shape)) + ".*" + hint


ERROR_CASES = [
    *[(fn, (2, 5), (2, 6), "vocabulary") for fn in LOGIT_LOSSES.values()],
    *[(fn, (2, 3, 7), (2, 3, 9), "vocabulary") for fn in LOGIT_LOSSES.values()],
    *[(fn, (2, 3, 8), (2, 3, 16), "[Pp]rojection") for fn in HIDDEN_LOSSES.values()],
    *[(fn, (2, 3, 8), (2, 4, 8), "input_ids") for fn in HIDDEN_LOSSES.values()],
    *[(fn, (2, 4, 5, 5), (2, 2, 5, 5), "heads") for fn in ATTENTION_LOSSES.values()],
    *[(fn, (2, 4, 5, 5), (2, 4, 6, 6), "input_ids") for fn in ATTENTION_LOSSES.values()],
]


@pytest.mark.parametrize(
    "fn, student_shape, teacher_shape, hint",
    ERROR_CASES,
    ids=[f"{fn.__name__}-{s}-{t}" for fn, s, t, _ in ERROR_CASES],
)
def test_shape_mismatch_names_both_shapes_and_the_fix(fn, student_shape, teacher_shape, hint):
    with pytest.raises(ValueError, match=_shapes_pattern(student_shape, teacher_shape, hint)):
        fn(torch.rand(student_shape), torch.rand(teacher_shape))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_wrong_mask_shape_is_rejected(case):
    student, teacher, mask = make_inputs(case)
    with pytest.raises(ValueError, match=re.escape(f"mask has shape {tuple(mask[:, :-1].shape)}")):
        case.fn(student, teacher, mask[:, :-1])


@pytest.mark.parametrize("fn", [c.fn for c in DIVERGENCE_CASES], ids=ids(DIVERGENCE_CASES))
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_rejected(fn, temperature):
    student, teacher, _ = make_logits((2, 3), masked=False)
    with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
        fn(student, teacher, temperature=temperature)


def test_task_loss_matches_cross_entropy_and_masks_ignored_labels():
    from hf_distill.losses.task import task_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 2, -100, 1, -100, 2])
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    torch.testing.assert_close(task_loss(logits, labels), expected)
    torch.testing.assert_close(task_loss(logits, labels, num_items_in_batch=8), expected * 4 / 8)
    none = task_loss(logits, torch.full((6,), -100))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------------------------------------
# Multi-label (per-class sigmoid) KD and the task losses of regression and multi-label heads
# --------------------------------------------------------------------------------------------------------------------


def test_binary_kl_two_class_example_by_hand():
    """Class 0: p_T = sigmoid(ln 3) = 3/4 against p_S = 1/2; class 1: 1/2 against 1/2 (0). Mean over the 2 classes."""
    expected = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) / 2
    torch.testing.assert_close(binary_kl_div_loss(HAND_STUDENT, HAND_TEACHER), torch.tensor(expected))
    # Mean over rows x classes: two copies of the row give the same value; T² scaling at T = 2.
    torch.testing.assert_close(
        binary_kl_div_loss(HAND_STUDENT.repeat(2, 1), HAND_TEACHER.repeat(2, 1)), torch.tensor(expected)
    )
    torch.testing.assert_close(
        binary_kl_div_loss(HAND_STUDENT, HAND_TEACHER * 2, temperature=2.0), torch.tensor(4 * expected)
    )


def test_binary_kl_is_not_the_softmax_kl_and_its_gradient_matches_bce_against_soft_targets():
    """T²·KL(sigmoid(t/T) || sigmoid(s/T)) and T²·BCE(s/T, sigmoid(t/T)) differ by a constant: same gradient."""
    student, teacher, _ = make_logits((4, 5), masked=False, seed=11)
    assert not torch.allclose(binary_kl_div_loss(student, teacher), kl_div_loss(student, teacher))
    s1 = student.clone().requires_grad_()
    binary_kl_div_loss(s1, teacher, temperature=2.0).backward()
    s2 = student.clone().requires_grad_()
    (4.0 * F.binary_cross_entropy_with_logits(s2 / 2.0, torch.sigmoid(teacher / 2.0))).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


def test_task_loss_multi_label_is_bce_with_logits_and_regression_is_mse():
    from hf_distill.losses.task import task_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    bce = F.binary_cross_entropy_with_logits(logits, multi_hot)  # mean over rows x classes
    torch.testing.assert_close(task_loss(logits, multi_hot), bce)  # float labels, 3 outputs: inferred multi-label
    torch.testing.assert_close(task_loss(logits, multi_hot.long(), problem_type="multi_label_classification"), bce)
    torch.testing.assert_close(task_loss(logits, multi_hot, num_items_in_batch=8), bce * 4 / 8)
    values = torch.randn(4)
    one = torch.randn(4, 1)
    torch.testing.assert_close(task_loss(one, values), F.mse_loss(one.squeeze(-1), values))
    torch.testing.assert_close(task_loss(one, values, problem_type="regression"), F.mse_loss(one.squeeze(-1), values))
    with pytest.raises(ValueError, match=r"multi-label labels have shape \(4,\) but the logits have shape \(4, 3\)"):
        task_loss(logits, values, problem_type="multi_label_classification")


@pytest.mark.parametrize("num_items", [0, torch.tensor(0)], ids=["int", "tensor"])
def test_task_loss_of_a_window_without_labels_is_zero_not_nan(num_items):
    """A gradient-accumulation window whose labels are all -100 passes num_items_in_batch=0: 0, never 0/0."""
    from hf_distill.losses.task import task_loss

    logits = torch.randn(3, 5, 7, requires_grad=True)
    loss = task_loss(logits, torch.full((3, 5), -100), shift_labels=True, num_items_in_batch=num_items)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------------------------------------
# The weighted squared error under hidden_mse_loss and attention_mse_loss (its gradient is written out by hand)
# --------------------------------------------------------------------------------------------------------------------


def _autograd_weighted_squared_error(student, teacher, weight, keep):
    diff = student.float() - teacher.float()
    if keep is not None:
        diff = torch.where(keep, diff, 0.0)
    return (diff.pow(2) * weight).sum()


@pytest.mark.parametrize("masked", [False, True], ids=["no-keep", "keep"])
@pytest.mark.parametrize(
    "student_dtype, teacher_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "fp16-teacher", "bf16-student"],
)
def test_weighted_squared_error_matches_autograd_for_both_inputs(masked, student_dtype, teacher_dtype):
    """Value and both gradients (a teacher that requires grad gets one, as a mutual-learning peer does) equal those
    of the plain autograd expression, with a broadcast weight and keep mask; masked entries hold NaN."""
    g = torch.Generator().manual_seed(30)
    student = torch.randn(3, 2, 5, 5, generator=g).to(student_dtype)
    teacher = torch.randn(3, 2, 5, 5, generator=g).to(teacher_dtype)
    keep = (torch.rand(3, 1, 5, 5, generator=g) > 0.3) if masked else None
    weight = torch.rand(3, 1, 5, 1, generator=g)
    if masked:
        student = student.masked_fill(~keep, math.nan)
        teacher = teacher.masked_fill(~keep, math.inf)
    grads = []
    for fn in (weighted_squared_error, _autograd_weighted_squared_error):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        value = fn(s, t, weight, keep)
        value.backward()
        grads.append((value.detach(), s.grad, t.grad))
    (value, s_grad, t_grad), (ref_value, ref_s_grad, ref_t_grad) = grads
    assert value.dtype == torch.float32 and s_grad.dtype == student_dtype and t_grad.dtype == teacher_dtype
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(s_grad, ref_s_grad)
    torch.testing.assert_close(t_grad, ref_t_grad)
    assert torch.isfinite(value) and torch.isfinite(s_grad).all() and torch.isfinite(t_grad).all()
    if masked:
        assert (s_grad[~keep.expand_as(s_grad)] == 0).all()


def test_weighted_squared_error_takes_a_float_weight_and_refuses_shape_mismatch():
    student, teacher = torch.ones(2, 3), torch.zeros(2, 3)
    assert weighted_squared_error(student, teacher, 0.5).item() == 3.0
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        weighted_squared_error(student, torch.zeros(2, 4), 1.0)
