"""MiniLM / MiniLMv2 self-attention relation losses: the student imitates how the teacher's tokens relate.

MiniLM (Wang et al. 2020, https://arxiv.org/abs/2002.10957) transfers, from one teacher layer to one student layer,
the attention distributions `softmax(Q K^T / sqrt(d_k))` and the value relation `softmax(V V^T / sqrt(d_k))`.
MiniLMv2 (Wang et al. 2021, https://arxiv.org/abs/2012.15828) replaces them by the query-query, key-key and
value-value relations and splits the projections into a chosen number of *relation heads* instead of the models'
attention heads, so teacher and student may differ in width and in head count: each model's `(B, T, H)`
projection is split into `A` heads of `d_r = H / A` (its own `d_r`), and the relations are `(B, A, T, T)` whatever
the widths.

For relation heads `a` and query positions `t`, with `R_a = softmax(X_a Y_a^T / sqrt(d_r))` row by row:

    loss = 1 / (A |t|) * sum_a sum_t KL(R^T_{a,t} || R^S_{a,t})

Shapes and conventions:
    - projections: `(B, T, H)`, the outputs of a layer's query / key / value `Linear` (before any reshape into
      attention heads, rotary embedding or position bias); `H` may differ between teacher and student, but must be
      divisible by `relation_heads` in each.
    - `mask`: `(B, T)` attention mask (1/True = real token) or None. Padded keys get no probability (they are left
      out of each row's softmax) and padded query rows are left out of the mean, so padding never enters the loss.
    - `causal=True` (decoder LMs): query `t` relates only to keys `<= t`, as the models' own attention does.
    - reduction: the sum over real query positions (and relation heads, divided by `A`) divided by the number of
      real query positions, or by `num_items_in_batch` when given (the real tokens of the whole gradient-accumulation
      window, so micro-batch losses add up to the window's mean). No real position: 0, connected to the graph.
    - computed in fp32; the teacher is detached; the result is an fp32 scalar.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MINILM_RELATIONS",
    "attention_relation_loss",
    "relation_log_probs",
    "self_relation_loss",
    "split_relation_heads",
]

# `DistillationConfig.minilm_relations` names -> the (left, right) projections a relation relates: MiniLMv2's
# query-query, key-key and value-value relations, and MiniLM's attention distribution (queries against keys; its
# value relation is `vv`).
MINILM_RELATIONS = {"qq": ("q", "q"), "kk": ("k", "k"), "vv": ("v", "v"), "attention": ("q", "k")}


def split_relation_heads(x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """`(B, T, H)` -> `(B, A, T, H / A)` fp32: the projection split into `A = relation_heads` contiguous slices.

    Raises:
        ValueError: `x` is not 3-d, or `H` is not divisible by `relation_heads`.
    """
    if x.dim() != 3:
        raise ValueError(
            f"relation losses take (batch, seq_len, width) projections, got shape {tuple(x.shape)}. Pass the output "
            "of a query / key / value Linear before it is split into attention heads."
        )
    batch, length, width = x.shape
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
        raise ValueError(f"minilm_relation_heads must be an int >= 1, got {relation_heads!r}. Use e.g. 12.")
    if width % relation_heads:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        raise ValueError(
            f"minilm_relation_heads={relation_heads} must divide the projection width {width}, which splits into "
            f"relation heads of equal size. Use one of its divisors {divisors}."
        )
    return x.float().view(batch, length, relation_heads, width // relation_heads).transpose(1, 2)


def _allowed_keys(mask: torch.Tensor | None, batch: int, length: int, causal: bool, device) -> torch.Tensor | None:
    """`(B, 1, T, T)` bool: key `j` may receive probability from query `i` (or None: every key)."""
    allowed = None
    if mask is not None:
        allowed = mask.to(device=device, dtype=torch.bool)[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        lower = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        allowed = lower if allowed is None else allowed & lower
    return allowed


def relation_log_probs(
    left: torch.Tensor,
    right: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    relation_heads: int,
    causal: bool = False,
) -> torch.Tensor:
    """`log softmax(L_a R_a^T / sqrt(d_r))` per relation head: `(B, T, H)` twice -> `(B, A, T, T)` fp32.

    Keys outside `mask` (and, with `causal`, after the query) get log-probability `finfo.min` (probability 0); a
    query row with no allowed key at all (a padded row) is uniform and meaningless: leave it out.

    Args:
        left: `(B, T, H)` projection giving the queries of the relation (Q for `attention`, X for X-X relations).
        right: `(B, T, H)` projection giving its keys, of `left`'s width (K for `attention`, X for X-X relations).
        mask: `(B, T)` attention mask, or None.
        relation_heads: number of relation heads `A`; `d_r = H / A`.
        causal: whether query `t` relates only to keys `<= t`.
    """
    if left.shape != right.shape:
        raise ValueError(
            f"a relation's two projections must have the same shape, got {tuple(left.shape)} and "
            f"{tuple(right.shape)} (e.g. queries and keys of a grouped-query attention layer). Relate each "
            "projection to itself (qq, kk, vv) instead."
        )
    x = split_relation_heads(left, relation_heads)
    y = split_relation_heads(right, relation_heads)
    scores = x @ y.transpose(-1, -2) / math.sqrt(x.shape[-1])
    allowed = _allowed_keys(mask, left.shape[0], left.shape[1], causal, scores.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.log_softmax(dim=-1)


def _relation_kl(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    batch, heads, length, _ = student_log_probs.shape
    teacher_log_probs = teacher_log_probs.detach()
    pointwise = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)
    allowed = _allowed_keys(mask, batch, length, causal, pointwise.device)
    if allowed is not None:  # masked keys have probability 0 in both: their terms are exactly 0, gradients too
        pointwise = pointwise.masked_fill(~allowed, 0.0)
    per_query = pointwise.sum(dim=-1).sum(dim=1) / heads  # (B, T): KL per query, averaged over relation heads
    if mask is None:
        real = torch.ones(batch, length, dtype=torch.bool, device=per_query.device)
    else:
        real = mask.to(device=per_query.device, dtype=torch.bool)
    total = per_query.masked_fill(~real, 0.0).sum()
    count = real.sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(count):
        return total / count.to(total.device).clamp(min=1)
    return total / max(count, 1)


def self_relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    relation_heads: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """MiniLMv2's Q-Q, K-K or V-V relation transfer (and MiniLM's value relation, `V V^T`).

    `KL(softmax(X_T X_T^T / sqrt(d_r,T)) || softmax(X_S X_S^T / sqrt(d_r,S)))` per relation head and real query
    position, averaged (see the module docstring).

    Args:
        student: `(B, T, Hs)` student projection (its queries, keys or values).
        teacher: `(B, T, Ht)` the teacher's same projection; `Ht` may differ from `Hs`.
        mask: `(B, T)` attention mask, or None.
        relation_heads: number of relation heads `A`, dividing both `Hs` and `Ht`.
        num_items_in_batch: the count of real query positions the sum is divided by (the window's), or None.
        causal: decoder LMs: query `t` relates only to keys `<= t`.

    Returns:
        fp32 scalar.
    """
    _check_pair(student, teacher)
    s = relation_log_probs(student, student, mask, relation_heads=relation_heads, causal=causal)
    with torch.no_grad():
        t = relation_log_probs(teacher, teacher, mask, relation_heads=relation_heads, causal=causal)
    return _relation_kl(s, t, mask, causal, num_items_in_batch)


def attention_relation_loss(
    student_query: torch.Tensor,
    student_key: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_key: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    relation_heads: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """MiniLM's attention-distribution transfer: `KL(softmax(Q_T K_T^T / sqrt(d_r)) || softmax(Q_S K_S^T / ...))`.

    With `relation_heads` equal to a model's attention heads, its relation is the scaled dot-product attention of
    that layer (without any position bias, rotary embedding or attention-mask bias beyond the padding mask).

    Args:
        student_query, student_key: `(B, T, Hs)` student query and key projections (same width).
        teacher_query, teacher_key: `(B, T, Ht)` the teacher's; `Ht` may differ from `Hs`.
        mask, relation_heads, num_items_in_batch, causal: as in `self_relation_loss`.

    Returns:
        fp32 scalar.
    """
    _check_pair(student_query, teacher_query)
    s = relation_log_probs(student_query, student_key, mask, relation_heads=relation_heads, causal=causal)
    with torch.no_grad():
        t = relation_log_probs(teacher_query, teacher_key, mask, relation_heads=relation_heads, causal=causal)
    return _relation_kl(s, t, mask, causal, num_items_in_batch)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student projection {tuple(student.shape)} and teacher projection {tuple(teacher.shape)} differ in "
            "(batch, seq_len): a relation compares the same tokens in both models. Feed both the same batch."
        )
