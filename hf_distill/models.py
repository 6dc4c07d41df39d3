"""Loading teachers and students for the scripts: Hub ids or local directories, with errors that name the field."""

from __future__ import annotations

import os

import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .config import ModelArguments
from .student import make_student


def _check_exists(name_or_path: str | None, field: str) -> str:
    if not name_or_path:
        raise ValueError(f"{field} is required: a Hub id or a local directory with config.json.")
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"{field}={name_or_path!r} does not exist. Pass a local directory made by save_pretrained or a Hub id "
            "such as 'bert-base-uncased'."
        )
    return name_or_path


def load_teacher(model_args: ModelArguments, num_labels: int | None = None):
    """The teacher as a sequence classifier (its head is kept when it has one) and its tokenizer."""
    path = _check_exists(model_args.teacher_model_name_or_path, "teacher_model_name_or_path")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"teacher_model_name_or_path={path!r} could not be loaded ({e}). Pass a local directory made by "
            "save_pretrained, or a Hub id reachable from this machine."
        ) from e
    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if num_labels is not None and config.num_labels != num_labels:
        kwargs["num_labels"] = num_labels
    teacher = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or path)
    return teacher, tokenizer


def load_or_make_student(model_args: ModelArguments, teacher):
    """Load `student_model_name_or_path` with the teacher's class, or build a student from the teacher's layers."""
    if model_args.student_model_name_or_path:
        path = _check_exists(model_args.student_model_name_or_path, "student_model_name_or_path")
        return getattr(transformers, type(teacher).__name__).from_pretrained(path)
    layers = None
    if model_args.student_layers:
        try:
            layers = [int(x) for x in model_args.student_layers.split(",")]
        except ValueError as e:
            raise ValueError(
                f"student_layers must be comma-separated teacher layer indices like '0,2,4', got "
                f"{model_args.student_layers!r}."
            ) from e
    return make_student(teacher, num_layers=model_args.student_num_layers, layers=layers)
