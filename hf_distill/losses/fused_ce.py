"""Causal-LM cross-entropy from the last hidden states and the LM head, without materialising the logits.

The task term of a causal-LM student is ``cross_entropy(lm_head(hidden), labels)``; computed that way it holds the
``(tokens x vocabulary)`` logits, their fp32 copy and its log-softmax until the backward pass, which is what
:func:`~hf_distill.losses.chunked.fused_linear_distill_loss` avoids for the distillation term. Here the same is done
for the cross-entropy: per chunk of labelled positions, the chunk's logits, its loss and its gradient with respect to
those logits are computed at once (``softmax - one_hot``, the closed form), turned into the gradients of the hidden
rows, the LM-head weight and the bias, and freed before the next chunk (Liger-Kernel's fused linear cross-entropy,
``liger_kernel/ops/fused_linear_cross_entropy.py``, does the same). The backward pass only scales the stored
gradients by the incoming gradient. Double backward is not supported.
"""

import torch
import torch.nn.functional as F

from hf_distill.losses.chunked import _chunks, _scaled, _take

__all__ = ["fused_linear_cross_entropy"]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, flat_labels, rows, n_rows, chunk_size, denominator, track_grad):
        need_hidden, need_weight, need_bias = (track_grad and needed for needed in ctx.needs_input_grad[:3])
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(flat_h) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
        total = flat_h.new_zeros((), dtype=torch.promote_types(flat_h.dtype, torch.float32))
        for selector in _chunks(rows, n_rows, chunk_size):
            h = _take(flat_h, selector)
            targets = _take(flat_labels, selector).unsqueeze(1)
            # The logits in the model's dtype (as its lm_head computes them), then fp32 as `task_loss` takes them.
            log_p = F.log_softmax(F.linear(h, weight, bias).to(total.dtype), dim=-1)
            total = total - log_p.gather(1, targets).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(-log p_y) / d logits = softmax - one_hot(y), then / denominator: computed in place in log_p.
            grad_logits = log_p.exp_().scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=log_p.dtype))
            grad_logits.div_(denominator)
            if need_hidden:
                grad_hidden[selector] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t().to(accumulate), h.to(accumulate))
            if need_bias:
                grad_bias.add_(grad_logits.sum(0, dtype=accumulate))
            del grad_logits, log_p
        ctx.save_for_backward(
            grad_hidden.view_as(hidden) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
        )
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple(_scaled(g, grad_output) for g in ctx.saved_tensors)
        return *grads, *(None,) * 6


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``cross_entropy(F.linear(hidden, weight, bias), labels)`` summed over labelled positions and divided by their
    number (or ``num_items_in_batch``), without materialising the ``(tokens x vocabulary)`` logits.

    Equal, loss and gradients, up to floating-point summation order, to
    ``F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(), ignore_index=...,
    reduction="sum") / denominator`` (the reduction of :func:`hf_distill.losses.task.task_loss`). Only labelled
    positions are read, ``chunk_size`` at a time; peak extra memory is about two ``(chunk_size x V)`` fp32 tensors
    plus one gradient of each of ``hidden``, ``weight`` and ``bias``. For a causal LM pass the shifted tensors:
    ``hidden[:, :-1]`` against ``labels[:, 1:]``.

    Args:
        hidden: ``(..., H)`` the last hidden states (the LM head's input).
        weight: ``(V, H)`` the LM-head weight (``lm_head.weight``; tied embeddings are fine).
        labels: ``(...)`` integer token ids in ``[0, V)``, ``ignore_index`` where nothing is predicted.
        bias: ``(V,)`` the LM-head bias, if it has one.
        chunk_size: labelled positions per chunk.
        num_items_in_batch: if given, the denominator (the labelled positions of the whole gradient-accumulation
            window) instead of this call's number of labelled positions. 0 is read as 1 (the sum is then 0).
        ignore_index: the label of positions that do not count.

    Returns:
        fp32 scalar (fp64 for fp64 inputs); an exact, graph-connected 0 when no label counts.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int, got {chunk_size!r}. Use e.g. 1024 (positions per chunk)."
        )
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has hidden size {hidden.shape[-1]} but weight has shape {tuple(weight.shape)}; the LM-head "
            "weight must be (vocab_size, hidden_size). Pass the model's lm_head.weight and its last hidden states."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)} but the vocabulary has {weight.shape[0]} entries. Pass the model's "
            "lm_head.bias (shape (vocab_size,)) or None."
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer token ids of shape {tuple(hidden.shape[:-1])} (the hidden states' leading "
            f"shape), got {labels.dtype} of shape {tuple(labels.shape)}. For a causal LM pass hidden[:, :-1] and "
            "labels[:, 1:]."
        )
    flat_labels = labels.reshape(-1).to(hidden.device)
    rows = flat_labels.ne(ignore_index).nonzero().squeeze(1)
    n_rows = rows.numel()
    denominator = n_rows if num_items_in_batch is None else num_items_in_batch
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    if torch.is_tensor(denominator):
        denominator = denominator.to(device=hidden.device, dtype=dtype).clamp(min=1.0)
    else:
        denominator = max(denominator, 1)
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, flat_labels, rows, n_rows, chunk_size, denominator, torch.is_grad_enabled()
    )
