"""Loading teachers and students for the scripts: Hub ids or local directories, with errors that name the field.

Every load reads safetensors weights only (`use_safetensors=True`: a pickled `pytorch_model.bin` can run code when
unpickled) and runs modeling code shipped with a checkpoint only when `ModelArguments.trust_remote_code` asks for it.
"""

from __future__ import annotations

import logging
import os

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto import modeling_auto

from .arguments import ModelArguments
from .peft_setup import apply_lora, head_modules
from .peft_teacher import merge_teacher_adapter, read_teacher_adapter
from .recipes import looks_local
from .student import make_student

logger = logging.getLogger(__name__)

# The Auto class of each task head, with the class names it maps to: a given student is loaded with the Auto class of
# the teacher's head, from the student's own config (a DistilBERT student of a BERT teacher is a DistilBERT model).
HEAD_AUTO_CLASSES = (
    (AutoModelForSequenceClassification, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    (AutoModelForTokenClassification, modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    (AutoModelForQuestionAnswering, modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
    (AutoModelForCausalLM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (AutoModelForMaskedLM, modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
)
CLASSIFICATION_AUTO_CLASSES = (AutoModelForSequenceClassification, AutoModelForTokenClassification)

# Model types whose position ids start after the padding index (RoBERTa's `create_position_ids_from_input_ids`), so
# `pad_token_id + 1` of their `max_position_embeddings` are never reachable by a token.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "xmod", "longformer")


def _check_exists(name_or_path: str | None, field: str) -> str:
    if not name_or_path:
        raise ValueError(f"{field} is required: a Hub id or a local directory with config.json.")
    if looks_local(name_or_path) and not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"{field}={name_or_path!r} does not exist. Pass a local directory made by save_pretrained or a Hub id "
            "such as 'bert-base-uncased'."
        )
    return name_or_path


def _load_config(path: str, field: str, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"{field}={path!r} could not be loaded ({e}). Pass a local directory made by save_pretrained, or a Hub id "
            "reachable from this machine."
        ) from e


def _head_keys(model: PreTrainedModel) -> set[str]:
    """Names of the parameters outside the base model (the task head), e.g. `classifier.weight`."""
    prefix = model.base_model_prefix + "."
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix)}


def _from_pretrained(auto_cls, path: str, field: str, model_type: str, model_args: ModelArguments, **kwargs):
    """`auto_cls.from_pretrained` from safetensors only; size mismatches are reported back instead of raised."""
    try:
        return auto_cls.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **kwargs,
        )
    except OSError as e:
        if "safetensors" not in str(e) and ".safetensors" not in str(e):
            raise FileNotFoundError(f"{field}={path!r} could not be loaded ({e}).") from e
        raise FileNotFoundError(
            f"{field}={path!r} has no safetensors weights, and hf-distill loads safetensors only (a pickled "
            "pytorch_model.bin can run arbitrary code when loaded). Convert it once with "
            "`AutoModel...from_pretrained(path).save_pretrained(path)` (safetensors by default), from a source you "
            "trust."
        ) from e
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ValueError(
            f"{field}={path!r} is a {model_type!r} model, which has no "
            f"{auto_cls.__name__.removeprefix('AutoModelFor')} head in transformers ({e}). Use a model family "
            "that has one."
        ) from e


def _refuse_mismatched(info: dict, field: str, path: str, what: str, fix: str) -> None:
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shapes = ", ".join(f"{key} {tuple(old)} in the checkpoint vs {tuple(new)}" for key, old, new in mismatched)
        raise ValueError(f"{field}={path!r}: {what} ({shapes}). {fix}")


def load_teacher(model_args: ModelArguments, num_labels: int | None = None):
    """The teacher as a sequence classifier (its trained head is kept) and its tokenizer.

    Args:
        model_args: `teacher_model_name_or_path`, `tokenizer_name_or_path`, `trust_remote_code`.
        num_labels: number of classes of the task data. A teacher whose trained head has another number of classes
            is refused (it would score other classes than the data's). A checkpoint without a trained head (a bare
            encoder such as `BertModel`) gets a fresh head of `num_labels` classes, with a warning: its logits carry
            no signal until it is fine-tuned.

        With `teacher_adapter_name_or_path`, the adapter is checked against the teacher (`adapter_config.json`'s base
        model and task, safetensors weights) before any weight is loaded, then loaded on the teacher and merged (see
        `hf_distill.peft_teacher.merge_teacher_adapter`); its `modules_to_save` may supply the trained head.

    Returns:
        `(teacher, tokenizer)`.
    """
    path = _check_exists(model_args.teacher_model_name_or_path, "teacher_model_name_or_path")
    adapter = model_args.teacher_adapter_name_or_path
    if adapter:
        adapter_folder, adapter_config = read_teacher_adapter(adapter, path)
    config = _load_config(path, "teacher_model_name_or_path", model_args.trust_remote_code)
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    teacher, info = _from_pretrained(
        AutoModelForSequenceClassification, path, "teacher_model_name_or_path", config.model_type, model_args, **kwargs
    )
    head = _head_keys(teacher)
    fresh_head = head and head <= set(info.get("missing_keys") or ())
    if not fresh_head:
        _refuse_mismatched(
            info,
            "teacher_model_name_or_path",
            path,
            f"the teacher's trained head has {config.num_labels} classes but the data has {num_labels}",
            "Use a teacher fine-tuned on this label set (label_column must hold the same classes, numbered as in the "
            "teacher's config.id2label), or data with the teacher's classes.",
        )
    elif adapter and any(
        h.endswith(tuple(m for m in adapter_config.get("modules_to_save") or () if m)) for h in head_modules(teacher)
    ):
        logger.info("teacher_model_name_or_path=%r has no trained head: the teacher adapter's supplies it.", path)
    else:
        logger.warning(
            "teacher_model_name_or_path=%r has no trained classification head (a bare encoder checkpoint?): its head "
            "of %d classes is freshly initialised, so its logits carry no signal until it is fine-tuned.",
            path,
            teacher.config.num_labels,
        )
    _refuse_mismatched(
        info,
        "teacher_model_name_or_path",
        path,
        "weights of the checkpoint do not fit its config",
        "Re-save the teacher with save_pretrained.",
    )
    if adapter:
        teacher = merge_teacher_adapter(teacher, adapter_folder, adapter_config, adapter)
    tokenizer_path = model_args.tokenizer_name_or_path or path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=model_args.trust_remote_code)
    return teacher, tokenizer


def head_auto_class(model: PreTrainedModel):
    """The `AutoModelFor...` class whose head `model` has (e.g. `AutoModelForSequenceClassification`)."""
    name = type(model).__name__
    for auto_cls, names in HEAD_AUTO_CLASSES:
        if name in names.values():
            return auto_cls
    raise ValueError(
        f"the teacher is a {name}, which is none of the task heads a given student can be loaded with "
        f"({', '.join(cls.__name__ for cls, _ in HEAD_AUTO_CLASSES)}). Build the student from the teacher instead "
        "(leave student_model_name_or_path unset)."
    )


def load_student(model_args: ModelArguments, teacher: PreTrainedModel) -> PreTrainedModel:
    """Load `student_model_name_or_path` with its own config and class, and the head of the teacher's task.

    A BERT teacher (`BertForSequenceClassification`) and a saved DistilBERT student give a
    `DistilBertForSequenceClassification`. A student checkpoint without that head (a bare pretrained encoder) gets a
    fresh head with the teacher's classes; one whose trained head has other classes than the teacher's is refused.
    """
    field = "student_model_name_or_path"
    path = _check_exists(model_args.student_model_name_or_path, field)
    config = _load_config(path, field, model_args.trust_remote_code)
    auto_cls = head_auto_class(teacher)
    kwargs = {}
    if auto_cls in CLASSIFICATION_AUTO_CLASSES:
        kwargs = {"num_labels": teacher.config.num_labels}
    student, info = _from_pretrained(auto_cls, path, field, config.model_type, model_args, **kwargs)
    head = _head_keys(student)
    if head and head <= set(info.get("missing_keys") or ()):
        logger.info("%s=%r has no %s head: a fresh one is trained from scratch.", field, path, auto_cls.__name__)
    elif kwargs:
        _refuse_mismatched(
            info,
            field,
            path,
            f"the student's trained head has {config.num_labels} classes but the teacher's has "
            f"{teacher.config.num_labels}",
            "Use a student with the teacher's classes or without a task head (a bare pretrained model), or leave "
            "student_model_name_or_path unset to build the student from the teacher's layers.",
        )
    _refuse_mismatched(
        info, field, path, "weights of the checkpoint do not fit its config", "Re-save it with save_pretrained."
    )
    logger.info("student: %s from %s (%d parameters)", type(student).__name__, path, student.num_parameters())
    return student


def load_or_make_student(model_args: ModelArguments, teacher: PreTrainedModel) -> PreTrainedModel:
    """Load `student_model_name_or_path` (see `load_student`), or build a student from the teacher's layers.

    With `peft`, the student is returned wrapped in a LoRA `PeftModel` of its head's task (base frozen, adapter and a
    classifier's head trained; see `hf_distill.peft_setup.apply_lora`).
    """
    if model_args.student_model_name_or_path:
        student = load_student(model_args, teacher)
    else:
        student = make_student(teacher, num_layers=model_args.student_num_layers, layers=model_args.student_layer_list)
    return student if model_args.peft is None else apply_lora(student, model_args.peft)


def max_positions(model: PreTrainedModel) -> int | None:
    """Longest input, in tokens, `model` has position embeddings for (`None` if its config does not say)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return None
    if model.config.model_type in PADDING_OFFSET_POSITIONS:
        limit -= (model.config.pad_token_id or 0) + 1
    return limit


def check_max_length(max_length: int, **models: PreTrainedModel) -> None:
    """Refuse a `max_length` longer than any of `models` has position embeddings for (it would index past them).

    Args:
        max_length: `DataArguments.max_length`.
        models: the models by role, e.g. `teacher=teacher, student=student`.
    """
    for role, model in models.items():
        limit = max_positions(model)
        if limit is not None and max_length > limit:
            raise ValueError(
                f"max_length={max_length} is longer than the {role} ({model.config.model_type}) has position "
                f"embeddings for ({limit} tokens, from its max_position_embeddings). Use max_length <= {limit}."
            )
