"""What kind of task a model solves, and which positions the distillation terms score.

The trainer computes every loss itself from the logits, so it must know, for each student:
- whether labels are shifted (causal LMs: the logits at position i predict token i + 1), decided from the model
  class under any PEFT wrapper (a `PeftModelForCausalLM` is a causal LM because the model inside it is one);
- for sequence classifiers, the problem type, as transformers decides it in its `*ForSequenceClassification` heads
  (`config.problem_type`, else: `num_labels == 1` -> regression; float labels -> multi-label; integer labels ->
  single-label);
- for token-level students (causal LM, masked LM, token classification), the positions the logit term scores:
  `distill_on="labels"` keeps the positions whose label counts (with the causal shift), `"all_tokens"` keeps every
  real token of the attention mask.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

REGRESSION = "regression"
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
PROBLEM_TYPES = (REGRESSION, SINGLE_LABEL, MULTI_LABEL)
PEFT_TASK_TYPES = "'CAUSAL_LM', 'SEQ_CLS' or 'TOKEN_CLS'"


def _names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


_CAUSAL_LM_CLASSES = _names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
_SEQUENCE_CLASSIFICATION_CLASSES = _names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
_BASE_MODEL_CLASSES = _names(MODEL_MAPPING_NAMES)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT wrapper (`PeftModel` or one of its task subclasses)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def check_peft_task(model: nn.Module, role: str) -> None:
    """Refuse a bare `PeftModel` (made without `task_type`): its forward takes `*args, **kwargs` only.

    The trainer passes each model the inputs its forward names, and decides label shifting and the problem type from
    the task; a bare `PeftModel` states neither.
    """
    if is_peft_model(model) and type(model).__name__ == "PeftModel":
        inner = type(unwrap_peft(model)).__name__
        raise ValueError(
            f"the {role} is a bare PeftModel (its LoraConfig/PeftConfig has task_type=None) around {inner}: without "
            "a task, PEFT gives it no forward signature and no task semantics, so hf-distill cannot tell which inputs "
            f"to pass nor whether labels are shifted. Build it with a task, e.g. get_peft_model(model, "
            f"LoraConfig(task_type='CAUSAL_LM', ...)) (task_type one of {PEFT_TASK_TYPES})."
        )


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model (under any PEFT wrapper) is a causal LM, whose labels are shifted by one position."""
    return type(unwrap_peft(model)).__name__ in _CAUSAL_LM_CLASSES


def is_headless(model: nn.Module) -> bool:
    """Whether the model (under any PEFT wrapper) is a bare transformer without a task head (no logits)."""
    name = type(unwrap_peft(model)).__name__
    if name in _CAUSAL_LM_CLASSES or name in _SEQUENCE_CLASSIFICATION_CLASSES:
        return False  # e.g. GPT2LMHeadModel, whose name ends in "Model"
    return name in _BASE_MODEL_CLASSES or (name.endswith("Model") and not name.endswith("HeadModel"))


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether the model (under any PEFT wrapper) has one output row per sequence (`(B, num_labels)` logits)."""
    name = type(unwrap_peft(model)).__name__
    return name in _SEQUENCE_CLASSIFICATION_CLASSES or name.endswith("ForSequenceClassification")


def _labels_are_float(dataset) -> bool | None:
    """Whether the `labels` (or `label`) column of a `datasets.Dataset` holds floats; None when unknown."""
    features = getattr(dataset, "features", None)
    if not features:
        return None
    for column in ("labels", "label"):
        if column in features:
            feature = features[column]
            while hasattr(feature, "feature"):  # Sequence / List of values
                feature = feature.feature
            dtype = getattr(feature, "dtype", None)
            return None if dtype is None else str(dtype).startswith("float")
    return None


def resolve_problem_type(student: nn.Module, teacher: nn.Module, dataset=None) -> str | None:
    """The problem type of a sequence-classification pair, as transformers decides it; None if it needs the labels.

    Args:
        student: the student model.
        teacher: the teacher model.
        dataset: the training dataset, whose `labels` column dtype decides between single- and multi-label when
            neither config sets `problem_type` and `num_labels > 1`.

    Returns:
        One of `PROBLEM_TYPES`, or None when it can only be told from the labels of a batch (see
        `problem_type_of_labels`).
    """
    student_type = getattr(unwrap_peft(student).config, "problem_type", None)
    teacher_type = getattr(unwrap_peft(teacher).config, "problem_type", None)
    for role, value in (("student", student_type), ("teacher", teacher_type)):
        if value is not None and value not in PROBLEM_TYPES:
            raise ValueError(
                f"the {role}'s config.problem_type is {value!r}, not one of {PROBLEM_TYPES}. Set it to one of them "
                "or to None (then it is inferred as transformers does)."
            )
    if student_type and teacher_type and student_type != teacher_type:
        raise ValueError(
            f"problem_type differs: teacher {teacher_type!r}, student {student_type!r}. Distillation compares the "
            f"two heads output by output: set the student's config.problem_type = {teacher_type!r}."
        )
    if student_type or teacher_type:
        return student_type or teacher_type
    if unwrap_peft(student).config.num_labels == 1:
        return REGRESSION
    is_float = _labels_are_float(dataset)
    if is_float is None:
        return None
    return MULTI_LABEL if is_float else SINGLE_LABEL


def problem_type_of_labels(labels: torch.Tensor, num_labels: int) -> str:
    """transformers' inference from a batch: one output -> regression; float labels -> multi-label; else single."""
    if num_labels == 1:
        return REGRESSION
    return MULTI_LABEL if labels.is_floating_point() else SINGLE_LABEL


def distill_positions(
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    distill_on: str,
    shift_labels: bool,
) -> torch.Tensor | None:
    """`(B, L)` bool mask of the positions a token-level logit term scores (None: every position).

    Args:
        labels: `(B, L)` integer labels with `-100` where nothing is predicted, or None (unlabelled batch).
        attention_mask: `(B, L)` 0/1 mask of real tokens, or None.
        distill_on: `"labels"`: positions whose label counts, where the batch has integer token labels (for a causal
            LM, position i counts where `labels[i + 1] != -100`: the logits at i predict token i + 1, so the last
            position never counts); otherwise, and for `"all_tokens"`, the attention mask.
        shift_labels: whether the model is a causal LM.

    Returns:
        The positions, exactly those the task loss scores under `distill_on="labels"`.
    """
    if (
        distill_on == "labels"
        and labels is not None
        and labels.dim() >= 2
        and not labels.is_floating_point()
        and (attention_mask is None or labels.shape == attention_mask.shape)
    ):
        if not shift_labels:
            return labels != -100
        positions = torch.zeros_like(labels, dtype=torch.bool)
        positions[..., :-1] = labels[..., 1:] != -100
        return positions
    return attention_mask.bool() if attention_mask is not None else None
