"""Distillation losses: pure functions of tensors, looked up by name in four plain dicts.

- ``LOGIT_LOSSES``: ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_items_in_batch=None)``
- ``HIDDEN_LOSSES``: ``fn(student_hidden, teacher_hidden, mask=None, *, num_items_in_batch=None)``
- ``ATTENTION_LOSSES``: ``fn(student_attn, teacher_attn, mask=None, *, num_items_in_batch=None)``
- ``MULTI_LABEL_LOGIT_LOSSES``: the logit losses of multi-label heads (per-class sigmoid), signature of
  ``LOGIT_LOSSES``

Each returns an fp32 scalar: the sum of per-position values over counted positions, divided by the number of counted
positions or by ``num_items_in_batch`` when given.
"""

from hf_distill.losses.attention import attention_kl_loss, attention_mse_loss
from hf_distill.losses.hidden import hidden_cosine_loss, hidden_mse_loss
from hf_distill.losses.logits import (
    binary_kl_div_loss,
    jsd_loss,
    kl_div_loss,
    logits_mse_loss,
    reverse_kl_div_loss,
)

LOGIT_LOSSES = {"kl": kl_div_loss, "reverse_kl": reverse_kl_div_loss, "jsd": jsd_loss, "mse": logits_mse_loss}
HIDDEN_LOSSES = {"mse": hidden_mse_loss, "cosine": hidden_cosine_loss}
ATTENTION_LOSSES = {"mse": attention_mse_loss, "kl": attention_kl_loss}
# Multi-label heads: each class is its own yes/no decision, so `kl` is the per-class sigmoid KL (same signature).
MULTI_LABEL_LOGIT_LOSSES = {"kl": binary_kl_div_loss, "mse": logits_mse_loss}

__all__ = [
    "ATTENTION_LOSSES",
    "HIDDEN_LOSSES",
    "LOGIT_LOSSES",
    "MULTI_LABEL_LOGIT_LOSSES",
    "attention_kl_loss",
    "attention_mse_loss",
    "binary_kl_div_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "jsd_loss",
    "kl_div_loss",
    "logits_mse_loss",
    "reverse_kl_div_loss",
]
