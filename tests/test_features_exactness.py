"""The captured layers attend with the probabilities they capture: outputs, losses and gradients are those of eager.

`forward_with_features` computes a captured layer's output as `dropout(P) @ V` from the probabilities it stores,
instead of running SDPA a second time. These tests hold it to a plain eager forward of the same weights, for every
family in `test_features.FAMILIES`, in eval and train mode (dropout on hidden states and attention probabilities,
same seed), with right- and left-padded rows, with an all-ones mask and with no mask at all.
"""

from functools import partial

import pytest
import torch
from test_features import ATTENTION_LAYERS, BY_NAME, FAMILIES, HEADS, NUM_LAYERS, VOCAB, eager_copy, make_model
from torch import nn
from transformers import PreTrainedModel

from hf_distill.features import (
    _capture_attention,
    _CaptureConfig,
    attend,
    attention_probabilities,
    forward_with_features,
)
from hf_distill.student import get_layers

# Every family's names for hidden and attention dropout; names a config does not use are simply ignored.
DROPOUT = {
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.2,
    "dropout": 0.1,
    "attention_dropout": 0.2,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.2,
}
MASKS = ["padded", "all_ones", "no_mask"]


def make_inputs(model: PreTrainedModel, mask: str) -> dict[str, torch.Tensor]:
    """Three rows of 8 (padded: one full, one right-padded, one left-padded) with labels for the model's own loss."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (3, 8), generator=generator)
    attention_mask = torch.ones(3, 8, dtype=torch.long)
    if mask == "padded":
        attention_mask[1, 5:] = 0
        attention_mask[2, :3] = 0
    inputs = {"input_ids": input_ids}
    if mask != "no_mask":
        inputs["attention_mask"] = attention_mask
    if type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel"):
        # Position i's logits score label i + 1: a label after a padding position would score a padding query's
        # output, which eager and SDPA leave different (see `real_tokens`).
        scored = attention_mask.bool()
        scored[:, 1:] &= attention_mask[:, :-1].bool()
        inputs["labels"] = input_ids.masked_fill(~scored, -100)
    else:
        inputs["labels"] = torch.tensor([0, 1, 1])
    return inputs


def real_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # Padding query rows of a left-padded decoder have no key to attend to: eager gives them the mean of the values,
    # SDPA (and the capture, which mimics it) zeros. Only real positions are compared.
    return inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()


def store_block_output(store: dict, index: int, module: nn.Module, args: tuple, output) -> None:
    store[index] = output[0] if isinstance(output, tuple) else output


def surrogate_loss(loss, hidden: dict, maps: dict, real: torch.Tensor) -> torch.Tensor:
    """The model's own loss plus terms on the captured states and maps, so every captured tensor gets a gradient."""
    pairs = (real[:, None, :, None] & real[:, None, None, :]).expand(-1, HEADS, -1, -1)
    total = loss
    for h in hidden.values():
        total = total + h[real].pow(2).mean()
    for m in maps.values():
        total = total + 10 * m[pairs].pow(2).mean()
    return total


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_capture_equals_eager_forward_and_backward(family, mode, mask):
    model = make_model(family, **DROPOUT).train(mode == "train")
    reference = eager_copy(model).train(mode == "train")
    inputs = make_inputs(model, mask)
    real = real_tokens(inputs)
    layers = list(range(NUM_LAYERS))

    # The reference's block outputs, read by hooks (HF's last `hidden_states` entry of a decoder has the final norm).
    expected_hidden = {}
    for i, block in enumerate(get_layers(reference)):
        block.register_forward_hook(partial(store_block_output, expected_hidden, i))

    torch.manual_seed(0)  # same dropout masks in both passes: eager and CPU SDPA draw them alike
    ours = forward_with_features(model, inputs, hidden_layers=layers, attention_layers=ATTENTION_LAYERS)
    torch.manual_seed(0)
    expected = reference(**inputs, output_attentions=mode == "eval")

    torch.testing.assert_close(ours.outputs.loss, expected.loss, atol=1e-5, rtol=1e-5)
    logits = ours.outputs.logits
    expected_logits = expected.logits
    if logits.dim() == 3:
        logits, expected_logits = logits[real], expected_logits[real]
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert sorted(expected_hidden) == layers
    for i in layers:
        torch.testing.assert_close(ours.hidden_states[i][real], expected_hidden[i][real], atol=1e-5, rtol=1e-5)

    # Eager returns post-dropout maps in train mode, so the maps (and a loss on them) are compared in eval mode; in
    # train mode the rows of the captured, pre-dropout maps still sum to one.
    ours_maps, expected_maps = {}, {}
    if mode == "eval":
        ours_maps = ours.attentions
        expected_maps = {i: expected.attentions[i] for i in ATTENTION_LAYERS}
        pairs = (real[:, None, :, None] & real[:, None, None, :]).expand(-1, HEADS, -1, -1)
        for i in ATTENTION_LAYERS:
            torch.testing.assert_close(ours_maps[i][pairs], expected_maps[i][pairs], atol=1e-6, rtol=1e-5)
    else:
        for i in ATTENTION_LAYERS:
            rows = ours.attentions[i].sum(-1)[real[:, None, :].expand(-1, HEADS, -1)]
            torch.testing.assert_close(rows, torch.ones_like(rows))

    surrogate_loss(ours.outputs.loss, ours.hidden_states, ours_maps, real).backward()
    surrogate_loss(expected.loss, expected_hidden, expected_maps, real).backward()
    expected_grads = dict(reference.named_parameters())
    compared = 0
    for name, parameter in model.named_parameters():
        reference_grad = expected_grads[name].grad
        if parameter.grad is None or reference_grad is None:
            assert parameter.grad is None and (reference_grad is None or not reference_grad.any()), name
            continue
        torch.testing.assert_close(parameter.grad, reference_grad, atol=2e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared >= len(list(model.parameters())) - 2  # at most an unused pooler / position table left out
    if mode == "train":  # the dropout was really drawn: the same rows give another loss in eval mode
        with torch.no_grad():
            eval_logits = model.eval()(**inputs).logits
        assert not torch.allclose(eval_logits[real] if eval_logits.dim() == 3 else eval_logits, logits, atol=1e-4)


@pytest.mark.parametrize("family", [BY_NAME["bert"], BY_NAME["llama"]], ids=repr)
def test_captured_layers_run_no_second_attention(family, monkeypatch):
    """Layers 0 and 2 are captured: only layer 1 (of 3) calls SDPA."""
    model = make_model(family)
    inputs = make_inputs(model, "padded")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        forward_with_features(model, inputs, attention_layers=ATTENTION_LAYERS)
    assert len(calls) == NUM_LAYERS - len(ATTENTION_LAYERS)
    calls.clear()
    with torch.no_grad():
        model(**inputs)
    assert len(calls) == NUM_LAYERS


# ----- attend: a pure function against SDPA -----


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool_with_empty_rows", "additive"])
def test_attend_equals_sdpa(mask_kind, dropout):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 6, 8, generator=generator)
    key, value = torch.randn(2, 2, 6, 8, generator=generator), torch.randn(2, 2, 6, 8, generator=generator)
    is_causal = mask_kind == "causal"
    mask = None
    if mask_kind == "bool_with_empty_rows":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
        mask[1, :, :, :2] = False  # left padding: queries 0 and 1 of row 1 have no key to attend to
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 6, 6, generator=generator)

    probabilities = attention_probabilities(query, key, mask, is_causal=is_causal)
    torch.manual_seed(0)
    output, weights = attend(probabilities, value, mask, dropout=dropout, training=True)
    torch.manual_seed(0)
    expected = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=True
    ).transpose(1, 2)
    assert output.shape == (2, 6, 4, 8) and weights.shape == (2, 4, 6, 6)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
    if mask_kind == "bool_with_empty_rows":
        assert not output[1, :2].any()


def test_attend_leaves_dropout_off_in_eval_and_casts_to_value_dtype():
    probabilities = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    value = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    output, weights = attend(probabilities, value, None, dropout=0.5, training=False)
    assert output.dtype == weights.dtype == torch.bfloat16
    torch.testing.assert_close(weights, probabilities.to(torch.bfloat16))


def test_score_changing_attention_kwargs_are_refused():
    module = nn.Module()
    module.config = _CaptureConfig(object(), store=lambda probabilities: None)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"\['position_bias'\].*attention_weight=0"):
        _capture_attention(module, q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))
