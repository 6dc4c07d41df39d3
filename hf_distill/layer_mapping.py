"""Layer pairings: named strategies -> validated `LayerMatch` lists, and the learned width projections."""

from __future__ import annotations

import torch
from torch import nn

from .config import LayerMatch, parse_layer_mapping
from .student import default_student_layers


def resolve_layer_pairs(mapping: str, num_teacher_layers: int, num_student_layers: int) -> list[tuple[int, int]]:
    """Turn a `layer_mapping` value into `(teacher_layer, student_layer)` pairs checked against both depths.

    Args:
        mapping: `"uniform"`, `"alternate"`, `"last"` or explicit pairs `"1->0,3->1"`.
        num_teacher_layers: N, the teacher's number of transformer blocks.
        num_student_layers: n, the student's.
    """
    if num_student_layers > num_teacher_layers and mapping in ("uniform", "alternate"):
        raise ValueError(
            f"the student has {num_student_layers} layers but the teacher only {num_teacher_layers}: a student "
            f"cannot be deeper than its teacher for layer_mapping={mapping!r}. Use a shallower student or "
            "explicit pairs like '0->0,1->2'."
        )
    parsed = parse_layer_mapping(mapping)
    if parsed == "uniform":
        # TinyBERT's g(m) = m * N / n with 1-based indices: student block m learns from the teacher block that
        # ends its span of N / n teacher blocks.
        pairs = [((m + 1) * num_teacher_layers // num_student_layers - 1, m) for m in range(num_student_layers)]
    elif parsed == "alternate":
        pairs = list(zip(default_student_layers(num_teacher_layers, num_student_layers), range(num_student_layers)))
    elif parsed == "last":
        pairs = [(num_teacher_layers - 1, num_student_layers - 1)]
    else:
        pairs = parsed
    for t, s in pairs:
        if not 0 <= t < num_teacher_layers:
            raise ValueError(
                f"layer_mapping pairs teacher layer {t}, outside the teacher's layers 0..{num_teacher_layers - 1}. "
                "Fix the teacher->student pairs."
            )
        if not 0 <= s < num_student_layers:
            raise ValueError(
                f"layer_mapping pairs student layer {s}, outside the student's layers 0..{num_student_layers - 1}. "
                "Fix the teacher->student pairs."
            )
    return pairs


def build_layer_matches(
    mapping: str,
    num_teacher_layers: int,
    num_student_layers: int,
    *,
    hidden_loss: str | None = None,
    attention_loss: str | None = None,
) -> list[LayerMatch]:
    """`LayerMatch` records for every pair of `mapping`, one per feature switched on (loss name given)."""
    pairs = resolve_layer_pairs(mapping, num_teacher_layers, num_student_layers)
    matches = []
    for feature, loss in (("hidden", hidden_loss), ("attention", attention_loss)):
        if loss is not None:
            matches += [LayerMatch(t, s, feature, loss) for t, s in pairs]
    return matches


def hidden_size(config) -> int:
    """Width of a model's hidden states (GPT-2 calls it n_embd, DistilBERT dim)."""
    for name in ("hidden_size", "n_embd", "dim", "d_model"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise ValueError(
        f"cannot find the hidden size of {type(config).__name__}; expected one of hidden_size/n_embd/dim."
    )


def build_projections(
    matches: list[LayerMatch], student_width: int, teacher_width: int, *, embeddings: bool
) -> nn.ModuleDict:
    """One `nn.Linear(student_width, teacher_width)` per hidden-state pairing (and the embeddings), when widths differ.

    TinyBERT (https://arxiv.org/abs/1909.10351) learns such a W_h; we keep one per pairing so each student layer can
    map into its own teacher layer's space. They belong to the trainer, never to the saved student.
    """
    projections = nn.ModuleDict()
    if student_width == teacher_width:
        return projections
    keys = [m.key for m in matches if m.feature == "hidden"] + (["embeddings"] if embeddings else [])
    for key in keys:
        layer = nn.Linear(student_width, teacher_width)
        # Start near a padded identity so the first steps compare the student's own features with the teacher's.
        with torch.no_grad():
            nn.init.normal_(layer.weight, std=0.02)
            n = min(student_width, teacher_width)
            layer.weight[:n, :n] += torch.eye(n)
            layer.bias.zero_()
        projections[key] = layer
    return projections
