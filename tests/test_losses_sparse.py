"""sparse_kl_loss: the forward KL to a teacher's top-k + tail, against a slow formula, exact identities, the
data-processing bound, masking and reductions, and gradients (gradcheck in float64)."""

import functools
import math

import pytest
import torch

from hf_distill.losses import kl_div_loss
from hf_distill.losses.sparse import sparse_kl_loss, sparse_teacher_distribution


def logits(shape, seed, scale=2.0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def reference_sparse_kl(student, teacher, k, temperature, mask=None):
    """Slow, direct: per position the k + 1 buckets in float64 with math; mean over counted positions, times T²."""
    s_rows = student.double().reshape(-1, student.shape[-1])
    t_rows = teacher.double().reshape(-1, teacher.shape[-1])
    counted = [True] * len(s_rows) if mask is None else mask.reshape(-1).tolist()
    total, count = 0.0, 0
    for s_row, t_row, keep in zip(s_rows, t_rows, counted):
        if not keep:
            continue
        p = [math.exp(v / temperature) for v in t_row.tolist()]
        q = [math.exp(v / temperature) for v in s_row.tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        top = sorted(range(len(p)), key=lambda c: -p[c])[:k]
        rest = [c for c in range(len(p)) if c not in top]
        buckets = [(p[c], q[c]) for c in top] + [(sum(p[c] for c in rest), sum(q[c] for c in rest))]
        total += sum(a * math.log(a / b) for a, b in buckets if a > 0)
        count += 1
    return torch.tensor(total * temperature**2 / max(count, 1), dtype=torch.float64)


def sparse(student, teacher, k, temperature=1.0, **kw):
    ids, logprobs, tail = sparse_teacher_distribution(teacher, k, temperature=temperature)
    return sparse_kl_loss(student, ids, logprobs, tail, temperature=temperature, **kw)


# (shape, k, temperature)
CASES = [((4, 10), 3, 1.0), ((2, 5, 12), 4, 2.0), ((3, 7), 1, 0.5), ((2, 3, 9), 8, 1.0)]


@pytest.mark.parametrize("shape, k, temperature", CASES)
def test_equals_the_slow_direct_formula(shape, k, temperature):
    student, teacher = logits(shape, 0), logits(shape, 1)
    expected = reference_sparse_kl(student, teacher, k, temperature)
    torch.testing.assert_close(sparse(student, teacher, k, temperature).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, k, temperature", CASES)
def test_is_a_lower_bound_of_the_full_kl(shape, k, temperature):
    # Data-processing inequality: merging the non-top-k entries into one bucket can only lose divergence.
    for seed in range(10):
        student, teacher = logits(shape, 2 * seed), logits(shape, 2 * seed + 1, scale=1.0 + seed)
        full = kl_div_loss(student, teacher, temperature=temperature)
        assert sparse(student, teacher, k, temperature) <= full * (1 + 1e-6) + 1e-7


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_exact_identities_with_the_full_kl(temperature):
    student, teacher = logits((3, 4, 11), 3), logits((3, 4, 11), 4)
    full = kl_div_loss(student, teacher, temperature=temperature)
    # k = V: the tail is empty (log-mass -inf); k = V - 1: the tail is a single entry. Both are the full distribution.
    for k in (11, 10):
        torch.testing.assert_close(sparse(student, teacher, k, temperature), full)
    ids, _, tail = sparse_teacher_distribution(teacher, 11, temperature=temperature)
    assert torch.isneginf(tail).all() and ids.dtype == torch.int32
    # A teacher with no mass outside 4 entries: its top-4 plus an empty tail is its whole distribution.
    peaked = teacher.clone()
    peaked[..., 4:] = float("-inf")
    torch.testing.assert_close(
        sparse(student, peaked, 4, temperature), kl_div_loss(student, peaked, temperature=temperature)
    )
    # The student equal to the teacher: zero.
    assert sparse(teacher, teacher, 3, temperature).abs() < 1e-6


def test_the_tail_is_exact_where_one_minus_the_top_k_mass_rounds_to_zero():
    # Top-1 probability 1 - 1e-12: 1 - p rounds to 0 in float32, the complement's log-sum-exp does not.
    teacher = torch.tensor([[0.0, -30.0, -30.0, -31.0]])
    ids, logprobs, tail = sparse_teacher_distribution(teacher, 1)
    expected = torch.logsumexp(torch.tensor([-30.0, -30.0, -31.0], dtype=torch.float64), 0) - torch.logsumexp(
        teacher[0].double(), 0
    )
    assert ids.tolist() == [[0]] and torch.isfinite(tail).all()
    torch.testing.assert_close(tail.double(), expected.reshape(1), rtol=1e-6, atol=0)
    # The loss takes the student's tail the same way: finite where log(1 - q_top) would be log(0) = -inf (and the
    # loss inf). The float32 loss is ~1e-11 here, its top-1 term below float32 resolution: compare absolutely.
    student = torch.tensor([[0.0, -25.0, -28.0, -40.0]])
    loss = sparse_kl_loss(student, ids, logprobs, tail)
    assert torch.isfinite(loss) and (loss.double() - reference_sparse_kl(student, teacher, 1, 1.0)).abs() < 1e-10


def test_masking_and_num_items_in_batch_reduce_like_the_logit_losses():
    student, teacher = logits((2, 6, 9), 5), logits((2, 6, 9), 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()
    ids, logprobs, tail = sparse_teacher_distribution(teacher, 3, temperature=2.0)
    # Padded positions of a cached batch hold zeros (not a distribution), or worse: they must not count.
    logprobs, tail = logprobs.masked_fill(~mask[..., None], 0.0), tail.masked_fill(~mask, float("nan"))
    ids = ids.masked_fill(~mask[..., None], 0)
    s = student.clone().requires_grad_(True)
    loss = sparse_kl_loss(s, ids, logprobs, tail, mask, temperature=2.0)
    torch.testing.assert_close(loss.double(), reference_sparse_kl(student, teacher, 3, 2.0, mask), rtol=1e-5, atol=0)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad[~mask].abs().max() == 0
    summed = sparse_kl_loss(student, ids, logprobs, tail, mask, temperature=2.0, num_items_in_batch=20)
    torch.testing.assert_close(summed, loss.detach() * mask.sum() / 20)
    nothing = sparse_kl_loss(s, ids, logprobs, tail, torch.zeros_like(mask), temperature=2.0)
    assert nothing == 0 and nothing.requires_grad


def test_gradients_match_gradcheck_in_float64():
    teacher = logits((2, 3, 7), 7, dtype=torch.float64)
    student = logits((2, 3, 7), 8, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]]).bool()
    for k, temperature in ((2, 1.5), (7, 1.0), (6, 0.7)):  # with a tail, with an empty one, with a one-entry one
        ids, logprobs, tail = sparse_teacher_distribution(teacher, k, temperature=temperature)
        loss = functools.partial(
            sparse_kl_loss, teacher_ids=ids, teacher_logprobs=logprobs, teacher_tail_logprob=tail, mask=mask,
            temperature=temperature,
        )  # fmt: skip
        assert torch.autograd.gradcheck(loss, (student,))
    # An empty tail (k = V) leaves the gradient finite (no NaN from the log-sum-exp of nothing).
    ids, logprobs, tail = sparse_teacher_distribution(teacher, 7)
    sparse_kl_loss(student, ids, logprobs, tail).backward()
    assert torch.isfinite(student.grad).all()


def test_the_gradient_equals_the_full_kl_gradient_when_the_teacher_has_no_tail():
    teacher = logits((4, 10), 9)
    teacher[:, 5:] = float("-inf")
    student = logits((4, 10), 10)
    grads = []
    for fn in (lambda s: sparse(s, teacher, 5, 2.0), lambda s: kl_div_loss(s, teacher, temperature=2.0)):
        s = student.clone().requires_grad_(True)
        fn(s).backward()
        grads.append(s.grad)
    torch.testing.assert_close(*grads)


# (case id, function of (student, ids, logprobs, tail) -> the call's arguments, regex of the ValueError)
BAD_INPUTS = [
    ("ids of other positions", lambda s, i, lp, t: (s, i[:1], lp[:1], t), "must both have shape"),
    ("logprobs of another k", lambda s, i, lp, t: (s, i, lp[..., :2], t), "must both have shape"),
    ("tail with a trailing 1", lambda s, i, lp, t: (s, i, lp, t[..., None]), "squeeze a trailing dim"),
    ("float ids", lambda s, i, lp, t: (s, i.float(), lp, t), "integer token ids"),
    ("k above the vocabulary", lambda s, i, lp, t: (s[..., :2], i, lp, t), "more than the student's vocabulary"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_refused_with_the_fix(make, message):
    student, teacher = logits((2, 4, 8), 0), logits((2, 4, 8), 1)
    ids, logprobs, tail = sparse_teacher_distribution(teacher, 3)
    with pytest.raises(ValueError, match=message):
        sparse_kl_loss(*make(student, ids, logprobs, tail))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sparse_kl_loss(student, ids, logprobs, tail, temperature=0.0)
    with pytest.raises(ValueError, match="k must be in"):
        sparse_teacher_distribution(teacher, 9)
