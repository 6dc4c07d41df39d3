"""The relation term of `DistillationTrainer`: RKD or similarity-preserving KD on pooled hidden states.

`relation_weight > 0` adds `RELATION_LOSSES[relation_loss]` (`hf_distill.losses.relations`: RKD distance / angle,
Park et al. 2019, https://arxiv.org/abs/1904.05068; similarity-preserving KD, Tung & Mori 2019,
https://arxiv.org/abs/1907.09682) between the student's and the teacher's representations of the batch's samples:
the output hidden states of one student block and one teacher block (`relation_layer`, default the last of each),
pooled over the sequence (`relation_pooling`: the first real token, `cls`, or the mean over real tokens, `mean`,
both read from the attention mask so padding never enters). The relations are B x B whatever the widths, so no
projection is needed.

Normalisation under gradient accumulation. A relation over a micro-batch's B rows does not split into per-row items,
so the term cannot be "a sum over items divided by the window's items" as the other terms are. Each micro-batch's
value (a mean over its pairs / triplets) is weighted by its share of the window's rows:
`term = loss(micro-batch) * rows(micro-batch) / rows(window)`, so the window's term is the row-weighted mean of its
micro-batches' values (the plain mean when they are of equal size). The logged `loss_relation` is that same
row-weighted mean over the logging window. Note that accumulating k micro-batches of B rows is not the same
objective as one batch of k x B rows: the relations are taken within each micro-batch (per process under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from .losses.relations import RELATION_LOSSES
from .student import num_layers
from .tasks import is_causal_lm

if TYPE_CHECKING:  # config.py imports this module for its checks
    from .config import DistillationConfig, LayerMatch

__all__ = [
    "RELATION_POOLINGS",
    "RelationTerm",
    "build_relation_term",
    "check_relation_args",
    "pool_hidden",
    "relation_layers",
    "relation_term",
]

RELATION_POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class RelationTerm:
    """What the relation term compares: `loss` between the `pooling`-pooled outputs of `teacher_layer` (0-based
    teacher block) and `student_layer` (0-based student block)."""

    loss: str
    pooling: str
    teacher_layer: int
    student_layer: int


def relation_layers(term: RelationTerm | None) -> tuple[set[int], set[int]]:
    """The (student, teacher) blocks whose hidden states the term needs; empty sets without a term."""
    if term is None:
        return set(), set()
    return {term.student_layer}, {term.teacher_layer}


def layer_pair(value: str, field: str = "relation_layer") -> tuple[int, int]:
    """The one `teacher->student` pair of a single-pair field (`relation_layer`, `minilm_layer`), or a ValueError
    naming `field`."""
    from .config import parse_layer_mapping  # here: config.py imports this module

    try:
        pairs = parse_layer_mapping(value)
    except ValueError:
        pairs = None
    if not isinstance(pairs, list) or len(pairs) != 1:
        raise ValueError(
            f"{field} must be one 'teacher->student' pair such as '11->5' (or None: the last block of each), "
            f"got {value!r}."
        )
    return pairs[0]


def check_relation_args(args: DistillationConfig) -> None:
    """`DistillationConfig`'s checks of the relation fields (the layers are checked against the models later)."""
    if args.relation_loss not in RELATION_LOSSES:
        raise ValueError(f"relation_loss must be one of {sorted(RELATION_LOSSES)}, got {args.relation_loss!r}.")
    if args.relation_pooling not in RELATION_POOLINGS:
        raise ValueError(
            f"relation_pooling must be one of {RELATION_POOLINGS}, got {args.relation_pooling!r}. Use 'mean' (the "
            "mean over real tokens) or 'cls' (the first token)."
        )
    if args.relation_layer is not None:
        layer_pair(args.relation_layer)


def resolve_layer(index: int, depth: int, model: str, value: str | None, field: str = "relation_layer") -> int:
    """`index` of a `field` pair (negative: from the end) as a block of a `model` of `depth` blocks."""
    resolved = index + depth if index < 0 else index
    if not 0 <= resolved < depth:
        raise ValueError(
            f"{field}={value!r} names {model} layer {index}, outside the {model}'s layers 0..{depth - 1} (or "
            f"-{depth}..-1 from the end). Use e.g. '-1->-1' for the last layer of each, or leave it None."
        )
    return resolved


def build_relation_term(
    args: DistillationConfig, teacher: PreTrainedModel, student: PreTrainedModel, layer_matches: list[LayerMatch]
) -> RelationTerm | None:
    """The trainer's `RelationTerm` (None when `args.relation_weight == 0`), checked against both models and the
    teacher cache.

    Raises:
        ValueError: a layer outside a model, `cls` pooling of a causal LM, or a teacher cache without the teacher
            layer's hidden states.
    """
    if args.relation_weight == 0:
        return None
    teacher_layer, student_layer = -1, -1
    if args.relation_layer is not None:
        teacher_layer, student_layer = layer_pair(args.relation_layer)
    teacher_layer = resolve_layer(teacher_layer, num_layers(teacher), "teacher", args.relation_layer)
    student_layer = resolve_layer(student_layer, num_layers(student), "student", args.relation_layer)
    if args.relation_pooling == "cls" and (is_causal_lm(student) or is_causal_lm(teacher)):
        raise ValueError(
            "relation_pooling='cls' takes each sequence's first token, which in a causal LM has seen only itself. "
            "Set relation_pooling='mean' (the mean over real tokens)."
        )
    return RelationTerm(args.relation_loss, args.relation_pooling, teacher_layer, student_layer)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """`(B, L, H)` hidden states -> `(B, H)` fp32 representations.

    Args:
        hidden: one block's output hidden states.
        mask: `(B, L)` attention mask (1/True = real token), or None (every position is real).
        pooling: `"cls"`, the first real token of each row (position 0 with right padding; the first unmasked one
            with left padding), or `"mean"`, the mean over real tokens (a row without any gives zeros).
    """
    hidden = hidden.float()
    if mask is None:
        return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)
    real = mask.to(device=hidden.device, dtype=torch.bool)
    if pooling == "cls":
        first = real.int().argmax(dim=1)  # the first True of each row (0 for a row without any)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    weights = real.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def relation_term(
    term: RelationTerm,
    student_hidden: dict[int, torch.Tensor],
    teacher_hidden: dict[int, torch.Tensor],
    mask: torch.Tensor | None,
    num_rows_in_window: torch.Tensor | None,
) -> torch.Tensor:
    """The micro-batch's relation loss, weighted by its rows over `num_rows_in_window` when given (see the module
    docstring), else unweighted.

    Args:
        term: from `build_relation_term`.
        student_hidden, teacher_hidden: block index -> `(B, L, H)` hidden states (`Features.hidden_states`).
        mask: `(B, L)` attention mask, or None.
        num_rows_in_window: rows of the whole gradient-accumulation window (summed over processes when the counts
            are), or None.
    """
    student = pool_hidden(student_hidden[term.student_layer], mask, term.pooling)
    teacher = pool_hidden(teacher_hidden[term.teacher_layer], mask, term.pooling)
    value = RELATION_LOSSES[term.loss](student, teacher)
    if num_rows_in_window is None:
        return value
    return value * student.shape[0] / num_rows_in_window.clamp(min=1)
