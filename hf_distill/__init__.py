"""hf-distill: knowledge distillation for Hugging Face Transformers."""

from .benchmark import BenchmarkConfig, load_benchmark_config, run_benchmark
from .cache import (
    TeacherCache,
    TeacherCacheCollator,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    cached_teacher_features,
    data_digest,
    densify_top_k,
    has_cached_teacher,
    load_teacher_cache,
    pad_cached_rows,
    teacher_cache_fingerprint,
    teacher_config_digest,
    teacher_input_columns,
    teacher_weights_digest,
    tokenizer_digest,
)
from .cli import DistillArgs, parse_distill_args
from .config import (
    DataArguments,
    DistillationConfig,
    LayerMatch,
    ModelArguments,
    RunArguments,
    check_recipe_keys,
    load_recipe,
    parse_layer_mapping,
)
from .data import (
    LabelInfo,
    apply_label_info,
    encode_labels,
    label_info,
    load_task_dataset,
    num_labels_of,
    tokenize_dataset,
)
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
from .models import check_max_length, load_or_make_student, load_student, load_teacher
from .resume import RunConfigCallback, prepare_output_dir, run_settings
from .student import default_student_layers, get_layers, make_student, num_layers
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "BenchmarkConfig",
    "load_benchmark_config",
    "run_benchmark",
    "ATTENTION_LOSSES",
    "ATTENTION_MODEL_TYPES",
    "DataArguments",
    "DistillationConfig",
    "DistillArgs",
    "DistillationTrainer",
    "Features",
    "HIDDEN_LOSSES",
    "LOGIT_LOSSES",
    "LabelInfo",
    "LayerMatch",
    "ModelArguments",
    "RunArguments",
    "RunConfigCallback",
    "TeacherCache",
    "TeacherCacheCollator",
    "TeacherCacheSpec",
    "apply_label_info",
    "attach_teacher_cache",
    "attention_probabilities",
    "build_layer_matches",
    "build_projections",
    "build_teacher_cache",
    "cached_teacher_features",
    "check_attention_compatible",
    "check_max_length",
    "check_recipe_keys",
    "classification_metrics",
    "data_digest",
    "default_student_layers",
    "densify_top_k",
    "encode_labels",
    "forward_with_features",
    "get_layers",
    "has_cached_teacher",
    "label_info",
    "load_metric",
    "load_or_make_student",
    "load_recipe",
    "load_student",
    "load_task_dataset",
    "load_teacher",
    "load_teacher_cache",
    "make_student",
    "measure_latency",
    "model_card",
    "num_labels_of",
    "num_layers",
    "pad_cached_rows",
    "parse_distill_args",
    "parse_layer_mapping",
    "prepare_output_dir",
    "push_student",
    "resolve_layer_pairs",
    "run_settings",
    "task_loss",
    "teacher_cache_fingerprint",
    "teacher_config_digest",
    "teacher_input_columns",
    "teacher_weights_digest",
    "tokenize_dataset",
    "tokenizer_digest",
]
