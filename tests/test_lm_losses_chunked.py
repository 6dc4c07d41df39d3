"""Tests for hf_distill.losses.chunked: chunked_logit_loss and fused_linear_distill_loss (and the closed-form chunk
gradients of hf_distill.losses.lm_grads they use).

Both are checked against the plain computation (materialised logits, then the hf_distill.losses.lm loss) for the loss
and its gradients within 1e-5 relative (max |a - b| / max |b| over each tensor), for every divergence, with masks,
num_items_in_batch, -inf teacher entries, biases and different hidden sizes, and with gradcheck in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from test_lm_losses import make_logits, rel_diff

from hf_distill.losses import chunked
from hf_distill.losses.chunked import chunked_logit_loss, fused_linear_distill_loss
from hf_distill.losses.lm import (
    LM_LOGIT_LOSSES,
    generalized_jsd_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    total_variation_loss,
)
from hf_distill.losses.logits import binary_kl_div_loss, jsd_loss, kl_div_loss, logits_mse_loss, reverse_kl_div_loss

# --------------------------------------------------------------------------------------------------------------------
# chunked_logit_loss
# --------------------------------------------------------------------------------------------------------------------

LM_NAMES = list(LM_LOGIT_LOSSES)
KEYWORDS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}

# (id, loss, keywords); the last three are not lm.py divergences and run the local-autograd path.
CHUNK_CASES = [
    ("forward_kl", kl_div_loss, {}),
    ("reverse_kl", reverse_kl_div_loss, {}),
    ("gjsd_0", generalized_jsd_loss, {"beta": 0.0}),
    ("gjsd_0.3", generalized_jsd_loss, {"beta": 0.3}),
    ("gjsd_1", generalized_jsd_loss, {"beta": 1.0}),
    ("total_variation", total_variation_loss, {}),
    ("skew_kl_0", skew_kl_loss, {"alpha": 0.0}),
    ("skew_kl_0.2", skew_kl_loss, {"alpha": 0.2}),
    ("skew_reverse_kl_0", skew_reverse_kl_loss, {"alpha": 0.0}),
    ("skew_reverse_kl_0.2", skew_reverse_kl_loss, {"alpha": 0.2}),
    ("jsd (autograd)", jsd_loss, {}),
    ("mse (autograd)", logits_mse_loss, {}),
    ("binary_kl (autograd)", binary_kl_div_loss, {}),
]

# Where only the teacher has -inf entries the reverse KLs are infinite by definition, and the losses on raw logits or
# sigmoids (mse, binary_kl) have no -inf entries to handle.
NEG_INF = {"reverse_kl": ["both"], "gjsd_1": ["both"], "skew_reverse_kl_0": ["both"]}
NEG_INF.update({"mse (autograd)": ["none"], "binary_kl (autograd)": ["none"]})
CHUNK_PARAMS = [
    pytest.param(case, neg_inf, id=f"{case[0]}-{neg_inf}")
    for case in CHUNK_CASES
    for neg_inf in NEG_INF.get(case[0], ["both", "teacher"])
]


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("setting", ["all", "mask", "mask_num_items"])
@pytest.mark.parametrize("case, neg_inf", CHUNK_PARAMS)
def test_chunked_equals_unchunked_loss_and_grads(case, neg_inf, setting, chunk_size):
    _, fn, kw = case
    student, teacher, mask = make_logits(shape=(3, 7, 11), seed=9, teacher_neg_inf=neg_inf)
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


@pytest.mark.parametrize("case", CHUNK_CASES[:10], ids=[c[0] for c in CHUNK_CASES[:10]])
def test_chunked_gradcheck_float64(case):
    _, fn, kw = case
    student, teacher, mask = make_logits(shape=(2, 3, 5), seed=13, dtype=torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: chunked_logit_loss(fn, s, teacher, mask, chunk_size=2, temperature=1.3, **kw), (student,)
    )


def test_chunked_rejects_bad_keywords_before_computing():
    student, teacher, _ = make_logits()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 2"):
        chunked_logit_loss(generalized_jsd_loss, student, teacher, beta=2)
    with pytest.raises(TypeError, match="beta"):
        chunked_logit_loss(skew_kl_loss, student, teacher, beta=0.5)


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


@pytest.mark.parametrize(
    "name, kw",
    [("generalized_jsd", {"beta": 0.0}), ("generalized_jsd", {"beta": 1.0}), ("generalized_jsd", {"beta": 0.9}),
     ("skew_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.6})],
)  # fmt: skip
def test_fused_keywords_and_end_points_equal_plain(name, kw):
    s_h, s_w, s_b, t_h, t_w, t_b, mask = make_heads("everything", seed=14)
    expected = LM_LOGIT_LOSSES[name](F.linear(s_h, s_w, s_b), F.linear(t_h, t_w, t_b), mask, temperature=1.5, **kw)
    expected_grads = torch.autograd.grad(expected, (s_h, s_w, s_b))
    loss = fused_linear_distill_loss(
        s_h, s_w, t_h, t_w, mask, divergence=name, temperature=1.5, chunk_size=5, student_bias=s_b, teacher_bias=t_b,
        **kw,
    )  # fmt: skip
    assert rel_diff(loss, expected) <= 1e-5
    for grad, expected_grad in zip(torch.autograd.grad(loss, (s_h, s_w, s_b)), expected_grads):
        assert rel_diff(grad, expected_grad) <= 1e-5


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


@pytest.mark.parametrize("name", LM_NAMES)
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
