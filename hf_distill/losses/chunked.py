"""Logit losses with bounded memory: chunked over positions, and fused with the LM heads.

A causal LM's logits are ``(tokens x vocabulary)``: 8 x 1024 tokens over SmolLM2's 49,152-entry vocabulary are 1.6 GB
per fp32 copy, and a divergence keeps several such copies (both models' log-softmaxes, the probabilities, the
log-ratios) alive until the backward pass. Two ways to bound that:

- :func:`chunked_logit_loss` takes materialised logits and runs any logit loss over chunks of counted positions,
  computing each chunk's loss and its gradient with respect to the student logits right away, so the fp32
  intermediates exist for one chunk at a time. The logits themselves (and one gradient of the student logits'
  size) still exist in full.
- :func:`fused_linear_distill_loss` takes the last hidden states and LM-head weights of both models instead and never
  materialises either model's full logits: per chunk of counted positions it computes both chunks' logits, the loss,
  its gradient with respect to the student chunk's logits, and from that the gradients with respect to the student's
  hidden rows, LM-head weight and bias. This is the approach of Liger-Kernel's fused linear distillation losses
  (``liger_kernel/chunked_loss/fused_linear_distillation.py``, ``ops/fused_linear_jsd.py``): gradients are computed
  during the forward pass and the backward pass only scales them by the incoming gradient.

Per chunk, the loss and its gradient come from the closed forms of :mod:`hf_distill.losses.lm_grads` for the six
``LM_LOGIT_LOSSES`` (about half the fp32 intermediates of an autograd pass); any other logit loss given to
:func:`chunked_logit_loss` runs a local autograd pass on the chunk. Both give the loss of the unchunked function
(``loss_fn(student_logits, teacher_logits, mask, ...)``) and its gradients up to floating-point summation order: each
chunk's loss is divided by the same denominator (the number of counted positions of the whole call, or
``num_items_in_batch``) and the chunks' values are added. The teacher is treated as a constant: teacher tensors get
no gradient. Double backward is not supported.
"""

import torch
import torch.nn.functional as F

from hf_distill.losses.lm import LM_LOGIT_LOSSES
from hf_distill.losses.lm_grads import chunk_value_and_grad, softened_log_probs
from hf_distill.losses.logits import _check_mask

__all__ = ["chunked_logit_loss", "fused_linear_distill_loss"]

# Which keyword of its own each fused divergence takes (the rest take none).
_DIVERGENCE_KEYWORDS = {"generalized_jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}
# The loss functions whose chunk gradients are written out in lm_grads.py; any other loss runs a local autograd.
_ANALYTIC_NAMES = {fn: name for name, fn in LM_LOGIT_LOSSES.items()}


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------------


def _check_common(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}. Use e.g. 2.0.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int, got {chunk_size!r}. Use e.g. 1024 (positions per chunk)."
        )


def _check_vocab(student_vocab: int, teacher_vocab: int, what: str) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the student's vocabulary has {student_vocab} entries but the teacher's has {teacher_vocab} ({what}). "
            "Token-level distillation compares the two distributions entry by entry, so both models must use the "
            "same tokenizer; if only the padding of the vocabularies differs, slice both to the shared vocabulary, "
            "e.g. logits[..., :vocab_size] or lm_head.weight[:vocab_size]."
        )


def _counted_rows(mask: torch.Tensor | None, leading_shape: torch.Size, what: str) -> tuple[torch.Tensor | None, int]:
    """Flat indices of the counted positions (None = all of them, taken as slices) and their number."""
    mask = _check_mask(mask, leading_shape, what)
    if mask is None:
        return None, leading_shape.numel()
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return rows, rows.numel()


def _chunks(rows: torch.Tensor | None, n_rows: int, chunk_size: int):
    """Yields one row selector per chunk: a slice when every position counts, else a chunk of the index tensor."""
    for start in range(0, n_rows, chunk_size):
        yield slice(start, start + chunk_size) if rows is None else rows[start : start + chunk_size]


def _take(flat: torch.Tensor, selector: slice | torch.Tensor) -> torch.Tensor:
    return flat[selector] if isinstance(selector, slice) else flat.index_select(0, selector)


def _denominator(n_rows: int, num_items_in_batch: int | torch.Tensor | None) -> int | torch.Tensor:
    """What the unchunked loss divides by; handed to every chunk as its ``num_items_in_batch``."""
    return n_rows if num_items_in_batch is None else num_items_in_batch


def _chunk_loss_and_grad(
    loss_fn, student_chunk: torch.Tensor, teacher_chunk: torch.Tensor, options: dict, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's share of the loss and, if asked, its gradient with respect to the student chunk (local autograd:
    the chunk's graph, and with it its fp32 intermediates, is freed before the next chunk starts)."""
    if not need_grad:
        return loss_fn(student_chunk, teacher_chunk, **options), None
    with torch.enable_grad():
        student_chunk = student_chunk.detach().requires_grad_()
        loss = loss_fn(student_chunk, teacher_chunk.detach(), **options)
        (grad,) = torch.autograd.grad(loss, student_chunk)
    return loss.detach(), grad


def _validate_on_zero_rows(loss_fn, vocab: int, like: torch.Tensor, options: dict) -> None:
    """Runs ``loss_fn`` on ``(0, V)`` logits: it raises its own errors for bad keywords (a ``beta`` out of range, an
    ``alpha`` it does not take) before any chunk is computed, whichever path computes the chunks."""
    empty = like.new_empty((0, vocab))
    loss_fn(empty, empty, **options)


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    # Skipping the multiply when the loss is backpropagated directly (grad_output == 1) saves a full-size copy.
    if grad is None or bool(grad_output == 1):
        return grad
    return grad * grad_output


# --------------------------------------------------------------------------------------------------------------------
# Chunked over materialised logits
# --------------------------------------------------------------------------------------------------------------------


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, n_rows, loss_fn, chunk_size, options, track_grad):
        need_grad = track_grad and ctx.needs_input_grad[0]
        vocab = student_logits.shape[-1]
        flat_s, flat_t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        divergence = _ANALYTIC_NAMES.get(loss_fn)
        if divergence is not None:
            analytic = {k: v for k, v in options.items() if k != "num_items_in_batch"}
            analytic["denominator"] = options["num_items_in_batch"]
        grad = torch.zeros_like(flat_s) if need_grad else None
        total = None
        for selector in _chunks(rows, n_rows, chunk_size):
            if divergence is not None:
                loss, chunk_grad = chunk_value_and_grad(
                    divergence,
                    softened_log_probs(_take(flat_s, selector), options["temperature"]),
                    softened_log_probs(_take(flat_t, selector), options["temperature"]),
                    need_grad=need_grad,
                    **analytic,
                )
            else:
                loss, chunk_grad = _chunk_loss_and_grad(
                    loss_fn, _take(flat_s, selector), _take(flat_t, selector), options, need_grad
                )
            total = loss if total is None else total + loss
            if need_grad:
                grad[selector] = chunk_grad
            del chunk_grad
        if total is None:  # no counted position: a zero, with zero gradients
            total = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
        ctx.save_for_backward(grad.view_as(student_logits) if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_output), None, None, None, None, None, None, None


def chunked_logit_loss(
    loss_fn,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``loss_fn(student_logits, teacher_logits, mask, ...)`` computed over chunks of counted positions.

    The counted positions (all of them, or where ``mask`` is True) are taken ``chunk_size`` at a time from the
    flattened ``(N, V)`` logits; for each chunk the loss (divided by the whole call's denominator) and its gradient
    with respect to that chunk of student logits are computed at once, so the fp32 softmax intermediates of one chunk
    exist at a time. The gradient is written into a buffer shaped like ``student_logits`` (zeros at uncounted
    positions) that the backward pass returns, scaled by the incoming gradient. Uncounted positions are never read.

    Args:
        loss_fn: a logit loss with the package's signature, e.g. one of ``LM_LOGIT_LOSSES`` or ``LOGIT_LOSSES``. It
            must sum per-position values and divide by ``num_items_in_batch`` (all of them do).
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, same shape; treated as a constant (no gradient).
        mask: ``(...)`` bool (or 0/1) tensor, True where the position counts; None = every position counts.
        chunk_size: positions per chunk.
        temperature: softmax temperature T > 0, passed to ``loss_fn``.
        num_items_in_batch: if given, the denominator instead of this call's number of counted positions.
        **kwargs: the loss's own keywords (``beta=``, ``alpha=``).

    Returns:
        The scalar ``loss_fn`` would return on the whole tensors, equal up to floating-point summation order.
    """
    _check_common(temperature, chunk_size)
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], "the logits' last dimensions")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits have shape "
            f"{tuple(teacher_logits.shape)}. Pass the logits of the same positions for both models."
        )
    rows, n_rows = _counted_rows(mask, student_logits.shape[:-1], "logits")
    options = {"temperature": temperature, "num_items_in_batch": _denominator(n_rows, num_items_in_batch), **kwargs}
    _validate_on_zero_rows(loss_fn, student_logits.shape[-1], student_logits, options)
    return _ChunkedLogitLoss.apply(
        student_logits, teacher_logits, rows, n_rows, loss_fn, chunk_size, options, torch.is_grad_enabled()
    )


# --------------------------------------------------------------------------------------------------------------------
# Fused with both LM heads
# --------------------------------------------------------------------------------------------------------------------


class _FusedLinearDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        rows,
        n_rows,
        divergence,
        chunk_size,
        options,
        track_grad,
    ):
        need_hidden, need_weight, need_bias = (track_grad and needed for needed in ctx.needs_input_grad[:3])
        need_logits_grad = need_hidden or need_weight or need_bias
        flat_s = student_hidden.reshape(-1, student_hidden.shape[-1])
        flat_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        # Weight and bias gradients are sums over every chunk: accumulated in at least fp32, cast back at the end.
        accumulate = torch.promote_types(student_weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(flat_s) if need_hidden else None
        grad_weight = torch.zeros_like(student_weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(student_bias, dtype=accumulate) if need_bias else None
        total = None
        for selector in _chunks(rows, n_rows, chunk_size):
            hidden = _take(flat_s, selector)
            # Each model's chunk of logits is a temporary, freed as soon as its log-softmax exists.
            temperature = options["temperature"]
            loss, grad_logits = chunk_value_and_grad(
                divergence,
                softened_log_probs(F.linear(hidden, student_weight, student_bias), temperature),
                softened_log_probs(F.linear(_take(flat_t, selector), teacher_weight, teacher_bias), temperature),
                need_grad=need_logits_grad,
                **options,
            )
            total = loss if total is None else total + loss
            if grad_hidden is not None:
                grad_hidden[selector] = grad_logits.to(student_weight.dtype) @ student_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(accumulate), hidden.to(accumulate))
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0, dtype=accumulate))
            del grad_logits
        if total is None:  # no counted position: a zero, with zero gradients
            total = flat_s.new_zeros((), dtype=torch.promote_types(flat_s.dtype, torch.float32))
        ctx.save_for_backward(
            grad_hidden.view_as(student_hidden) if grad_hidden is not None else None,
            grad_weight.to(student_weight.dtype) if grad_weight is not None else None,
            grad_bias.to(student_bias.dtype) if grad_bias is not None else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = tuple(_scaled(g, grad_output) for g in (grad_hidden, grad_weight, grad_bias))
        return *grads, *(None,) * 9


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float | None = None,
    alpha: float | None = None,
) -> torch.Tensor:
    """A token-level divergence between two LMs' next-token distributions, from their last hidden states and LM heads,
    without materialising either model's full ``(tokens x vocabulary)`` logits.

    Equal to ``LM_LOGIT_LOSSES[divergence](F.linear(student_hidden, student_weight, student_bias),
    F.linear(teacher_hidden, teacher_weight, teacher_bias), mask, temperature=..., num_items_in_batch=..., ...)``
    and to its gradients up to floating-point summation order. Per chunk of ``chunk_size`` counted positions, both
    chunks' logits, the chunk's loss and its gradient ``G`` with respect to the student chunk's logits are computed
    (closed forms, :mod:`hf_distill.losses.lm_grads`); the student's hidden rows get ``G @ W_s``, the weight
    accumulates ``G.T @ h_s`` and the bias ``G.sum(0)``. Peak extra memory is about five ``(chunk_size x V)`` fp32
    tensors plus one gradient of each of ``student_hidden``, ``student_weight`` and ``student_bias``.

    Args:
        student_hidden: ``(..., H_s)`` the student's last hidden states (e.g. ``(B, L, H_s)``, already shifted).
        student_weight: ``(V, H_s)`` the student's LM-head weight (``lm_head.weight``; tied embeddings are fine).
        teacher_hidden: ``(..., H_t)`` the teacher's last hidden states at the same positions; no gradient.
        teacher_weight: ``(V, H_t)`` the teacher's LM-head weight, the same vocabulary ``V``; no gradient.
        mask: ``(...)`` bool (or 0/1) tensor, True where the position counts (e.g. ``labels != -100``); None = all.
        divergence: a key of ``LM_LOGIT_LOSSES``: ``forward_kl``, ``reverse_kl``, ``generalized_jsd``,
            ``total_variation``, ``skew_kl`` or ``skew_reverse_kl``.
        temperature: softmax temperature T > 0.
        chunk_size: positions per chunk (Liger's default is 1024; smaller bounds memory further, at some speed).
        num_items_in_batch: if given, the denominator instead of this call's number of counted positions.
        student_bias: ``(V,)`` the student's LM-head bias, if it has one.
        teacher_bias: ``(V,)`` the teacher's LM-head bias, if it has one.
        beta: ``generalized_jsd`` only: the teacher weight (default 0.5, see ``generalized_jsd_loss``).
        alpha: ``skew_kl`` / ``skew_reverse_kl`` only: the skew (default 0.1).

    Returns:
        fp32 scalar: sum over counted positions / (number of counted positions or ``num_items_in_batch``).
    """
    if divergence not in LM_LOGIT_LOSSES:
        raise ValueError(f"divergence must be one of {sorted(LM_LOGIT_LOSSES)}, got {divergence!r}.")
    _check_common(temperature, chunk_size)
    options = {"temperature": temperature}
    for name, value in (("beta", beta), ("alpha", alpha)):
        if value is None:
            continue
        if _DIVERGENCE_KEYWORDS.get(divergence) != name:
            takers = sorted(d for d, keyword in _DIVERGENCE_KEYWORDS.items() if keyword == name)
            raise ValueError(
                f"{name}={value} was given but divergence={divergence!r} takes no {name}. Drop it, or use one of "
                f"{takers}."
            )
        options[name] = value
    _check_vocab(student_weight.shape[0], teacher_weight.shape[0], "rows of student_weight and teacher_weight")
    for who, hidden, weight, bias in (
        ("student", student_hidden, student_weight, student_bias),
        ("teacher", teacher_hidden, teacher_weight, teacher_bias),
    ):
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{who}_hidden has hidden size {hidden.shape[-1]} but {who}_weight has shape {tuple(weight.shape)}; "
                f"the LM-head weight must be (vocab_size, hidden_size). Pass the {who}'s lm_head.weight and its last "
                "hidden states."
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{who}_bias has shape {tuple(bias.shape)} but the vocabulary has {weight.shape[0]} entries. Pass the "
                f"{who}'s lm_head.bias (shape (vocab_size,)) or None."
            )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden has leading shape {tuple(student_hidden.shape[:-1])} but teacher_hidden has "
            f"{tuple(teacher_hidden.shape[:-1])}. Pass both models' hidden states for the same positions."
        )
    rows, n_rows = _counted_rows(mask, student_hidden.shape[:-1], "hidden states")
    _validate_on_zero_rows(LM_LOGIT_LOSSES[divergence], student_weight.shape[0], student_hidden, options)
    options["denominator"] = _denominator(n_rows, num_items_in_batch)
    return _FusedLinearDistillLoss.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        rows,
        n_rows,
        divergence,
        chunk_size,
        options,
        torch.is_grad_enabled(),
    )
