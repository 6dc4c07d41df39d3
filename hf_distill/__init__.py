"""hf-distill: knowledge distillation for Hugging Face Transformers."""

from .config import (
    DataArguments,
    DistillationConfig,
    LayerMatch,
    ModelArguments,
    check_recipe_keys,
    load_recipe,
    parse_layer_mapping,
)
from .data import load_task_dataset, num_labels_of, tokenize_dataset
from .evaluation import classification_metrics, load_metric, measure_latency
from .features import (
    ATTENTION_MODEL_TYPES,
    Features,
    attention_probabilities,
    check_attention_compatible,
    forward_with_features,
)
from .hub import model_card, push_student
from .layer_mapping import build_layer_matches, build_projections, resolve_layer_pairs
from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES
from .losses.task import task_loss
from .models import load_or_make_student, load_teacher
from .student import default_student_layers, get_layers, make_student, num_layers
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_LOSSES",
    "ATTENTION_MODEL_TYPES",
    "DataArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "Features",
    "HIDDEN_LOSSES",
    "LOGIT_LOSSES",
    "LayerMatch",
    "ModelArguments",
    "attention_probabilities",
    "build_layer_matches",
    "build_projections",
    "check_attention_compatible",
    "check_recipe_keys",
    "classification_metrics",
    "default_student_layers",
    "forward_with_features",
    "get_layers",
    "load_metric",
    "load_or_make_student",
    "load_recipe",
    "load_task_dataset",
    "load_teacher",
    "make_student",
    "measure_latency",
    "model_card",
    "num_labels_of",
    "num_layers",
    "parse_layer_mapping",
    "push_student",
    "resolve_layer_pairs",
    "task_loss",
    "tokenize_dataset",
]
