"""The logit term of `DistillationTrainer`, and with `fused_lm_head` its causal-LM task term too.

The logit term is `KD_LOGIT_LOSSES[args.logits_loss]` (`MULTI_LABEL_LOGIT_LOSSES` for multi-label heads) called with
the loss's own parameter, if it has one (`args.logits_loss_kwargs`: `beta=jsd_beta`, `alpha=skew_alpha`), in one of
three ways:

- plain: on both models' logits at the scored positions;
- chunked (`logits_chunk_size`, token-level students): the same function through `chunked_logit_loss`, which keeps
  the fp32 intermediates of one chunk of positions alive at a time;
- fused (`fused_lm_head`, causal LMs): from both models' last hidden states and LM heads through
  `fused_linear_distill_loss`, and the task term through `fused_linear_cross_entropy`, so neither model's
  (tokens x vocabulary) logits exist in training.

With `teacher_cache_top_k_tail` the logit term is instead `sparse_kl_loss`, the forward KL against the teacher's
top-k + tail ((k + 1)-bucket) distribution, on the same positions and with the same normalisation: from the cache's
`SparseTeacherLogits` when the teacher is cached, from the live teacher's logits coarsened by
`sparse_teacher_distribution` otherwise (evaluation, `use_teacher_cache=False`), so both train on the same quantity.
It is not chunked: its teacher side is `(tokens, k)`, and the student side costs one masked copy of the logits.

How the fused path gets the last hidden states: both models run their usual forward, the whole model through every
wrapper (DDP's gradient hooks, PEFT, the layer capture of `hf_distill.features`), with `logits_to_keep` an empty
index tensor. transformers' causal LMs slice the last hidden states by it before their LM head, so the head runs on
zero positions (it returns `(B, 0, V)` logits), and a forward hook on the decoder body (`get_decoder()`) keeps that
body's output, the LM head's input. Calling the decoder body directly would give the same hidden states but skip the
wrappers: under DDP the student's gradients would not be synchronised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .cache import SparseTeacherLogits
from .config import DistillationConfig
from .losses import (
    FUSED_DIVERGENCES,
    chunked_logit_loss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
    sparse_kl_loss,
    sparse_teacher_distribution,
)
from .placement import DEEPSPEED_ZERO3, FSDP1, FSDP2
from .preflight import forward_arg_names
from .tasks import is_causal_lm, unwrap_peft

__all__ = [
    "FUSED_CHUNK_SIZE",
    "check_fused_lm_head",
    "check_sparse_temperature",
    "fused_logit_term",
    "fused_task_term",
    "last_hidden_states",
    "lm_head_parameters",
    "logit_term",
    "logits_from_hidden",
    "no_positions",
    "sparse_logit_term",
]

# Positions per chunk of the fused losses when `logits_chunk_size` is None (Liger-Kernel's default).
FUSED_CHUNK_SIZE = 1024
# Config attributes with which transformers' causal LMs change the logits after the LM head's matmul, and the value
# that leaves them unchanged: Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's
# lm_head_multiplier. The fused losses compute `hidden @ W.T + b` and nothing else.
LOGIT_TRANSFORMS = (
    ("final_logit_softcapping", None),
    ("logit_scale", 1),
    ("logits_scaling", 1),
    ("lm_head_multiplier", 1),
)


def logit_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    positions: torch.Tensor | None,
    args: DistillationConfig,
    table: dict,
    num_items_in_batch: torch.Tensor | None,
    teacher_sparse: SparseTeacherLogits | None = None,
) -> torch.Tensor:
    """The logit term on materialised logits: `table[args.logits_loss]`, chunked with `args.logits_chunk_size`;
    `sparse_logit_term` instead with `args.teacher_cache_top_k_tail` or a sparse cached teacher.

    Args:
        student_logits, teacher_logits: `(B, C)` or `(B, L, V)` logits of both models (teacher: None when sparse).
        positions: `(B, L)` bool, the positions scored (see `DistillationConfig.distill_on`), or None (all).
        args: the trainer's config (loss, temperature, the loss's parameter, chunk size).
        table: `KD_LOGIT_LOSSES`, or `MULTI_LABEL_LOGIT_LOSSES` for a multi-label head.
        num_items_in_batch: the scored positions of the whole gradient-accumulation window, or None.
        teacher_sparse: the cached teacher's top-k + tail (`outputs.sparse_logits` of `cached_teacher_features`).
    """
    if teacher_sparse is not None or args.teacher_cache_top_k_tail:
        return sparse_logit_term(student_logits, teacher_logits, teacher_sparse, positions, args, num_items_in_batch)
    loss_fn = table[args.logits_loss]
    options = {"temperature": args.temperature, "num_items_in_batch": num_items_in_batch, **args.logits_loss_kwargs}
    if args.logits_chunk_size is not None:
        return chunked_logit_loss(
            loss_fn, student_logits, teacher_logits, positions, chunk_size=args.logits_chunk_size, **options
        )
    return loss_fn(student_logits, teacher_logits, positions, **options)


def sparse_logit_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_sparse: SparseTeacherLogits | None,
    positions: torch.Tensor | None,
    args: DistillationConfig,
    num_items_in_batch: torch.Tensor | None,
) -> torch.Tensor:
    """`sparse_kl_loss` against the teacher's top-k + tail at `args.temperature`: the cached `teacher_sparse`, or
    the live `teacher_logits` coarsened alike (k = `teacher_cache_top_k`, at most the vocabulary: a k covering it is
    the full KL, as the cache then stores the full logits)."""
    if args.logits_loss != "kl":
        raise ValueError(
            f"the teacher is a top-k + tail distribution (a cache built with top_k_tail=True), on which only the "
            f"forward KL is computed, but logits_loss={args.logits_loss!r}. Set logits_loss='kl', or rebuild the "
            "cache without the tail (teacher_cache_top_k_tail=False)."
        )
    if teacher_sparse is None:
        k = min(args.teacher_cache_top_k, teacher_logits.shape[-1])
        ids, logprobs, tail = sparse_teacher_distribution(teacher_logits, k, temperature=args.temperature)
        teacher_sparse = SparseTeacherLogits(ids, logprobs, tail)
    return sparse_kl_loss(
        student_logits,
        teacher_sparse.ids.to(student_logits.device),
        teacher_sparse.logprobs.to(student_logits.device),
        teacher_sparse.tail_logprob.to(student_logits.device),
        positions,
        temperature=args.temperature,
        num_items_in_batch=num_items_in_batch,
    )


def check_sparse_temperature(cache_temperature: float | None, args: DistillationConfig) -> None:
    """Refuse training on a top-k + tail cache whose log-probabilities were taken at another temperature than
    `args.temperature` (a hyperparameter search or `model_init` run that changed it after the cache was built)."""
    if cache_temperature is not None and float(cache_temperature) != float(args.temperature):
        raise ValueError(
            f"the teacher cache holds top-k + tail log-probabilities taken at temperature={cache_temperature}, but "
            f"this run has temperature={args.temperature}: its logit term would compare the student at one "
            "temperature with the teacher at another. Keep temperature fixed (leave it out of the search space), "
            "build the trainer with the temperature you train at, or set teacher_cache_top_k_tail=False (stored "
            "top-k logits serve every temperature)."
        )


# --------------------------------------------------------------------------------------------------------------------
# Fused with the LM heads
# --------------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / compile wrappers and a PEFT wrapper."""
    return unwrap_peft(extract_model_from_parallel(model, keep_torch_compile=False))


def no_positions(device: torch.device) -> torch.Tensor:
    """`logits_to_keep` of a fused forward: no position, so the LM head runs on none."""
    return torch.zeros(0, dtype=torch.long, device=device)


def lm_head_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(weight, bias)` of the model's LM head (`get_output_embeddings()`), the parameters themselves."""
    head = _unwrap(model).get_output_embeddings()
    return head.weight, head.bias


@contextmanager
def last_hidden_states(model: nn.Module, enabled: bool = True) -> Iterator[dict]:
    """Inside the block, the returned dict's `"hidden"` is the `(B, L, H)` output of the model's decoder body (the LM
    head's input) in the last forward pass; nothing is hooked when not `enabled`."""
    store: dict[str, torch.Tensor] = {}
    if not enabled:
        yield store
        return

    def keep(module: nn.Module, args: tuple, output) -> None:
        store["hidden"] = output if torch.is_tensor(output) else output[0]

    handle = _unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        yield store
    finally:
        handle.remove()


def fused_logit_term(
    student: nn.Module,
    teacher: nn.Module,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    positions: torch.Tensor | None,
    args: DistillationConfig,
    num_items_in_batch: torch.Tensor | None,
) -> torch.Tensor:
    """The logit term from `(B, L, H)` last hidden states and both LM heads; equal to `logit_term` on the logits.

    No shift is needed between the two models (both score position i's next-token distribution); `positions` already
    holds the causal shift (see `hf_distill.tasks.distill_positions`).
    """
    student_weight, student_bias = lm_head_parameters(student)
    teacher_weight, teacher_bias = lm_head_parameters(teacher)
    # `jsd` is the generalized JSD at beta = 0.5, whatever `jsd_beta` says (as in the plain path).
    keywords = {"beta": 0.5} if args.logits_loss == "jsd" else args.logits_loss_kwargs
    return fused_linear_distill_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        positions,
        divergence=FUSED_DIVERGENCES[args.logits_loss],
        temperature=args.temperature,
        chunk_size=args.logits_chunk_size or FUSED_CHUNK_SIZE,
        num_items_in_batch=num_items_in_batch,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        **keywords,
    )


def fused_task_term(
    student: nn.Module,
    student_hidden: torch.Tensor,
    labels: torch.Tensor,
    args: DistillationConfig,
    num_items_in_batch: torch.Tensor | None,
) -> torch.Tensor:
    """The causal-LM task loss (`task_loss(..., shift_labels=True)`) from the last hidden states and the LM head:
    `hidden[:, :-1]` predicts `labels[:, 1:]`."""
    weight, bias = lm_head_parameters(student)
    return fused_linear_cross_entropy(
        student_hidden[:, :-1],
        weight,
        labels[:, 1:].to(student_hidden.device),
        bias=bias,
        chunk_size=args.logits_chunk_size or FUSED_CHUNK_SIZE,
        num_items_in_batch=num_items_in_batch,
    )


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden states (evaluation metrics: the one place fused mode makes them)."""
    return _unwrap(model).get_output_embeddings()(hidden)


def check_fused_lm_head(student: nn.Module, teacher: nn.Module, placement: str) -> None:
    """Refuse, before training, models the fused path would get wrong.

    Both must be causal LMs whose forward takes `logits_to_keep`, with an `nn.Linear` LM head of float weights (not
    quantised, not adapted by PEFT) and logits that are that head applied to the decoder body's output and nothing
    more: no soft-capping or logit scale in the config (`LOGIT_TRANSFORMS`), and, checked on a short input, the
    model's own logits equal to `F.linear(last hidden states, weight, bias)`. The LM-head weights are read outside
    the models' forward, so neither may be sharded (FSDP, DeepSpeed ZeRO-3).
    """
    if placement in (FSDP1, FSDP2, DEEPSPEED_ZERO3):
        engine = "DeepSpeed ZeRO-3" if placement == DEEPSPEED_ZERO3 else "FSDP"
        raise ValueError(
            f"fused_lm_head=True reads both LM-head weights outside the models' forward, but {engine} shards them "
            "there. Use DDP (or DeepSpeed ZeRO-1/2), or fused_lm_head=False (logits_chunk_size then bounds the "
            "logit term's memory)."
        )
    for role, model in (("student", student), ("teacher", teacher)):
        inner = _unwrap(model)
        name = type(inner).__name__
        if not is_causal_lm(model):
            raise ValueError(
                f"fused_lm_head=True computes the terms from a causal LM's last hidden states and LM head, but the "
                f"{role} is a {name}. Use *ForCausalLM models (or PEFT models with task_type='CAUSAL_LM'), or set "
                "fused_lm_head=False."
            )
        if "logits_to_keep" not in forward_arg_names(inner):
            raise ValueError(
                f"fused_lm_head=True runs the {role} with logits_to_keep (so its LM head sees no position), which "
                f"{name}.forward does not take. Use a model whose forward has it (most transformers causal LMs), or "
                "fused_lm_head=False."
            )
        head = inner.get_output_embeddings()
        if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
            got = (
                f"an nn.Linear of {head.weight.dtype} weights" if isinstance(head, nn.Linear) else type(head).__name__
            )
            raise ValueError(
                f"fused_lm_head=True needs the {role}'s LM head to be a plain nn.Linear of float weights, got {got} "
                "(a quantised or PEFT-adapted head computes more than hidden @ W.T + b). Leave lm_head out of the "
                "PEFT target_modules / modules_to_save, or set fused_lm_head=False."
            )
        for config in (inner.config, getattr(inner.config, "text_config", None)):
            for attribute, neutral in LOGIT_TRANSFORMS:
                value = getattr(config, attribute, neutral) if config is not None else neutral
                if value != neutral:
                    raise ValueError(
                        f"fused_lm_head=True computes the logits as lm_head(hidden) only, but the {role} ({name}) "
                        f"has config.{attribute}={value}, which changes its logits after the LM head. Set "
                        "fused_lm_head=False for this model (logits_chunk_size bounds the logit term's memory)."
                    )
        _check_plain_head(inner, role)


def _check_plain_head(model: nn.Module, role: str) -> None:
    """The model's logits on a short input must be `F.linear` of its decoder body's output (any other step between
    the two, whatever the model calls it, would be missed by the fused losses)."""
    weight, bias = lm_head_parameters(model)
    ids = torch.arange(8, device=weight.device)[None] % weight.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), last_hidden_states(model) as store:
            logits = model(input_ids=ids).logits.float()
            expected = F.linear(store["hidden"], weight, bias).float()
    finally:
        model.train(was_training)
    if logits.shape != expected.shape or (logits - expected).abs().max() > 1e-4 * expected.abs().max() + 1e-6:
        raise ValueError(
            f"fused_lm_head=True computes the logits as lm_head(last hidden state), but the {role} "
            f"({type(model).__name__}) computes its logits otherwise (they differ from F.linear of its decoder "
            "output on a test input). Set fused_lm_head=False for this model."
        )
