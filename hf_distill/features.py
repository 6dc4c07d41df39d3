"""Hidden states and attention maps of chosen transformer blocks, captured during one ordinary forward pass.

Layer-wise distillation matches the teacher's hidden states ([PKD](https://huggingface.co/papers/1908.09355),
[TinyBERT](https://huggingface.co/papers/1909.10351)) and attention probabilities (TinyBERT,
[MiniLM](https://huggingface.co/papers/2002.10957)) for a few paired layers only. In transformers 5 most models run
SDPA attention, which never materialises the attention probabilities, so `output_attentions=True` returns nothing;
switching a whole model to eager attention would make every layer slow and memory-hungry. Here only the attention
modules of the requested layers are redirected, for the duration of one call, to a function that computes the
probabilities with the eager formula and attends with them (`dropout(P) @ V`, as eager attention does), so each
captured layer computes its attention once and the model's outputs are those of a plain forward (equal within
floating-point rounding; tests/test_features.py checks outputs and gradients against an eager forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from .student import get_layers

# Name under which the capturing attention function is registered in transformers' `AttentionInterface`. Only the
# attention modules being captured ever see it, through a stand-in config (see `_CaptureConfig`).
CAPTURE_ATTN_IMPLEMENTATION = "hf_distill_capture"

# Families whose attention modules dispatch through `ALL_ATTENTION_FUNCTIONS` with
# `config._attn_implementation`: model_type -> path, inside one transformer block, of that attention module.
DISPATCHING_ATTENTION_PATHS: dict[str, str] = {
    "bert": "attention.self",
    "roberta": "attention.self",
    "xlm-roberta": "attention.self",
    "distilbert": "attention",
    "gpt2": "attn",
    "llama": "self_attn",
    "qwen2": "self_attn",
    "qwen3": "self_attn",
    "mistral": "self_attn",
}

# Families that compute attention inline instead: MPNet adds its relative position bias itself and only has eager
# attention. model_type -> path of the dropout applied to the probabilities, whose input is the pre-dropout softmax.
INLINE_ATTENTION_DROPOUT_PATHS: dict[str, str] = {
    "mpnet": "attention.attn.dropout",
}

ATTENTION_MODEL_TYPES: list[str] = sorted({*DISPATCHING_ATTENTION_PATHS, *INLINE_ATTENTION_DROPOUT_PATHS})

# The captured probabilities are recomputed from the very query/key/mask tensors the configured implementation
# receives; these are the implementations whose masks (None, or a 4D boolean/additive mask) we know how to read.
_READABLE_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class Features:
    """What one forward pass of a model produced, plus the features captured on the way.

    Args:
        outputs (`Any`):
            The model's usual `ModelOutput` (logits, loss when labels were passed, ...), unchanged by the capture.
        hidden_states (`dict[int, torch.Tensor]`):
            Block index `i` (0-based) -> `(batch, seq_len, hidden)` output of transformer block `i`, before any
            final norm. This equals HF's `output_hidden_states` entry `i + 1`, except for the last block of GPT-2,
            Llama, Qwen2, Qwen3 and Mistral, where HF's last entry has the final norm applied.
        embeddings (`torch.Tensor | None`):
            `(batch, seq_len, hidden)` input of the first transformer block (HF's `hidden_states[0]`), or `None`
            when not requested.
        attentions (`dict[int, torch.Tensor]`):
            Block index `i` -> `(batch, num_heads, seq_len, seq_len)` float32 post-softmax, pre-dropout attention
            probabilities, one map per query head. Rows of padding queries are meaningless; mask them out.
    """

    outputs: Any
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


class _CaptureConfig:
    """Stands in for the config of one attention module while it is being captured.

    Attention modules pick their implementation with `self.config._attn_implementation`, and the config object is
    shared by every layer and by the mask-building code. Giving only the captured modules this stand-in makes them
    call `_capture_attention` while every other layer, and the masks, keep the configured implementation. Every other
    attribute reads through to the real config.
    """

    _attn_implementation = CAPTURE_ATTN_IMPLEMENTATION

    def __init__(self, config: Any, store: Callable[[torch.Tensor], None]):
        self._config = config
        self.store = store

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set above. Reading `_config` from `__dict__` avoids endless recursion when an
        # instance is half-built (copy, pickle).
        try:
            config = self.__dict__["_config"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(config, name)


# Arguments some attention functions take that change the scores (T5-style position bias, Gemma-2 soft-capping,
# attention sinks). No family in DISPATCHING_ATTENTION_PATHS passes them; were one to, its maps and outputs would be
# wrong, so the capture refuses them.
_UNSUPPORTED_ATTENTION_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")


def _capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The function registered as `CAPTURE_ATTN_IMPLEMENTATION`: store the probabilities, then attend with them."""
    unsupported = [name for name in _UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(
            f"{type(module).__name__} passes {unsupported} to its attention function, which attention capture does "
            "not implement. Set attention_weight=0 to distil hidden states and logits only."
        )
    # Same rule as transformers' `sdpa_attention_forward`: an explicit `is_causal` wins over the module's flag.
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    probabilities = attention_probabilities(
        query, key, attention_mask, scaling=kwargs.get("scaling"), is_causal=is_causal
    )
    module.config.store(probabilities)
    # One softmax serves both the maps and the layer's output: running SDPA again for the output would compute the
    # attention twice. Gradients of the output and of a loss on the maps meet in the same probabilities.
    return attend(probabilities, value, attention_mask, dropout=kwargs.get("dropout", 0.0), training=module.training)


def attend(
    probabilities: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output `dropout(P) @ V` from pre-dropout probabilities, laid out as attention functions return it.

    Eager attention's formula, applied to `attention_probabilities`' result: the probabilities are cast to the values'
    dtype (as Llama's eager attention does after its float32 softmax), dropped out with `p=dropout` when `training`
    (the same `nn.functional.dropout` call, so the same random mask as eager attention and CPU SDPA given the same RNG
    state), and multiplied by the values. A boolean (SDPA) mask that leaves a query row nothing to attend to (a
    padding query of a left-padded decoder) gives that row zeros, as SDPA does; eager attention's additive mask gives
    it the mean of the values instead, and so does this function with such a mask. Either way the row is padding.

    Args:
        probabilities (`torch.Tensor`): `(batch, num_heads, q_len, kv_len)` post-softmax probabilities.
        value (`torch.Tensor`): `(batch, num_key_value_heads, kv_len, head_dim)`; with grouped-query attention each
            value head serves `num_heads // num_key_value_heads` consecutive query heads, as in `repeat_kv`.
        attention_mask (`torch.Tensor | None`): the mask the attention function received (see
            `attention_probabilities`).
        dropout (`float`): dropout probability on the probabilities.
        training (`bool`): whether dropout is applied (the attention module's `training` flag).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the `(batch, q_len, num_heads, head_dim)` output, and the post-dropout
        weights `(batch, num_heads, q_len, kv_len)` that produced it (what eager attention returns).
    """
    weights = probabilities.to(value.dtype)
    if dropout > 0 and training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    if value.shape[1] != weights.shape[1]:
        value = value.repeat_interleave(weights.shape[1] // value.shape[1], dim=1)
    output = torch.matmul(weights, value)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        attends = attention_mask[..., : value.shape[-2]].any(-1, keepdim=True)
        output = torch.where(attends, output, 0.0)
    return output.transpose(1, 2).contiguous(), weights


AttentionInterface.register(CAPTURE_ATTN_IMPLEMENTATION, _capture_attention)


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Eager attention probabilities `softmax(Q K^T * scaling + mask)`, in float32, before dropout.

    Args:
        query (`torch.Tensor`): `(batch, num_heads, q_len, head_dim)`, rotary embeddings already applied.
        key (`torch.Tensor`): `(batch, num_key_value_heads, kv_len, head_dim)`; with grouped-query attention each
            key head serves `num_heads // num_key_value_heads` consecutive query heads, as in `repeat_kv`.
        attention_mask (`torch.Tensor | None`): the mask the attention function received: `None` (no padding), a
            boolean mask broadcastable to `(batch, num_heads, q_len, kv_len)` that is `True` where attending is
            allowed (SDPA), or an additive float mask of that shape (eager).
        scaling (`float | None`): factor applied to the scores; `head_dim ** -0.5` when `None`.
        is_causal (`bool`): with no mask, whether queries may only attend to earlier positions. This mirrors SDPA,
            which is asked for a causal kernel instead of a mask when a decoder batch has no padding.

    Returns:
        `torch.Tensor`: `(batch, num_heads, q_len, kv_len)` float32 probabilities.
    """
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
        raise ValueError(
            f"Cannot read an attention mask of type {type(attention_mask).__name__}"
            f"{f' with shape {tuple(attention_mask.shape)}' if isinstance(attention_mask, torch.Tensor) else ''}; "
            f"attention capture supports the {_READABLE_ATTN_IMPLEMENTATIONS} attention implementations."
        )
    query, key = query.float(), key.float()
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # Scaling the (q_len, head_dim) queries costs less than scaling the (q_len, kv_len) scores once sequences are
    # longer than a head; the result differs from eager's order by rounding only.
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    q_len, kv_len = scores.shape[-2:]
    # Masked scores get the dtype's minimum rather than -inf, as in eager attention, so that fully masked (padding)
    # rows stay finite instead of turning into NaN that would poison the backward pass. `where` makes one pass over
    # the scores where `masked_fill` copies them first.
    masked_value = torch.finfo(scores.dtype).min
    if attention_mask is None:
        # SDPA only uses its causal kernel for more than one query, with the mask aligned to the top left.
        if is_causal and q_len > 1:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril()
            scores = torch.where(allowed, scores, masked_value)
    elif attention_mask.dtype == torch.bool:
        scores = torch.where(attention_mask[..., :kv_len], scores, masked_value)
    else:
        scores = scores + attention_mask[..., :kv_len].float()
    return scores.softmax(dim=-1)


def _submodule(block: nn.Module, path: str) -> nn.Module:
    module = block
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _check_layers(kind: str, layers: Iterable[int], num_layers: int) -> list[int]:
    layers = sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"{kind} {bad} out of range: the model has {num_layers} transformer blocks, so valid indices are "
            f"0..{num_layers - 1}."
        )
    return layers


def _unsupported_attention(model_type: str) -> ValueError:
    return ValueError(
        f"Attention maps cannot be captured for model_type {model_type!r}; supported model types are "
        f"{ATTENTION_MODEL_TYPES}. Set attention_weight=0 to distil hidden states and logits only."
    )


def _check_attn_implementation(model: PreTrainedModel) -> None:
    implementation = model.config._attn_implementation
    if implementation not in _READABLE_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Attention maps can be captured from models running {_READABLE_ATTN_IMPLEMENTATIONS} attention, but "
            f"this {model.config.model_type} model runs {implementation!r}. Load it with attn_implementation='sdpa'."
        )


def _block_output(output: Any) -> torch.Tensor:
    # Some blocks return a tensor, others a tuple whose first element is the hidden state.
    return output[0] if isinstance(output, tuple) else output


def forward_with_features(
    model: nn.Module,
    inputs: dict,
    *,
    hidden_layers: Iterable[int] = (),
    attention_layers: Iterable[int] = (),
    embeddings: bool = False,
) -> Features:
    """Run `model(**inputs)` once and capture the hidden states and attention maps of the requested blocks.

    Only the requested layers are touched: their block outputs are read by forward hooks, and the attention modules
    of `attention_layers` are pointed, for this call only, at a function that computes the eager probabilities and
    attends with them (`attend`), so those layers compute their attention once. Every other layer runs its configured
    implementation (SDPA by default) and the model's outputs are those of a plain forward, within rounding. Hooks and
    attention implementations are restored when the call returns or raises. Works with or without grad: the teacher
    under `torch.no_grad()`/`torch.inference_mode()`, the student with grad, in which case gradients of a loss on the
    maps flow to the student's query/key projections.

    Args:
        model (`nn.Module`):
            A model of a family `hf_distill.student.get_layers` knows, possibly wrapped (DDP, accelerate). The
            wrapper is what gets called, so gradient synchronisation still happens; modules are found on the
            unwrapped model.
        inputs (`dict`):
            Keyword arguments of the forward (`input_ids`, `attention_mask`, `labels`, ...).
        hidden_layers (`Iterable[int]`):
            0-based indices of the blocks whose outputs to return (see `Features.hidden_states`).
        attention_layers (`Iterable[int]`):
            0-based indices of the blocks whose attention probabilities to return (see `Features.attentions`).
            Supported for the model types in `ATTENTION_MODEL_TYPES` running eager or SDPA attention.
        embeddings (`bool`):
            Whether to return the input of the first block (see `Features.embeddings`).

    Returns:
        `Features`: the model outputs and the captured tensors, keyed by block index.

    Raises:
        `ValueError`: for a block index out of range, or attention maps asked of an unsupported model type or
            attention implementation.
    """
    unwrapped = extract_model_from_parallel(model, keep_torch_compile=False)
    model_type = unwrapped.config.model_type
    attention_layers = list(attention_layers)
    if attention_layers:
        if model_type not in ATTENTION_MODEL_TYPES:
            raise _unsupported_attention(model_type)
        if model_type in DISPATCHING_ATTENTION_PATHS:
            _check_attn_implementation(unwrapped)
    layers = get_layers(unwrapped)
    hidden_layers = _check_layers("hidden_layers", hidden_layers, len(layers))
    attention_layers = _check_layers("attention_layers", attention_layers, len(layers))

    features = Features(outputs=None)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    swapped: list[tuple[nn.Module, Any]] = []
    checkpointed: list[nn.Module] = []

    def store_hidden(index: int, module: nn.Module, args: tuple, output: Any) -> None:
        features.hidden_states[index] = _block_output(output)

    def store_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> None:
        features.embeddings = args[0] if args else kwargs["hidden_states"]

    def store_attention(index: int, probabilities: torch.Tensor) -> None:
        features.attentions[index] = probabilities

    def store_dropout_input(index: int, module: nn.Module, args: tuple) -> None:
        store_attention(index, args[0].float())

    try:
        for i in hidden_layers:
            handles.append(layers[i].register_forward_hook(partial(store_hidden, i)))
        if embeddings:
            handles.append(layers[0].register_forward_pre_hook(store_embeddings, with_kwargs=True))
        for i in attention_layers:
            if getattr(layers[i], "gradient_checkpointing", False):
                # A checkpointed block is re-run during backward, after the capture is undone; the recomputation
                # would then save different tensors than the forward did and autograd refuses it. The few captured
                # blocks keep their activations instead; every other block stays checkpointed.
                checkpointed.append(layers[i])
                layers[i].gradient_checkpointing = False
            if model_type in INLINE_ATTENTION_DROPOUT_PATHS:
                dropout = _submodule(layers[i], INLINE_ATTENTION_DROPOUT_PATHS[model_type])
                handles.append(dropout.register_forward_pre_hook(partial(store_dropout_input, i)))
                continue
            attention = _submodule(layers[i], DISPATCHING_ATTENTION_PATHS[model_type])
            swapped.append((attention, attention.config))
            attention.config = _CaptureConfig(attention.config, partial(store_attention, i))
        features.outputs = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        for attention, config in swapped:
            attention.config = config
        for block in checkpointed:
            block.gradient_checkpointing = True

    missing = [i for i in attention_layers if i not in features.attentions]
    if missing:
        raise RuntimeError(
            f"The forward pass never ran the attention of layers {missing} ({type(unwrapped).__name__}); "
            "hf_distill's attention capture does not match this model's code."
        )
    return features


def check_attention_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise a `ValueError` if the student's attention maps cannot be matched one-to-one to the teacher's.

    Attention-map losses compare `(batch, heads, seq, seq)` tensors head by head, so both models need the same number
    of (query) heads and a model type whose maps `forward_with_features` can capture. Sequence lengths always agree
    because teacher and student share the tokenizer.

    Args:
        teacher (`nn.Module`): the teacher model, possibly wrapped.
        student (`nn.Module`): the student model, possibly wrapped.

    Raises:
        `ValueError`: naming both head counts and the ways out, or naming an unsupported model type.
    """
    teacher = extract_model_from_parallel(teacher, keep_torch_compile=False)
    student = extract_model_from_parallel(student, keep_torch_compile=False)
    for model in (teacher, student):
        if model.config.model_type not in ATTENTION_MODEL_TYPES:
            raise _unsupported_attention(model.config.model_type)
    teacher_heads = teacher.config.num_attention_heads
    student_heads = student.config.num_attention_heads
    if teacher_heads != student_heads:
        raise ValueError(
            f"Attention matching compares maps head by head, but the teacher has {teacher_heads} attention heads and "
            f"the student has {student_heads}. Either set attention_weight=0 (hidden-state matching still works "
            f"across widths), build the student with num_attention_heads={teacher_heads} (make_student keeps it), "
            "or use MiniLM-style relation matching."
        )
