"""Checks `DistillationTrainer` runs on the models, tokenizers and data before any training step.

Each raises a `ValueError` that names the field, the bad value and the fix, so a wrong pairing fails in seconds
instead of after a silently wrong run.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .config import DistillationConfig
from .losses import KD_LOGIT_LOSSES, MULTI_LABEL_LOGIT_LOSSES
from .tasks import MULTI_LABEL, REGRESSION, check_peft_task, is_headless, unwrap_peft

logger = logging.get_logger(__name__)

SAMPLE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "a gorgeous, witty, seductive movie", "not good"]
# Logit losses defined on a softmax over the outputs: over one regression output they are identically 0.
# Every logit divergence but MSE compares softmaxes: identically 0 over one regression output.
SOFTMAX_LOGIT_LOSSES = tuple(name for name in KD_LOGIT_LOSSES if name != "mse")


def forward_arg_names(model: nn.Module) -> set[str]:
    """Names a model's forward accepts (the inputs worth passing to it)."""
    return set(inspect.signature(model.forward).parameters)


def preflight_models(teacher: PreTrainedModel, student: PreTrainedModel, args: DistillationConfig) -> None:
    """Checks that need only the two models, before any data is touched."""
    check_peft_task(teacher, "teacher")
    check_peft_task(student, "student")
    t_vocab, s_vocab = getattr(teacher.config, "vocab_size", None), getattr(student.config, "vocab_size", None)
    if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
        raise ValueError(
            f"vocab_size differs: teacher {t_vocab}, student {s_vocab}. Teacher and student read the same token ids, "
            "so they must share a tokenizer: build the student with make_student(teacher) or pick a student of the "
            "teacher's family."
        )
    # Class names of the models under any PEFT wrapper: a PeftModelForCausalLM is judged by the LM inside it.
    t_head, s_head = type(unwrap_peft(teacher)).__name__, type(unwrap_peft(student)).__name__
    for suffix in ("ForSequenceClassification", "ForTokenClassification"):
        if (
            t_head.endswith(suffix)
            and s_head.endswith(suffix)
            and teacher.config.num_labels != student.config.num_labels
        ):
            raise ValueError(
                f"num_labels differs: teacher {teacher.config.num_labels}, student {student.config.num_labels}. "
                "Logit distillation compares the two heads class by class: give the student "
                f"num_labels={teacher.config.num_labels} (make_student copies the teacher's head)."
            )
    if args.task_weight > 0 and is_headless(student):
        raise ValueError(
            f"task_weight={args.task_weight} needs a student with a head, got {s_head}: a bare body has no task "
            "loss. Set task_weight=0 (feature terms only: general distillation), or load a task model."
        )
    if args.logits_weight > 0 and (is_headless(teacher) or is_headless(student)):
        raise ValueError(
            f"logits_weight={args.logits_weight} needs models with a head, got teacher {t_head} and student {s_head}. "
            "Load task models (e.g. AutoModelForSequenceClassification) or set logits_weight=0."
        )


def preflight_problem_type(problem_type: str | None, args: DistillationConfig) -> None:
    """The logit loss must be defined for the head: no softmax divergence over one regression output, per-class
    multi-label, and no top-k (or top-k + tail) teacher of a head without a softmax."""
    if problem_type in (REGRESSION, MULTI_LABEL) and args.teacher_cache_top_k_tail:
        raise ValueError(
            f"teacher_cache_top_k_tail=True distils the top-k + tail of the teacher's softmax, which a "
            f"{problem_type} head does not have (every output is its own value). Set teacher_cache_top_k_tail=False."
        )
    if args.logits_weight == 0 or problem_type is None:
        return
    if problem_type == REGRESSION and args.logits_loss in SOFTMAX_LOGIT_LOSSES:
        raise ValueError(
            f"logits_loss={args.logits_loss!r} with a regression head (problem_type='regression', e.g. num_labels=1): "
            "a softmax over one output is always 1, so this term would be identically 0 and teach nothing. Set "
            "logits_loss='mse' (MSE between the student's and the teacher's outputs) or logits_weight=0."
        )
    if problem_type == MULTI_LABEL and args.logits_loss not in MULTI_LABEL_LOGIT_LOSSES:
        raise ValueError(
            f"logits_loss={args.logits_loss!r} with a multi-label head (problem_type='multi_label_classification'): "
            "its classes are independent yes/no decisions, not one softmax. Set logits_loss='kl' (per-class sigmoid "
            "KL, binary_kl_div_loss) or 'mse'."
        )
    if problem_type in (REGRESSION, MULTI_LABEL) and args.use_teacher_cache and args.teacher_cache_top_k is not None:
        raise ValueError(
            f"teacher_cache_top_k={args.teacher_cache_top_k} keeps the teacher's largest logits of a softmax, which "
            f"a {problem_type} head does not have (every output matters on its own). Set teacher_cache_top_k=None."
        )


def preflight_segment_ids(dataset, tokenizer, teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """`token_type_ids` must reach the models that use segment ids, and are dropped (with a warning) for the others."""
    columns = getattr(dataset, "column_names", None)
    if not columns or "input_ids" not in columns:
        return
    users = [
        (role, m)
        for role, m in (("teacher", teacher), ("student", student))
        if "token_type_ids" in forward_arg_names(m) and getattr(m.config, "type_vocab_size", 1) > 1
    ]
    if "token_type_ids" not in columns:
        makes_segments = tokenizer is not None and "token_type_ids" in tokenizer("a", "b")
        if users and makes_segments:
            role, m = users[0]
            raise ValueError(
                f"train_dataset has no token_type_ids column, but the {role} ({m.config.model_type}) reads "
                "segment ids "
                "and the tokenizer produces them. Keep the token_type_ids column the tokenizer returns (do not drop "
                "it in map), so text pairs keep their segments."
            )
        return
    segmented = any(any(t != 0 for t in row) for row in dataset[: min(len(dataset), 64)]["token_type_ids"])
    for role, m in (("teacher", teacher), ("student", student)):
        if segmented and "token_type_ids" not in forward_arg_names(m):
            logger.warning(
                f"the data has token_type_ids (text pairs) but the {role} ({m.config.model_type}) takes none: it "
                "sees the pair without segment ids, as DistilBERT does."
            )


def preflight_tokenizers(student_tok, teacher_tok) -> None:
    """A separately loaded teacher tokenizer must split sample texts into the student's very ids."""
    if student_tok is None or teacher_tok is None or student_tok is teacher_tok:
        return
    for text in SAMPLE_TEXTS:
        s_ids, t_ids = student_tok(text)["input_ids"], teacher_tok(text)["input_ids"]
        if s_ids != t_ids:
            raise ValueError(
                f"teacher_processing_class and processing_class tokenize {text!r} differently ({t_ids} vs {s_ids}). "
                "Teacher and student must share one tokenizer: pass the teacher's tokenizer as processing_class."
            )
