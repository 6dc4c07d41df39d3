"""Tests for hf_distill.losses.minilm (MiniLM / MiniLMv2 self-attention relation transfer).

Each loss is checked against a slow reference written from the papers' formulas with Python loops and `math`
(MiniLM, https://arxiv.org/abs/2002.10957; MiniLMv2, https://arxiv.org/abs/2012.15828), over a table of widths,
relation heads and padding layouts; then padding is shown never to enter, and the normalisation by
`num_items_in_batch` to add up micro-batches exactly.
"""

import math

import pytest
import torch

from hf_distill.losses.minilm import (
    MINILM_RELATIONS,
    attention_relation_loss,
    relation_log_probs,
    self_relation_loss,
    split_relation_heads,
)

# --------------------------------------------------------------------------------------------------------------------
# Slow reference: plain floats, one (row, head, query) at a time
# --------------------------------------------------------------------------------------------------------------------


def ref_relation(left: list, right: list, head: int, d_r: int, i: int, keys: list[int]) -> list[float]:
    """softmax_j (x_i . y_j / sqrt(d_r)) over `keys`, for relation head `head` (columns head*d_r ... +d_r)."""
    cols = range(head * d_r, (head + 1) * d_r)
    scores = [sum(left[i][c] * right[j][c] for c in cols) / math.sqrt(d_r) for j in keys]
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return [e / sum(exps) for e in exps]


def ref_loss(s_left, s_right, t_left, t_right, mask, heads: int, causal: bool) -> float:
    s_left, s_right, t_left, t_right = (x.double().tolist() for x in (s_left, s_right, t_left, t_right))
    batch, length = len(s_left), len(s_left[0])
    mask = [[1] * length for _ in range(batch)] if mask is None else mask.tolist()
    d_s, d_t = len(s_left[0][0]) // heads, len(t_left[0][0]) // heads
    total, queries = 0.0, 0
    for b in range(batch):
        for i in range(length):
            if not mask[b][i]:
                continue  # padded query rows are left out
            queries += 1
            keys = [j for j in range(length) if mask[b][j] and (not causal or j <= i)]
            for a in range(heads):
                p_t = ref_relation(t_left[b], t_right[b], a, d_t, i, keys)
                p_s = ref_relation(s_left[b], s_right[b], a, d_s, i, keys)
                total += sum(p * math.log(p / q) for p, q in zip(p_t, p_s) if p > 0) / heads
    return total / max(queries, 1)


MASKS = {
    "none": None,
    "right padding": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
    "left padding": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]),
}

# (student width, teacher width, relation heads, mask, causal)
CASES = [
    (8, 12, 2, "none", False),
    (8, 16, 4, "right padding", False),
    (12, 8, 4, "left padding", False),
    (6, 6, 1, "right padding", False),
    (8, 12, 2, "left padding", True),
    (16, 8, 4, "right padding", True),
]


def projections(seed: int, width: int, batch: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("s_width, t_width, heads, mask, causal", CASES)
def test_self_relation_equals_the_reference(s_width, t_width, heads, mask, causal):
    s, t, m = projections(0, s_width), projections(1, t_width), MASKS[mask]
    value = self_relation_loss(s, t, m, relation_heads=heads, causal=causal)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ref_loss(s, s, t, t, m, heads, causal), rel=1e-5)


@pytest.mark.parametrize("s_width, t_width, heads, mask, causal", CASES)
def test_attention_relation_equals_the_reference(s_width, t_width, heads, mask, causal):
    sq, sk, tq, tk = projections(0, s_width), projections(1, s_width), projections(2, t_width), projections(3, t_width)
    m = MASKS[mask]
    value = attention_relation_loss(sq, sk, tq, tk, m, relation_heads=heads, causal=causal)
    assert value.item() == pytest.approx(ref_loss(sq, sk, tq, tk, m, heads, causal), rel=1e-5)


def test_relations_are_probabilities_over_the_real_keys():
    x = projections(0, 8)
    mask = MASKS["right padding"]
    probs = relation_log_probs(x, x, mask, relation_heads=2).exp()
    assert probs.shape == (3, 2, 6, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 6))
    assert probs[1, :, :, 3:].abs().max() == 0  # padded keys get no probability
    causal = relation_log_probs(x, x, None, relation_heads=2, causal=True).exp()
    assert torch.equal(causal.triu(1), torch.zeros_like(causal))


def test_identical_relations_give_zero():
    x = projections(0, 8)
    value = self_relation_loss(x, x.clone(), MASKS["left padding"], relation_heads=4)
    assert value.item() == pytest.approx(0, abs=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Padding, gradients, normalisation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["right padding", "left padding"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_enters(mask, causal):
    m = MASKS[mask]
    s, t = projections(0, 8).requires_grad_(), projections(1, 12)
    value = self_relation_loss(s, t, m, relation_heads=2, causal=causal)
    value.backward()
    padded = ~m.bool()
    assert s.grad[padded].abs().max() == 0  # no gradient reaches a padded position
    changed_s, changed_t = s.detach().clone(), t.clone()
    changed_s[padded] = 1e4
    changed_t[padded] = -3e3
    again = self_relation_loss(changed_s, changed_t, m, relation_heads=2, causal=causal)
    assert again.item() == pytest.approx(value.item(), rel=1e-6)
    sq, tq = projections(2, 8), projections(3, 12)
    before = attention_relation_loss(sq, s.detach(), tq, t, m, relation_heads=2, causal=causal)
    sq2, tq2 = sq.clone(), tq.clone()
    sq2[padded], tq2[padded] = 7.0, -7.0
    after = attention_relation_loss(sq2, changed_s, tq2, changed_t, m, relation_heads=2, causal=causal)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


def test_gradient_reaches_the_student_only_and_is_finite():
    s, t = projections(0, 8).requires_grad_(), projections(1, 12).requires_grad_()
    self_relation_loss(s, t, MASKS["right padding"], relation_heads=4).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_micro_batches_add_up_to_the_concatenated_batch():
    s, t, m = projections(0, 8), projections(1, 12), MASKS["right padding"]
    whole = self_relation_loss(s, t, m, relation_heads=2)
    window = m.sum()
    parts = [self_relation_loss(s[r], t[r], m[r], relation_heads=2, num_items_in_batch=window) for r in ([0], [1, 2])]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
    # A micro-batch padded further (to a longer length) gives the same value.
    longer = [torch.cat([x[1:], torch.zeros(2, 3, x.shape[-1])], 1) for x in (s, t)]
    mask = torch.cat([m[1:], torch.zeros(2, 3, dtype=m.dtype)], 1)
    padded = self_relation_loss(*longer, mask, relation_heads=2, num_items_in_batch=window)
    assert padded.item() == pytest.approx(parts[1].item(), rel=1e-6)


def test_no_real_position_gives_zero_connected_to_the_graph():
    s = projections(0, 8).requires_grad_()
    value = self_relation_loss(s, projections(1, 8), torch.zeros(3, 6, dtype=torch.long), relation_heads=2)
    assert value.item() == 0
    value.backward()
    assert s.grad.abs().max() == 0


def test_the_table_names_every_relation():
    assert MINILM_RELATIONS == {"qq": ("q", "q"), "kk": ("k", "k"), "vv": ("v", "v"), "attention": ("q", "k")}


# --------------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------------


def test_relation_heads_must_divide_each_width():
    with pytest.raises(ValueError, match=r"relation_heads=3 must divide the projection width 8.*\[1, 2, 4, 8\]"):
        self_relation_loss(projections(0, 8), projections(1, 12), relation_heads=3)
    with pytest.raises(ValueError, match=r"minilm_relation_heads must be an int >= 1, got 0"):
        split_relation_heads(projections(0, 8), 0)


def test_queries_and_keys_of_different_widths_are_refused():
    q, k = projections(0, 8), projections(1, 4)  # grouped-query attention: fewer key heads
    with pytest.raises(ValueError, match=r"same shape, got \(3, 6, 8\) and \(3, 6, 4\)"):
        attention_relation_loss(q, k, q, k, relation_heads=2)


def test_different_tokens_are_refused():
    with pytest.raises(ValueError, match=r"differ in \(batch, seq_len\)"):
        self_relation_loss(projections(0, 8), projections(1, 8, length=5), relation_heads=2)
