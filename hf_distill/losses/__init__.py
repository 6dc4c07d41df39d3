"""Distillation losses: pure functions of tensors, looked up by name in plain dicts.

- ``LOGIT_LOSSES``: ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, num_items_in_batch=None)``
- ``KD_LOGIT_LOSSES``: every value of ``DistillationConfig.logits_loss``: ``LOGIT_LOSSES`` plus the LM divergences of
  ``lm.py`` (``generalized_jsd`` takes ``beta=``, ``skew_kl`` / ``skew_reverse_kl`` take ``alpha=``)
- ``LM_LOGIT_LOSSES``: the LM divergences under the names ``fused_linear_distill_loss`` takes; ``FUSED_DIVERGENCES``
  maps ``logits_loss`` names to them
- ``HIDDEN_LOSSES``: ``fn(student_hidden, teacher_hidden, mask=None, *, num_items_in_batch=None)``
- ``ATTENTION_LOSSES``: ``fn(student_attn, teacher_attn, mask=None, *, num_items_in_batch=None)``
- ``MULTI_LABEL_LOGIT_LOSSES``: the logit losses of multi-label heads (per-class sigmoid), signature of
  ``LOGIT_LOSSES``
- ``RELATION_LOSSES``: ``fn(student_pooled, teacher_pooled)`` on ``(B, Ds)`` / ``(B, Dt)`` pooled representations
  (RKD distance / angle, similarity-preserving KD: ``relations.py``), a mean over the batch's relations
- ``MINILM_RELATIONS``: MiniLM / MiniLMv2 relation names -> the (left, right) projections they relate;
  ``attention_relation_loss(student_left, student_right, teacher_left, teacher_right, mask, *, relation_heads, ...)``
  and ``self_relation_loss(student, teacher, mask, *, relation_heads, ...)`` on ``(B, T, H)`` projections
  (``minilm.py``), a mean over relation heads and real query positions
- ``sparse_kl_loss``: the forward KL against a sparse teacher (its top-k log-probabilities plus the tail mass, as
  ``sparse_teacher_distribution`` makes them and a ``top_k_tail`` teacher cache stores them)

Each returns an fp32 scalar: the sum of per-position values over counted positions, divided by the number of counted
positions or by ``num_items_in_batch`` when given.
"""

from hf_distill.losses.attention import attention_kl_loss, attention_mse_loss
from hf_distill.losses.chunked import chunked_logit_loss, fused_linear_distill_loss
from hf_distill.losses.fused_ce import fused_linear_cross_entropy
from hf_distill.losses.hidden import hidden_cosine_loss, hidden_mse_loss
from hf_distill.losses.lm import (
    LM_LOGIT_LOSSES,
    generalized_jsd_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    total_variation_loss,
)
from hf_distill.losses.logits import (
    binary_kl_div_loss,
    jsd_loss,
    kl_div_loss,
    logits_mse_loss,
    reverse_kl_div_loss,
)
from hf_distill.losses.minilm import MINILM_RELATIONS, attention_relation_loss, self_relation_loss
from hf_distill.losses.relations import (
    RELATION_LOSSES,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    similarity_preserving_loss,
)
from hf_distill.losses.sparse import sparse_kl_loss, sparse_teacher_distribution

LOGIT_LOSSES = {"kl": kl_div_loss, "reverse_kl": reverse_kl_div_loss, "jsd": jsd_loss, "mse": logits_mse_loss}
HIDDEN_LOSSES = {"mse": hidden_mse_loss, "cosine": hidden_cosine_loss}
ATTENTION_LOSSES = {"mse": attention_mse_loss, "kl": attention_kl_loss}
# Multi-label heads: each class is its own yes/no decision, so `kl` is the per-class sigmoid KL (same signature).
MULTI_LABEL_LOGIT_LOSSES = {"kl": binary_kl_div_loss, "mse": logits_mse_loss}
# The table `DistillationConfig.logits_loss` picks from (`kl` stays the forward KL, `jsd` the beta = 0.5 JSD).
KD_LOGIT_LOSSES = {
    **LOGIT_LOSSES,
    "generalized_jsd": generalized_jsd_loss,
    "total_variation": total_variation_loss,
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": skew_reverse_kl_loss,
}
# `logits_loss` -> the `fused_linear_distill_loss` divergence that computes it from the LM heads (`jsd` is the
# generalized JSD at beta = 0.5; `mse` compares raw logits and has no fused form).
FUSED_DIVERGENCES = {
    "kl": "forward_kl",
    "reverse_kl": "reverse_kl",
    "jsd": "generalized_jsd",
    "generalized_jsd": "generalized_jsd",
    "total_variation": "total_variation",
    "skew_kl": "skew_kl",
    "skew_reverse_kl": "skew_reverse_kl",
}

__all__ = [
    "ATTENTION_LOSSES",
    "FUSED_DIVERGENCES",
    "HIDDEN_LOSSES",
    "KD_LOGIT_LOSSES",
    "LM_LOGIT_LOSSES",
    "LOGIT_LOSSES",
    "MINILM_RELATIONS",
    "MULTI_LABEL_LOGIT_LOSSES",
    "RELATION_LOSSES",
    "attention_kl_loss",
    "attention_relation_loss",
    "attention_mse_loss",
    "binary_kl_div_loss",
    "chunked_logit_loss",
    "fused_linear_cross_entropy",
    "fused_linear_distill_loss",
    "generalized_jsd_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "jsd_loss",
    "kl_div_loss",
    "logits_mse_loss",
    "reverse_kl_div_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "self_relation_loss",
    "similarity_preserving_loss",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "sparse_kl_loss",
    "sparse_teacher_distribution",
    "total_variation_loss",
]
