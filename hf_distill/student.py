"""Students built from teachers: a shallower copy of the same architecture initialised from chosen teacher layers.

The recipe is DistilBERT's ([Sanh et al., 2019](https://huggingface.co/papers/1910.01108), and transformers'
`examples/research_projects/distillation/scripts/extract_distilbert.py`): keep the teacher's width, take every other
layer, and copy the embeddings, the chosen layers and the head key by key. Here it works for any supported family and
any task head, and the student is a model of the teacher's own class, so `save_pretrained` / `AutoModel*` just work.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

# Where each supported family keeps its stack of transformer blocks, relative to the base model.
# model_type -> attribute path of the nn.ModuleList of blocks (checked against transformers 5.23).
LAYER_PATHS: dict[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "distilbert": "transformer.layer",
    "mpnet": "encoder.layer",
    "gpt2": "h",
    "llama": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "mistral": "layers",
}

# Config fields holding one entry per layer. transformers validates their length against `num_hidden_layers` only
# when the config is saved, so a stale list would build a model fine and then fail in `save_pretrained`.
PER_LAYER_CONFIG_LISTS: tuple[str, ...] = ("layer_types", "mlp_layer_types")


def _unsupported(model_type: str) -> ValueError:
    return ValueError(
        f"model_type {model_type!r} is not supported; supported model types are {sorted(LAYER_PATHS)}. "
        "Open an issue or pass a model from one of these families."
    )


def get_base_model(model: PreTrainedModel) -> nn.Module:
    """The bare transformer inside a task model (e.g. `model.bert` in `BertForSequenceClassification`)."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # a PEFT wrapper: the blocks are those of the transformers model inside
    return getattr(model, model.base_model_prefix, model)


def get_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The `nn.ModuleList` of transformer blocks of a base or task model of a supported family."""
    model_type = model.config.model_type
    if model_type not in LAYER_PATHS:
        raise _unsupported(model_type)
    module = get_base_model(model)
    for name in LAYER_PATHS[model_type].split("."):
        module = getattr(module, name)
    return module


def num_layers(model: PreTrainedModel) -> int:
    """Number of transformer blocks."""
    return len(get_layers(model))


def default_student_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher layers that always include the first and the last one.

    This is DistilBERT's "alternating" choice generalised to any depth: 12 -> 6 gives `[0, 2, 4, 7, 9, 11]`, the
    layers `extract_distilbert.py` copies.

    Args:
        num_teacher_layers (`int`): depth N of the teacher, >= 1.
        num_student_layers (`int`): depth n of the student, in `[1, N]`.

    Returns:
        `list[int]`: n strictly increasing teacher layer indices, `round(i * (N - 1) / (n - 1))` for `i < n`
        (halves rounded up), or `[N - 1]` when n == 1.

    Raises:
        ValueError: if N < 1 or n is outside `[1, N]`.
    """
    if num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers must be >= 1, got {num_teacher_layers}. Pass the teacher's depth.")
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(
            f"num_student_layers must be between 1 and num_teacher_layers={num_teacher_layers}, got "
            f"{num_student_layers}: a student cannot be deeper than its teacher ({num_teacher_layers} layers)."
        )
    # A one-layer student keeps the top layer: it is the one whose output the copied pooler / head was trained on.
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    # Keep the bottom layer (it reads the copied embeddings) and the top layer (it feeds the copied pooler / head), so
    # both ends of the student see the representations they were trained with, and spread the rest evenly in between,
    # as DistilBERT did. Integer arithmetic for floor(i * (N - 1) / (n - 1) + 0.5), so no float rounding surprises.
    # The spacing (N - 1) / (n - 1) is >= 1 when n <= N, so the indices are strictly increasing.
    span, gaps = num_teacher_layers - 1, num_student_layers - 1
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(num_student_layers)]


def _resolve_layers(num_teacher_layers: int, num_layers: int | None, layers: Sequence[int] | None) -> list[int]:
    """Validate `num_layers` / `layers` against a teacher of depth `num_teacher_layers` and return the layer list."""
    n_max = num_teacher_layers
    if num_layers is not None and not 1 <= num_layers <= n_max:
        if num_layers > n_max:
            raise ValueError(
                f"num_layers={num_layers} but a student cannot be deeper than its teacher ({n_max} layers). "
                f"Use num_layers between 1 and {n_max}."
            )
        raise ValueError(f"num_layers must be between 1 and {n_max} (the teacher's depth), got {num_layers}.")
    if layers is None:
        # Half the teacher, as DistilBERT (12 -> 6), unless told otherwise; a 1-layer teacher keeps its only layer.
        return default_student_layers(n_max, num_layers if num_layers is not None else max(1, n_max // 2))

    try:
        chosen = [operator.index(layer) for layer in layers]
    except TypeError:
        raise ValueError(f"layers must be integer teacher layer indices, got {list(layers)!r}.") from None
    if num_layers is not None and num_layers != len(chosen):
        raise ValueError(
            f"num_layers={num_layers} disagrees with layers={chosen}, which has {len(chosen)} entries. "
            f"Pass only one of them, e.g. layers={chosen} alone."
        )
    if not chosen:
        raise ValueError(
            f"layers must name at least one teacher layer, got []. Pick indices in 0..{n_max - 1}, e.g. "
            f"{default_student_layers(n_max, max(1, n_max // 2))}."
        )
    out_of_range = [layer for layer in chosen if not 0 <= layer < n_max]
    if out_of_range:
        raise ValueError(
            f"layers={chosen} contains {out_of_range}, outside the teacher's layers: valid indices are 0..{n_max - 1} "
            f"(the teacher has {n_max} layers). Use e.g. {default_student_layers(n_max, min(len(chosen), n_max))}."
        )
    # The student stacks the copied blocks in the teacher's bottom-to-top order: a repeated or reordered block would
    # see inputs from a depth it was never trained on.
    if any(later <= earlier for earlier, later in zip(chosen, chosen[1:])):
        raise ValueError(
            f"layers must be strictly increasing with no duplicates (the student keeps the teacher's bottom-to-top "
            f"order), got {chosen}. Use e.g. {sorted(set(chosen))}."
        )
    return chosen


def _student_config(teacher: PreTrainedModel, teacher_depth: int, layers: list[int]) -> PreTrainedConfig:
    """The teacher's config with only the depth (and the fields that depend on it) changed."""
    config = copy.deepcopy(teacher.config)
    # `num_hidden_layers` is an alias (`attribute_map`) for `n_layer` on GPT-2 and `n_layers` on DistilBERT, so this
    # one assignment sets whichever field the family serialises.
    config.num_hidden_layers = len(layers)
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == teacher_depth:
            # Student layer i is teacher layer layers[i], so it keeps that layer's attention / MLP type.
            setattr(config, name, [values[layer] for layer in layers])
    max_window_layers = getattr(config, "max_window_layers", None)
    if isinstance(max_window_layers, int):
        # Qwen-style configs derive layer_types from "layers >= max_window_layers use sliding attention". Keep that
        # rule true for the student: its boundary is the number of chosen layers below the teacher's boundary.
        config.max_window_layers = sum(layer < max_window_layers for layer in layers)
    # Saved in config.json with the student, so anyone can see which teacher layers it started from.
    config.distillation_teacher_layers = list(layers)
    if hasattr(config, "validate"):
        config.validate()  # transformers would only run these checks at save time
    return config


def _layer_index(key: str, layers_prefix: str) -> int | None:
    """Index of the block a state_dict key belongs to ("bert.encoder.layer.3.output.dense.weight" -> 3), else None."""
    if not key.startswith(layers_prefix):
        return None
    return int(key[len(layers_prefix) :].partition(".")[0])


def _num_params(model: nn.Module) -> int:
    # `parameters()` yields a tied parameter once, so tied embeddings / LM heads are not counted twice.
    return sum(p.numel() for p in model.parameters())


def make_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    *,
    verbose: bool = True,
) -> PreTrainedModel:
    """Build a shallower student of the teacher's own class, initialised from chosen teacher layers.

    The student's config is the teacher's with the layer count changed (plus per-layer fields such as `layer_types`
    and `max_window_layers`), and records the choice as `config.distillation_teacher_layers`, saved in config.json.
    Everything outside the layer stack (embeddings, MPNet's shared relative-position bias, final norms, pooler, task
    head) is copied unchanged, and student layer i is a copy of teacher layer `layers[i]`, key by key with shape
    checks, in the teacher's dtype and on its device. Tied weights (e.g. an LM head tied to the embeddings) stay tied.

    Args:
        teacher (`PreTrainedModel`): base model or any task head of a family in `LAYER_PATHS`.
        num_layers (`int`, *optional*): student depth, in `[1, N]` for a teacher of depth N. Defaults to
            `len(layers)` if `layers` is given, else N // 2.
        layers (`Sequence[int]`, *optional*): strictly increasing teacher layer indices in `[0, N - 1]`; student layer
            i is copied from teacher layer `layers[i]`. Defaults to `default_student_layers(N, num_layers)`.
        verbose (`bool`, *optional*, defaults to `True`): print which teacher layer became which student layer, and
            the parameter counts.

    Returns:
        `PreTrainedModel`: the student, a fresh model (trainable, not sharing tensors with the teacher) in the
        teacher's train/eval mode.

    Raises:
        TypeError: if `teacher` is not a `PreTrainedModel`.
        ValueError: unsupported family, heterogeneous or quantized teacher, or invalid `num_layers` / `layers`.

    Example:
        ```python
        >>> teacher = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        >>> student = make_student(teacher, num_layers=6)  # teacher layers [0, 2, 4, 7, 9, 11]
        >>> student.save_pretrained("bert-6l")
        ```
    """
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(
            f"teacher must be a transformers PreTrainedModel, got {type(teacher).__name__}. "
            "For a PEFT model, pass `teacher.merge_and_unload()`."
        )
    if getattr(teacher.config, "is_heterogeneous", False):
        raise ValueError(
            f"teacher config of {type(teacher).__name__} is heterogeneous (per_layer_config is set); building "
            "students from per-layer configs is not supported. Pass a teacher whose layers share one config."
        )
    if getattr(teacher, "is_quantized", False) or getattr(teacher.config, "quantization_config", None) is not None:
        raise ValueError(
            f"teacher {type(teacher).__name__} is quantized; its packed weights cannot be copied into a student. "
            "Load the teacher unquantized (e.g. dtype=torch.bfloat16) to build the student, then quantize that."
        )
    teacher_layers = get_layers(teacher)  # raises the "unsupported model_type" error
    teacher_depth = len(teacher_layers)
    layers = _resolve_layers(teacher_depth, num_layers, layers)

    if getattr(teacher.config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 bakes 1 / (layer_idx + 1) into each block's attention scale from its position, not from its weights.
        logger.warning(
            "The teacher has scale_attn_by_inverse_layer_idx=True: student layer i scales attention by 1 / (i + 1) "
            "instead of 1 / (layers[i] + 1), so the copied layers do not compute exactly what they did in the teacher."
        )

    # Build a model of the teacher's own class, directly in its dtype and on its device (no CPU round trip for a GPU
    # teacher). Its random init is overwritten below, all of it: every student key is checked to have been copied.
    config = _student_config(teacher, teacher_depth, layers)
    with torch.device(teacher.device):
        student = type(teacher)._from_config(config, dtype=teacher.dtype)

    # Full-model prefix of the layer stack ("bert.encoder.layer." for a classifier, "encoder.layer." for BertModel):
    # it differs per head, so find it by identity rather than by hard-coding it.
    layers_prefix = next(name for name, module in teacher.named_modules() if module is teacher_layers) + "."
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()

    # Student key -> teacher key. Student layer i <- teacher layer layers[i]; every other key (embeddings, MPNet's
    # relative_attention_bias that all layers share, final norm, pooler, head) keeps its name.
    source_of: dict[str, str] = {}
    for key in student_state:
        source = key
        if (index := _layer_index(key, layers_prefix)) is not None:
            source = f"{layers_prefix}{layers[index]}{key[len(f'{layers_prefix}{index}') :]}"
        if source not in teacher_state:
            raise RuntimeError(
                f"student key {key!r} has no teacher counterpart {source!r}; the student config differs from the "
                "teacher's in more than depth. Please report this with the teacher's config."
            )
        if student_state[key].shape != teacher_state[source].shape:
            raise RuntimeError(
                f"shape mismatch: student {key!r} {tuple(student_state[key].shape)} vs teacher {source!r} "
                f"{tuple(teacher_state[source].shape)}; the student config differs from the teacher's in more than "
                "depth. Please report this with the teacher's config."
            )
        source_of[key] = source
    # ...and the other way round: every teacher tensor outside the skipped layers found its place in the student.
    used, chosen = set(source_of.values()), set(layers)
    left_behind = [
        key
        for key in teacher_state
        if key not in used and _layer_index(key, layers_prefix) in chosen | {None}  # None: outside the layer stack
    ]
    if left_behind:
        raise RuntimeError(
            f"teacher tensors {left_behind} have no place in the student; the student config differs from the "
            "teacher's in more than depth. Please report this with the teacher's config."
        )

    # Keep each tensor's own dtype (a few models keep some modules in fp32 inside a bf16 model).
    retyped = False
    for key, source in source_of.items():
        if student_state[key].dtype != teacher_state[source].dtype:
            module_path, _, name = key.rpartition(".")
            tensor = getattr(student.get_submodule(module_path), name)
            tensor.data = tensor.data.to(teacher_state[source].dtype)
            retyped = True
    if retyped:
        student_state = student.state_dict()

    # The tied copies of a weight share storage in the student; they may only be tied if the teacher's are equal.
    first_key_of_storage: dict[tuple, str] = {}
    with torch.no_grad():
        for key, source in source_of.items():
            tensor = student_state[key]
            pointer = (tensor.data_ptr(), tensor.shape, tensor.stride())
            if tensor.numel() and pointer in first_key_of_storage:
                other = source_of[first_key_of_storage[pointer]]
                if not torch.equal(teacher_state[source], teacher_state[other]):
                    raise ValueError(
                        f"the student ties {key!r} to {first_key_of_storage[pointer]!r} (tie_word_embeddings="
                        f"{getattr(config, 'tie_word_embeddings', None)}) but the teacher's {source!r} and {other!r} "
                        "differ. Load the teacher with the tie_word_embeddings its weights were trained with."
                    )
                continue
            first_key_of_storage[pointer] = key
            tensor.copy_(teacher_state[source])

    if getattr(teacher, "generation_config", None) is not None and student.can_generate():
        # Special tokens and decoding defaults belong to the tokenizer/vocabulary, which the student shares.
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)

    if verbose:
        in_layers = sum(_layer_index(key, layers_prefix) is not None for key in source_of)
        # Modules copied unchanged, in model order, e.g. "bert.embeddings.word_embeddings, ..., classifier".
        outside = dict.fromkeys(
            key.rpartition(".")[0] for key in source_of if _layer_index(key, layers_prefix) is None
        )
        teacher_params, student_params = _num_params(teacher), _num_params(student)
        print(f"Student {type(student).__name__}: {teacher_depth} -> {len(layers)} layers")
        for student_layer, teacher_layer in enumerate(layers):
            print(f"  teacher layer {teacher_layer:>3} -> student layer {student_layer:>3}")
        print(
            f"Copied {len(source_of)} state_dict entries key by key, shapes checked: {in_layers} in the layers, "
            f"{len(source_of) - in_layers} outside them ({', '.join(outside)})."
        )
        print(
            f"Parameters: {teacher_params:,} -> {student_params:,} "
            f"({100 * student_params / teacher_params:.1f}% kept), dtype {teacher.dtype}, device {teacher.device}"
        )
    return student
