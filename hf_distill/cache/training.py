"""Training from a teacher cache: collate the cached rows with the data, and read them back as teacher features."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..features import Features as ModelFeatures
from .collators import check_rows_in_place
from .spec import (
    ATTENTION,
    ATTENTION_COLUMN,
    CACHE_PREFIX,
    EMBEDDINGS_COLUMN,
    HIDDEN_COLUMN,
    LOGITS_COLUMN,
    ROW,
    TOKEN,
    TOPK_INDICES_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    TOPK_TAIL_COLUMN,
    TOPK_VALUES_COLUMN,
    row_positions,
)


@dataclass
class SparseTeacherLogits:
    """The teacher's distribution at each position of a batch as its top-k plus one tail bucket, read from a cache
    built with `TeacherCacheSpec(top_k=k, top_k_tail=True, temperature=T)`; the inputs of
    `hf_distill.losses.sparse.sparse_kl_loss`.

    Padded positions hold zeros (not a distribution): mask them, as every loss does.

    Args:
        ids: `(..., k)` int32 token / class ids of the teacher's k most likely entries.
        logprobs: `(..., k)` float32 teacher log-probabilities at those ids, at the cache's temperature.
        tail_logprob: `(...)` float32 log of the teacher's mass outside them, `log(1 - Σ exp(logprobs))`.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor


class TeacherCacheCollator:
    """Wraps a collator: the data columns go through it, the `teacher_cache_*` columns are padded here.

    Rows without cache columns (an evaluation set) are passed through untouched. Cached tensors are placed where the
    wrapped collator put the row's tokens (`padding_side`) and padded with zeros, which every loss masks; a batch
    whose rows' tokens are not there (the collator's padding side changed since the build) is refused.

    Args:
        collator: the wrapped collator (e.g. `DataCollatorWithPadding`).
        layouts: column -> `(layout, width)`, `TeacherCache.layouts`.
        padding_side: where `collator` pads, `"right"` or `"left"` (`TeacherCache.padding_side`).
    """

    def __init__(self, collator, layouts: dict[str, tuple[str, int]], padding_side: str = "right"):
        self.collator = collator
        self.layouts = dict(layouts)
        self.padding_side = padding_side

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or not any(name in features[0] for name in self.layouts):
            return self.collator(features)
        rows = [{k: v for k, v in f.items() if k not in self.layouts} for f in features]
        row_ids = [row["input_ids"] for row in rows]
        lengths = [len(ids) for ids in row_ids]
        batch = self.collator(rows)
        # The cache was built assuming this layout; a collator changed since (e.g. its padding side) is refused.
        check_rows_in_place(batch, row_ids, self.padding_side, self.collator)
        padded = batch["input_ids"].shape[1]
        for name, (layout, width) in self.layouts.items():
            values = [torch.as_tensor(f[name]) for f in features]
            batch[name] = pad_cached_rows(values, layout, width, lengths, padded, self.padding_side)
        return batch


def pad_cached_rows(
    values: list[torch.Tensor], layout: str, width: int, lengths: list[int], padded: int, padding_side: str = "right"
) -> torch.Tensor:
    """Stack flat per-row cached tensors into a batch, zero-padded to `padded` positions.

    Shapes: `"row"` -> `(B, width)`; `"token"` -> `(B, padded, width)`; `"attention"` -> `(B, width, padded, padded)`.
    """
    if layout == ROW:
        return torch.stack(values)
    dtype = values[0].dtype
    if layout == TOKEN:
        out = torch.zeros(len(values), padded, width, dtype=dtype)
        for b, (row, n) in enumerate(zip(values, lengths)):
            out[b, row_positions(n, padded, padding_side)] = row.view(n, width)
        return out
    if layout == ATTENTION:
        out = torch.zeros(len(values), width, padded, padded, dtype=dtype)
        for b, (row, n) in enumerate(zip(values, lengths)):
            s = row_positions(n, padded, padding_side)
            out[b, :, s, s] = row.view(width, n, n)
        return out
    raise ValueError(f"unknown cached layout {layout!r}; expected {ROW!r}, {TOKEN!r} or {ATTENTION!r}.")


def densify_top_k(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Teacher logits over all `num_classes` from its top-k: the k values at their ids, `-inf` everywhere else.

    `softmax(densify_top_k(...) / T)` is the teacher's top-k distribution renormalised at temperature T, so any
    logit loss defined on a restricted support (forward KL, JSD) can be applied unchanged.

    Args:
        indices: `(..., k)` integer class ids.
        values: `(..., k)` logits at those ids.
        num_classes: size C of the class / vocabulary dim.

    Returns:
        `(..., C)` float32 logits.
    """
    dense = torch.full((*values.shape[:-1], num_classes), float("-inf"), dtype=torch.float32, device=values.device)
    return dense.scatter_(-1, indices.long(), values.float())


def has_cached_teacher(inputs: dict[str, Any]) -> bool:
    """Whether a batch carries teacher outputs from a cache."""
    return any(key.startswith(CACHE_PREFIX) for key in inputs)


def cached_teacher_features(
    inputs: dict[str, Any],
    *,
    num_classes: int,
    logits: bool = True,
    hidden_layers: list[int] | tuple[int, ...] = (),
    attention_layers: list[int] | tuple[int, ...] = (),
    embeddings: bool = False,
) -> ModelFeatures:
    """The teacher's `Features` for a batch, read from its `teacher_cache_*` columns instead of a forward pass.

    Args:
        inputs: a collated batch with cache columns (from `TeacherCacheCollator`).
        num_classes: size of the student's class / vocabulary dim (to densify top-k logits).
        logits, hidden_layers, attention_layers, embeddings: what the losses need; a missing column raises.

    Returns:
        `Features` whose `outputs.logits` are the cached (or densified top-k) logits; for a sparse cache
        (`top_k_tail=True`) `outputs.logits` is None and `outputs.sparse_logits` is a `SparseTeacherLogits` (nothing
        of the vocabulary's size is made).
    """
    wanted = [HIDDEN_COLUMN.format(i) for i in hidden_layers] + [ATTENTION_COLUMN.format(i) for i in attention_layers]
    wanted += [EMBEDDINGS_COLUMN] if embeddings else []
    missing = [c for c in wanted if c not in inputs]
    if logits and not any(c in inputs for c in (LOGITS_COLUMN, TOPK_VALUES_COLUMN, TOPK_LOGPROBS_COLUMN)):
        missing.append(LOGITS_COLUMN)
    if missing:
        present = sorted(k for k in inputs if k.startswith(CACHE_PREFIX))
        raise ValueError(
            f"the batch's teacher cache has no {missing} (it has {present}): it was built for other layers or "
            "terms. Rebuild it for this configuration."
        )
    teacher_logits = sparse = None
    if logits:
        if TOPK_LOGPROBS_COLUMN in inputs:
            tail = inputs[TOPK_TAIL_COLUMN]
            sparse = SparseTeacherLogits(inputs[TOPK_INDICES_COLUMN], inputs[TOPK_LOGPROBS_COLUMN], tail.squeeze(-1))
        elif TOPK_VALUES_COLUMN in inputs:
            teacher_logits = densify_top_k(inputs[TOPK_INDICES_COLUMN], inputs[TOPK_VALUES_COLUMN], num_classes)
        else:
            teacher_logits = inputs[LOGITS_COLUMN]
    return ModelFeatures(
        outputs=SimpleNamespace(logits=teacher_logits, sparse_logits=sparse),
        hidden_states={i: inputs[HIDDEN_COLUMN.format(i)] for i in hidden_layers},
        embeddings=inputs[EMBEDDINGS_COLUMN] if embeddings else None,
        attentions={i: inputs[ATTENTION_COLUMN.format(i)] for i in attention_layers},
    )
