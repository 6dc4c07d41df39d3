"""fused_linear_cross_entropy (hf_distill/losses/fused_ce.py) against F.cross_entropy on F.linear logits: the loss and
the gradients of the hidden states, the weight and the bias within 1e-5 relative (max |a - b| / max |b|), with
ignored labels, num_items_in_batch, chunk sizes from 1 to larger than the input, and gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F
from test_lm_losses import rel_diff

from hf_distill.losses.fused_ce import fused_linear_cross_entropy

VOCAB, HIDDEN = 11, 6


def make_inputs(setting, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(VOCAB, generator=g).to(dtype).requires_grad_(True) if "bias" in setting else None
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    if "ignored" in setting:
        labels[0] = -100  # a row without one label
        labels[1, :3] = -100  # a prompt
    return hidden, weight, bias, labels


def reference(hidden, weight, bias, labels, num_items=None):
    logits = F.linear(hidden, weight, bias).float()
    total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
    denominator = labels.ne(-100).sum() if num_items is None else num_items
    return total / max(int(denominator), 1)


SETTINGS = ["plain", "ignored", "bias", "ignored_bias", "ignored_num_items"]


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("setting", SETTINGS)
def test_equals_cross_entropy_on_linear_logits_loss_and_grads(setting, chunk_size):
    hidden, weight, bias, labels = make_inputs(setting)
    num_items = torch.tensor(40) if "num_items" in setting else None
    params = [t for t in (hidden, weight, bias) if t is not None]
    expected = reference(hidden, weight, bias, labels, num_items)
    expected_grads = torch.autograd.grad(expected, params)
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, chunk_size=chunk_size, num_items_in_batch=num_items
    )
    grads = torch.autograd.grad(loss * 0.5, params)  # a grad_output != 1 is applied
    assert loss.dtype == torch.float32
    assert rel_diff(loss, expected) <= 1e-5
    for grad, want in zip(grads, expected_grads):
        assert rel_diff(grad, want * 0.5) <= 1e-5


def test_shifted_causal_lm_inputs_equal_the_task_loss():
    """The trainer's use: hidden[:, :-1] (a non-contiguous view) against labels[:, 1:]."""
    from hf_distill.losses.task import task_loss

    hidden, weight, bias, labels = make_inputs("ignored_bias", seed=3)
    logits = F.linear(hidden, weight, bias)
    expected = task_loss(logits, labels, shift_labels=True)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    loss = fused_linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], bias=bias, chunk_size=3)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert rel_diff(loss, expected) <= 1e-5 and rel_diff(grad, expected_grad) <= 1e-5
    assert (grad[:, -1] == 0).all()  # the last position predicts nothing


def test_gradcheck_float64():
    hidden, weight, bias, labels = make_inputs("ignored_bias", seed=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=2), (hidden, weight, bias)
    )


def test_nothing_labelled_is_a_connected_zero_and_no_grad_mode_works():
    hidden, weight, _, labels = make_inputs("plain", seed=5)
    none = fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), chunk_size=2)
    none.backward()
    assert none.item() == 0.0 and (hidden.grad == 0).all() and (weight.grad == 0).all()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    torch.testing.assert_close(loss, reference(hidden, weight, None, labels))


def test_reads_only_labelled_rows_one_chunk_at_a_time(monkeypatch):
    hidden, weight, _, labels = make_inputs("ignored", seed=6)
    seen = []
    original = F.linear

    def recording_linear(x, w, b=None):
        seen.append(x.shape[0])
        return original(x, w, b)

    monkeypatch.setattr(F, "linear", recording_linear)
    fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert sum(seen) == labels.ne(-100).sum().item() and max(seen) <= 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_size=0), r"chunk_size must be a positive int, got 0"),
        (dict(weight=torch.randn(VOCAB, HIDDEN + 1)), r"hidden size 6 but weight has shape \(11, 7\)"),
        (dict(bias=torch.randn(VOCAB + 1)), r"bias has shape \(12,\) but the vocabulary has 11"),
        (dict(labels=torch.zeros(3, 6, dtype=torch.long)), r"labels must be integer token ids of shape \(3, 7\)"),
    ],
)
def test_bad_inputs_name_the_argument_and_the_fix(kwargs, message):
    hidden, weight, _, labels = make_inputs("plain")
    call = {"hidden": hidden, "weight": weight, "labels": labels, **kwargs}
    with pytest.raises(ValueError, match=message):
        fused_linear_cross_entropy(call.pop("hidden"), call.pop("weight"), call.pop("labels"), **call)
