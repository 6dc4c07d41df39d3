"""Tests for hf_distill.features: hidden states and attention maps of chosen layers from one forward pass.

Each family in FAMILIES is a tiny model built in-process. The reference for attention maps is an eager-attention
copy of the same model with `output_attentions=True`; the reference for hidden states is HF's
`output_hidden_states`.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MPNetConfig,
    MPNetForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from hf_distill.features import (
    ATTENTION_MODEL_TYPES,
    Features,
    attention_probabilities,
    check_attention_compatible,
    forward_with_features,
)
from hf_distill.student import get_layers

VOCAB = 64
NUM_LAYERS = 3
HIDDEN = 32
HEADS = 4
# Attention is captured for blocks 0 and 2 only, so block 1 in between must keep running plain SDPA.
ATTENTION_LAYERS = (0, 2)


def _encoder_kwargs(**kw) -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": 64,
        **kw,
    }


def _decoder_kwargs(**kw) -> dict:
    # Two key/value heads for four query heads: grouped-query attention, one map expected per query head.
    return {**_encoder_kwargs(num_key_value_heads=2), **kw}


def _split_qk(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # GPT-2's Conv1D `c_attn` weight is (hidden, 3 * hidden), with the query, key and value columns side by side.
    return weight[:, :HIDDEN], weight[:, HIDDEN : 2 * HIDDEN]


@dataclass
class Family:
    """One row of the table: how to build a tiny model and where its query/key weights and final norm are."""

    name: str
    make_config: Callable[[], object]
    model_class: type
    qk_grads: Callable[[nn.Module], tuple[torch.Tensor | None, torch.Tensor | None]]
    final_norm: str | None = None  # module applied by HF to its last `output_hidden_states` entry, if any

    def __repr__(self) -> str:
        return self.name


FAMILIES = [
    Family(
        "bert",
        lambda: BertConfig(**_encoder_kwargs()),
        BertForSequenceClassification,
        lambda block: (block.attention.self.query.weight.grad, block.attention.self.key.weight.grad),
    ),
    Family(
        "roberta",
        lambda: RobertaConfig(**_encoder_kwargs(pad_token_id=1)),
        RobertaForSequenceClassification,
        lambda block: (block.attention.self.query.weight.grad, block.attention.self.key.weight.grad),
    ),
    Family(
        "xlm-roberta",
        lambda: XLMRobertaConfig(**_encoder_kwargs(pad_token_id=1)),
        XLMRobertaForSequenceClassification,
        lambda block: (block.attention.self.query.weight.grad, block.attention.self.key.weight.grad),
    ),
    Family(
        "distilbert",
        lambda: DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=NUM_LAYERS, n_heads=HEADS, hidden_dim=2 * HIDDEN
        ),
        DistilBertForSequenceClassification,
        lambda block: (block.attention.q_lin.weight.grad, block.attention.k_lin.weight.grad),
    ),
    Family(
        "mpnet",
        lambda: MPNetConfig(**_encoder_kwargs()),
        MPNetForSequenceClassification,
        lambda block: (block.attention.attn.q.weight.grad, block.attention.attn.k.weight.grad),
    ),
    Family(
        "gpt2",
        lambda: GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=NUM_LAYERS,
            n_head=HEADS,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        GPT2LMHeadModel,
        lambda block: (
            _split_qk(block.attn.c_attn.weight.grad) if block.attn.c_attn.weight.grad is not None else (None, None)
        ),
        final_norm="transformer.ln_f",
    ),
    Family(
        "llama",
        lambda: LlamaConfig(**_decoder_kwargs()),
        LlamaForCausalLM,
        lambda block: (block.self_attn.q_proj.weight.grad, block.self_attn.k_proj.weight.grad),
        final_norm="model.norm",
    ),
    Family(
        "qwen2",
        lambda: Qwen2Config(**_decoder_kwargs()),
        Qwen2ForCausalLM,
        lambda block: (block.self_attn.q_proj.weight.grad, block.self_attn.k_proj.weight.grad),
        final_norm="model.norm",
    ),
    Family(
        # Sliding window narrower than the batch on layers >= 1, so the windowed SDPA mask is exercised.
        "qwen2-sliding",
        lambda: Qwen2Config(**_decoder_kwargs(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
        Qwen2ForCausalLM,
        lambda block: (block.self_attn.q_proj.weight.grad, block.self_attn.k_proj.weight.grad),
        final_norm="model.norm",
    ),
    Family(
        "qwen3",
        lambda: Qwen3Config(**_decoder_kwargs(head_dim=HIDDEN // HEADS)),
        Qwen3ForCausalLM,
        lambda block: (block.self_attn.q_proj.weight.grad, block.self_attn.k_proj.weight.grad),
        final_norm="model.norm",
    ),
    Family(
        "mistral",
        lambda: MistralConfig(**_decoder_kwargs(sliding_window=4)),
        MistralForCausalLM,
        lambda block: (block.self_attn.q_proj.weight.grad, block.self_attn.k_proj.weight.grad),
        final_norm="model.norm",
    ),
]


BY_NAME = {family.name: family for family in FAMILIES}


def make_model(family: Family, **config_overrides) -> nn.Module:
    config = family.make_config()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return family.model_class(config).eval()


def eager_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return reference


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three sequences of 8: one full, one right-padded, one left-padded."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (3, 8), generator=generator)
    attention_mask = torch.ones(3, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def real_pairs(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean: query and key both real tokens (maps of padding queries may legitimately differ)."""
    real = attention_mask.bool()
    return (real[:, None, :, None] & real[:, None, None, :]).expand(-1, 1, -1, -1)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def attention_configs(model: nn.Module) -> list[object]:
    """The config object each attention-bearing module holds (all the model's config when nothing is swapped)."""
    return [m.config for m in model.modules() if hasattr(m, "config") and not hasattr(m, "base_model_prefix")]


# ----- attention maps -----


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_attention_maps_match_eager_reference(family, batch):
    model = make_model(family)
    reference = eager_copy(model)
    with torch.no_grad():
        plain = model(**batch)
        expected = reference(**batch, output_attentions=True)
        features = forward_with_features(model, batch, attention_layers=ATTENTION_LAYERS)

    assert isinstance(features, Features)
    assert sorted(features.attentions) == list(ATTENTION_LAYERS)
    assert features.hidden_states == {} and features.embeddings is None
    real = real_pairs(batch["attention_mask"])
    for layer in ATTENTION_LAYERS:
        maps = features.attentions[layer]
        assert maps.shape == (3, HEADS, 8, 8)
        assert maps.dtype == torch.float32
        torch.testing.assert_close(
            maps.masked_fill(~real, 0), expected.attentions[layer].masked_fill(~real, 0), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(features.outputs.logits, plain.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_causal_families_mask_future_tokens(family, batch):
    model = make_model(family)
    with torch.no_grad():
        maps = forward_with_features(model, batch, attention_layers=[0]).attentions[0]
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)
    is_decoder = family.final_norm is not None
    assert bool((maps[0][:, future] == 0).all()) is is_decoder


def test_eager_model_is_captured_too(batch):
    model = eager_copy(make_model(BY_NAME["bert"]))
    with torch.no_grad():
        expected = model(**batch, output_attentions=True)
        features = forward_with_features(model, batch, attention_layers=[1])
    real = real_pairs(batch["attention_mask"])
    torch.testing.assert_close(
        features.attentions[1].masked_fill(~real, 0), expected.attentions[1].masked_fill(~real, 0), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(features.outputs.logits, expected.logits, atol=1e-6, rtol=0)


def test_wrapped_model_is_called_and_unwrapped(batch):
    model = make_model(BY_NAME["bert"])
    wrapped = nn.DataParallel(model)  # without GPUs it simply calls the module, but it must be unwrapped for hooks
    with torch.no_grad():
        features = forward_with_features(wrapped, batch, hidden_layers=[1], attention_layers=[1])
        plain = model(**batch)
    assert sorted(features.attentions) == [1] and sorted(features.hidden_states) == [1]
    torch.testing.assert_close(features.outputs.logits, plain.logits)


# ----- nothing stays modified -----


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_model_is_restored_after_call_and_after_exception(family, batch):
    model = make_model(family)
    implementation = model.config._attn_implementation
    configs, hooks = attention_configs(model), hook_count(model)

    forward_with_features(model, batch, hidden_layers=[0, 2], attention_layers=ATTENTION_LAYERS, embeddings=True)
    assert model.config._attn_implementation == implementation
    assert all(a is b for a, b in zip(attention_configs(model), configs))
    assert hook_count(model) == hooks

    def fail(module, args, output):
        raise RuntimeError("boom")

    # Raised after the captured layer 0 ran, while layer 2 is still swapped and every hook is installed.
    failing = get_layers(model)[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        forward_with_features(model, batch, hidden_layers=[0, 2], attention_layers=ATTENTION_LAYERS, embeddings=True)
    failing.remove()
    assert model.config._attn_implementation == implementation
    assert all(a is b for a, b in zip(attention_configs(model), configs))
    assert hook_count(model) == hooks


# ----- gradients, dropout, no_grad -----


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_gradients_reach_query_and_key_of_captured_layer(family, batch):
    # Heavy attention dropout in train mode: the maps must still be the pre-dropout softmax (rows sum to 1), as
    # dropout would zero and rescale entries.
    dropout = {"attention_probs_dropout_prob": 0.5, "attention_dropout": 0.5, "attn_pdrop": 0.5}
    model = make_model(family, **dropout).train()
    features = forward_with_features(model, batch, attention_layers=[1])
    maps = features.attentions[1]
    real_queries = batch["attention_mask"].bool()[:, None, :].expand(-1, HEADS, -1)
    torch.testing.assert_close(maps.sum(-1)[real_queries], torch.ones(int(real_queries.sum())))

    target = torch.rand(maps.shape, generator=torch.Generator().manual_seed(1))
    ((maps - target) ** 2).sum().backward()
    layers = get_layers(model)
    query_grad, key_grad = family.qk_grads(layers[1])
    assert query_grad is not None and query_grad.abs().sum() > 0
    assert key_grad is not None and key_grad.abs().sum() > 0
    # Block 2 comes after the maps, so a loss on them alone cannot reach it.
    assert family.qk_grads(layers[2]) == (None, None)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.model_class.supports_gradient_checkpointing], ids=repr)
def test_gradient_checkpointing_student(family, use_reentrant, batch):
    def grads(model: nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same dropout masks in both runs (checkpointing replays the RNG state it saw)
        features = forward_with_features(model, batch, attention_layers=[1])
        (features.attentions[1].pow(2).sum() + features.outputs.logits.pow(2).mean()).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    model = make_model(family).train()
    expected = grads(model)
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = grads(model)
    assert checkpointed.keys() == expected.keys()
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    assert all(block.gradient_checkpointing for block in get_layers(model))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_works_without_grad(family, context, batch):
    model = make_model(family)
    with_grad = forward_with_features(model, batch, hidden_layers=[1], attention_layers=[1])
    with context():
        without_grad = forward_with_features(model, batch, hidden_layers=[1], attention_layers=[1])
    assert not without_grad.attentions[1].requires_grad
    assert not without_grad.hidden_states[1].requires_grad
    torch.testing.assert_close(without_grad.attentions[1], with_grad.attentions[1].detach())
    torch.testing.assert_close(without_grad.outputs.logits, with_grad.outputs.logits.detach())


# ----- hidden states -----


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_hidden_states_are_block_outputs(family, batch):
    """`hidden_states[i]` is HF's `hidden_states[i + 1]` and `embeddings` is HF's `hidden_states[0]`, except that
    for decoders HF's last entry has the final norm applied and ours does not."""
    model = make_model(family)
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states
        features = forward_with_features(model, batch, hidden_layers=range(NUM_LAYERS), embeddings=True)
    assert len(expected) == NUM_LAYERS + 1
    assert sorted(features.hidden_states) == list(range(NUM_LAYERS))
    torch.testing.assert_close(features.embeddings, expected[0])
    for layer in range(NUM_LAYERS - 1):
        torch.testing.assert_close(features.hidden_states[layer], expected[layer + 1])
    last = features.hidden_states[NUM_LAYERS - 1]
    if family.final_norm is not None:
        assert not torch.allclose(last, expected[-1])
        last = model.get_submodule(family.final_norm)(last)
    torch.testing.assert_close(last, expected[-1])


def test_only_requested_hidden_states_are_returned(batch):
    model = make_model(BY_NAME["bert"])
    with torch.no_grad():
        features = forward_with_features(model, batch, hidden_layers=[2, 0, 2])
    assert sorted(features.hidden_states) == [0, 2]
    assert features.attentions == {} and features.embeddings is None


# ----- errors -----


def test_layer_index_out_of_range_lists_valid_range(batch):
    model = make_model(BY_NAME["bert"])
    with pytest.raises(ValueError, match=r"attention_layers \[3\].*0\.\.2"):
        forward_with_features(model, batch, attention_layers=[3])
    with pytest.raises(ValueError, match=r"hidden_layers \[-1\]"):
        forward_with_features(model, batch, hidden_layers=[-1])


def test_unsupported_model_type_lists_supported_types(batch):
    config = ElectraConfig(**_encoder_kwargs(embedding_size=HIDDEN))
    model = ElectraForSequenceClassification(config)
    with pytest.raises(ValueError, match="'electra'.*'bert'.*'qwen2'"):
        forward_with_features(model, batch, attention_layers=[0])
    with pytest.raises(ValueError, match="'electra'"):
        check_attention_compatible(model, make_model(BY_NAME["bert"]))


def test_unreadable_attention_implementation_is_refused(batch):
    model = make_model(BY_NAME["bert"])
    model.config._attn_implementation_internal = "flash_attention_2"  # pretend: no flash kernels on CPU
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        forward_with_features(model, batch, attention_layers=[0])


def test_attention_probabilities_reads_sdpa_and_eager_masks():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~allowed, torch.finfo(torch.float32).min)
    from_bool = attention_probabilities(query, key, allowed)
    torch.testing.assert_close(from_bool, attention_probabilities(query, key, additive))
    torch.testing.assert_close(from_bool, attention_probabilities(query, key, None, is_causal=True))
    with pytest.raises(ValueError, match="shape \\(2, 5\\)"):
        attention_probabilities(query, key, torch.ones(2, 5, dtype=torch.bool))


# ----- head counts -----


@pytest.mark.parametrize(
    ("teacher_heads", "student_heads"),
    [(4, 2), (2, 4)],
)
def test_check_attention_compatible_names_both_head_counts(teacher_heads, student_heads):
    teacher = BertForSequenceClassification(BertConfig(**_encoder_kwargs(num_attention_heads=teacher_heads)))
    student = BertForSequenceClassification(BertConfig(**_encoder_kwargs(num_attention_heads=student_heads)))
    with pytest.raises(ValueError) as error:
        check_attention_compatible(teacher, student)
    message = str(error.value)
    assert f"teacher has {teacher_heads} attention heads" in message
    assert f"student has {student_heads}" in message
    assert "attention_weight=0" in message and f"num_attention_heads={teacher_heads}" in message
    assert "MiniLM" in message


def test_check_attention_compatible_accepts_equal_query_heads_across_families():
    # Llama with grouped-query attention has 4 query heads like the 4-head BERT: maps are per query head.
    llama = make_model(BY_NAME["llama"])
    check_attention_compatible(make_model(BY_NAME["bert"]), llama)
    assert "bert" in ATTENTION_MODEL_TYPES
