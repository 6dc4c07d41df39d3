"""PEFT in `scripts/distill.py`: a LoRA student (`ModelArguments.peft`), saved as an adapter or merged
(`save_merged`), and a teacher given as a base model plus an adapter (`teacher_adapter_name_or_path`).

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685. PEFT: https://github.com/huggingface/peft.

- The student's LoRA config is the recipe's `peft` mapping of `LoraConfig` fields; its `task_type` follows the
  student's head (`SEQ_CLS`, `TOKEN_CLS`, `CAUSAL_LM`). Everything is checked before the model is wrapped: unknown
  keys, values, `target_modules` / `modules_to_save` that name no module of the student.
- Classification heads (`SEQ_CLS`, `TOKEN_CLS`) are trained in full and saved with the adapter: PEFT's task wrappers
  add the modules named `classifier` and `score` to `modules_to_save` (its default), and we add any other module of
  the head outside the base model (e.g. DeBERTa's `pooler`), because a frozen random head would make the student
  learn nothing useful. A causal LM's `lm_head` stays frozen unless `modules_to_save` names it.
- Saving: `save_merged=True` merges the adapter into the student and writes a plain transformers model to
  `<output_dir>/student`. Otherwise `<output_dir>/student` holds the adapter (`adapter_config.json`,
  `adapter_model.safetensors`, tokenizer, card) and `<output_dir>/student_base` the base it was trained on (a plain
  model, always written, so a student built by `make_student` has a base); the adapter's `base_model_name_or_path` is
  that folder's absolute path, so `AutoPeftModelFor...from_pretrained(<output_dir>/student)` loads the pair.
- The teacher adapter (`teacher_adapter_name_or_path`): checked, loaded and merged in `hf_distill.peft_teacher`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

from .files import replace_folder
from .tasks import is_causal_lm, is_sequence_classifier, unwrap_peft

logger = logging.getLogger(__name__)

PEFT_TASKS = ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM")
# LoraConfig fields hf-distill sets itself: the task follows the student's head, the rest are PEFT bookkeeping.
SET_BY_HF_DISTILL = {
    "peft_type": "only LoRA is supported (peft_type LORA)",
    "auto_mapping": "PEFT bookkeeping",
    "peft_version": "PEFT bookkeeping",
    "base_model_name_or_path": "the student is the base",
    "revision": "the student is the base",
    "inference_mode": "the adapter is trained",
}
# What PEFT's PeftModelForSequenceClassification / ...ForTokenClassification add to modules_to_save (matched as a
# suffix of the module name, so `classifier` also takes DistilBERT's `pre_classifier`).
PEFT_CLASSIFIER_MODULES = ("classifier", "score")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS})
_TOKEN_CLASSIFICATION_CLASSES = set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values())


def require_peft(field: str):
    """The `peft` module; an ImportError naming `field` and the install command when it is missing."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            f"{field} is set, but the peft package is not installed. Install it with `pip install 'peft>=0.13'` "
            f"(a dependency of hf-distill), or unset {field}."
        ) from e
    return peft


# ---------------------------------------------------------------------------------------------- the recipe's `peft`
def check_peft_settings(settings: Any) -> dict[str, Any]:
    """Check the recipe's `peft` mapping (or its JSON text from the command line) without any model.

    Returns:
        The settings as a `dict` of `LoraConfig` fields.

    Raises:
        ValueError: not a mapping, a key that is no `LoraConfig` field (with the closest one) or that hf-distill sets,
            a bad `r` / `lora_alpha` / `lora_dropout` / `target_modules` / `modules_to_save`, or a value
            `LoraConfig` refuses.
        ImportError: peft is not installed.
    """
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"peft must be a mapping of LoRA settings, got the text {settings!r}, which is not JSON ({e}). On the "
                """command line write e.g. --peft '{"r": 8, "lora_alpha": 16, "target_modules": ["query"]}'."""
            ) from e
    if not isinstance(settings, dict):
        raise ValueError(
            f"peft must be a mapping of LoRA settings (LoraConfig fields), got {settings!r}. Use e.g. "
            "peft: {r: 8, lora_alpha: 16, lora_dropout: 0.05, target_modules: [query, value]}."
        )
    peft = require_peft("peft")
    settings = dict(settings)
    valid = sorted(f.name for f in dataclasses.fields(peft.LoraConfig) if f.init)
    unknown = [key for key in settings if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"peft has unknown LoRA key(s): {', '.join(hints)}. Keys are the fields of peft.LoraConfig, e.g. r, "
            "lora_alpha, lora_dropout, target_modules, modules_to_save, bias, use_rslora, use_dora."
        )
    peft_type = settings.pop("peft_type", None)
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
        raise ValueError(f"peft.peft_type={peft_type!r}: hf-distill trains LoRA students only. Drop peft_type.")
    fixed = [key for key in settings if key in SET_BY_HF_DISTILL]
    if fixed:
        raise ValueError(
            f"peft sets {', '.join(f'{k}={settings[k]!r}' for k in fixed)}, which hf-distill sets itself "
            f"({'; '.join(f'{k}: {SET_BY_HF_DISTILL[k]}' for k in fixed)}). Drop {', '.join(fixed)} from peft."
        )
    task = settings.get("task_type")
    if task is not None and str(getattr(task, "value", task)) not in PEFT_TASKS:
        raise ValueError(
            f"peft.task_type={task!r} is not one hf-distill trains ({', '.join(PEFT_TASKS)}). Drop task_type: it is "
            "inferred from the student's head."
        )
    r = settings.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"peft.r must be an integer >= 1 (the LoRA rank), got {r!r}. Use e.g. 8.")
    alpha = settings.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(
            f"peft.lora_alpha must be a number > 0 (the update is scaled by lora_alpha / r), got {alpha!r}."
        )
    dropout = settings.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"peft.lora_dropout must be in [0, 1), got {dropout!r}. Use e.g. 0.05, or 0.0.")
    for key in ("target_modules", "modules_to_save"):
        value = settings.get(key)
        if key == "target_modules" and isinstance(value, str):
            continue  # a regular expression (full match) or "all-linear"
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise ValueError(
                f"peft.{key} must be a list of module names (e.g. [query, value])"
                + (" or one regular expression" if key == "target_modules" else "")
                + f", got {value!r}."
            )
    try:
        peft.LoraConfig(**{k: v for k, v in settings.items() if k != "task_type"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft={settings!r} is not a valid LoRA config: {e}") from e
    return settings


# ---------------------------------------------------------------------------------------------- the LoRA student
def peft_task_type(model: nn.Module, role: str = "student") -> str:
    """The PEFT `task_type` of a model's head: `SEQ_CLS`, `TOKEN_CLS` or `CAUSAL_LM`; a ValueError for other heads."""
    if is_causal_lm(model):
        return "CAUSAL_LM"
    if is_sequence_classifier(model):
        return "SEQ_CLS"
    name = type(unwrap_peft(model)).__name__
    if name in _TOKEN_CLASSIFICATION_CLASSES or name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    raise ValueError(
        f"the {role} is a {name}, whose head PEFT's LoRA wrappers in hf-distill do not cover (PEFT has no task type "
        f"for it that the trainer can drive). LoRA needs a *ForSequenceClassification (SEQ_CLS), "
        f"*ForTokenClassification (TOKEN_CLS) or *ForCausalLM (CAUSAL_LM) {role}; unset peft to train it in full."
    )


def head_modules(model: PreTrainedModel) -> list[str]:
    """Names of the top-level modules outside the base model holding parameters (the task head), e.g. `classifier`."""
    return [
        name
        for name, module in model.named_children()
        if name != model.base_model_prefix and any(True for _ in module.parameters())
    ]


def _module_names(model: nn.Module, kinds: tuple[type, ...] | None = None) -> list[str]:
    return [name for name, module in model.named_modules() if name and (kinds is None or isinstance(module, kinds))]


def _matches(target: str, name: str) -> bool:
    """PEFT's rule for one entry of a `target_modules` list: the full name, or its suffix after a dot."""
    return name == target or name.endswith("." + target)


def _adaptable_names(model: nn.Module) -> list[str]:
    """The distinct names of the linear layers inside the base model (outside the head): what LoRA usually targets."""
    from transformers.pytorch_utils import Conv1D

    prefix = getattr(model, "base_model_prefix", "") + "."
    linear = _module_names(model, (nn.Linear, nn.Conv1d, Conv1D))
    return sorted({name.rsplit(".", 1)[-1] for name in linear if name.startswith(prefix)} or set(linear))


def check_target_modules(model: nn.Module, target_modules: Any) -> None:
    """Refuse `target_modules` entries that match no module of `model` (PEFT ignores them when another matches)."""
    names = _module_names(model)
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name in names):
            raise ValueError(
                f"peft.target_modules={target_modules!r} (a regular expression, matched against full module names) "
                f"matches no module of the student ({type(model).__name__}), e.g. {names[:3]}. Its linear layers "
                f"are named {_adaptable_names(model)}: list some of those instead."
            )
        return
    missing = [t for t in target_modules if not any(_matches(t, name) for name in names)]
    if missing:
        raise ValueError(
            f"peft.target_modules names {missing}, which match no module of the student ({type(model).__name__}). "
            f"Its linear layers are named {_adaptable_names(model)}: use some of those (LoRA usually targets the "
            "attention projections)."
        )


def lora_config(model: PreTrainedModel, settings: dict[str, Any]):
    """The `LoraConfig` of a LoRA student: `settings` (checked by `check_peft_settings`) with the task of its head.

    For classification heads, `modules_to_save` gets every head module PEFT's default (`classifier`, `score`) misses.
    """
    peft = require_peft("peft")
    settings = copy.deepcopy(check_peft_settings(settings))
    task = peft_task_type(model)
    given_task = settings.pop("task_type", None)
    if given_task is not None and str(getattr(given_task, "value", given_task)) != task:
        raise ValueError(
            f"peft.task_type={given_task!r}, but the student ({type(model).__name__}) has a {task} head. Drop "
            "task_type: it is inferred from the student's head."
        )
    target_modules = settings.get("target_modules")
    if target_modules is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

        model_type = model.config.model_type
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"peft.target_modules is unset and PEFT has no default target modules for model type "
                f"{model_type!r}. List them: the student's linear layers are named {_adaptable_names(model)} (LoRA "
                "usually targets the attention projections)."
            )
        logger.info("peft.target_modules unset: PEFT's default for %s, %s", model_type, DEFAULT_TARGETS[model_type])
    else:
        check_target_modules(model, target_modules)
    names = _module_names(model)
    modules_to_save = list(settings.pop("modules_to_save", None) or [])
    missing = [m for m in modules_to_save if not any(name.endswith(m) for name in names)]
    if missing:
        raise ValueError(
            f"peft.modules_to_save names {missing}, which match no module of the student ({type(model).__name__}). "
            f"Name modules trained in full and saved with the adapter, e.g. its head {head_modules(model)}."
        )
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        covered = [*modules_to_save, *PEFT_CLASSIFIER_MODULES]
        extra = [m for m in head_modules(model) if not any(m.endswith(c) for c in covered)]
        modules_to_save += extra
        logger.info(
            "peft %s: the head %s is trained in full and saved with the adapter (PEFT adds %s to modules_to_save%s).",
            task,
            head_modules(model),
            list(PEFT_CLASSIFIER_MODULES),
            f"; hf-distill adds {extra}" if extra else "",
        )
    return peft.LoraConfig(**settings, task_type=task, modules_to_save=modules_to_save or None)


def apply_lora(model: PreTrainedModel, settings: dict[str, Any]):
    """Wrap the student in a LoRA `PeftModel` of its head's task: only the adapter (and, for classifiers, the head)
    is trained; the base weights are frozen."""
    peft = require_peft("peft")
    config = lora_config(model, settings)
    try:
        peft_model = peft.get_peft_model(model, config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"peft={settings!r} could not wrap the student ({type(model).__name__}): {e}") from e
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA student (%s, r=%d, targets %s): %d of %d parameters trainable (%.2f%%)",
        config.task_type,
        config.r,
        sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) else config.target_modules,
        trainable,
        total,
        100.0 * trainable / total,
    )
    return peft_model


# ---------------------------------------------------------------------------------------------- the run and saving
def check_peft_run(model_args, *, push: bool) -> None:
    """Refuse what a PEFT run cannot save, before anything is loaded: an adapter pushed to the Hub."""
    if model_args.peft is not None and push and not model_args.save_merged:
        raise ValueError(
            "push_to_hub=True with a LoRA student saved as an adapter (save_merged=False): the push publishes a plain "
            "transformers model folder, and an adapter needs its base published next to it. Set save_merged=true to "
            "push the merged student, or push <output_dir>/student and <output_dir>/student_base yourself."
        )


def check_peft_trainer(trainer) -> None:
    """Refuse a LoRA student under FSDP or DeepSpeed ZeRO-3 before training: merging or unloading the adapter at the
    end needs the whole model in one process (one process and DDP are supported)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    model = trainer.model
    if not (hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))):
        return
    engine = "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else None
    if engine:
        raise ValueError(
            f"peft is set (a LoRA student) and the run uses {engine}, which shards the student: its adapter could "
            "not be merged or separated from its base at the end. Run LoRA students in one process or under DDP "
            "(multi_gpu.yaml); LoRA's small optimizer state rarely needs sharding."
        )


def export_peft_student(model, *, merged: bool) -> PreTrainedModel:
    """A plain transformers copy of a trained LoRA student: the adapter merged in (`merged=True`), or the base alone.

    The trained `model` is left as it is (the copy costs one more student in memory).
    """
    model = copy.deepcopy(model)
    return model.merge_and_unload() if merged else model.unload()


def peft_card_section(model, *, merged: bool, base_folder: str) -> str:
    """Markdown stating how the student was trained with LoRA and how its folder loads."""
    config = model.peft_config[model.active_adapter]
    targets = (
        sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) else config.target_modules
    )
    head = type(unwrap_peft(model)).__name__
    lines = [
        "## LoRA",
        "",
        f"Trained with LoRA ([Hu et al. 2021](https://arxiv.org/abs/2106.09685)): r = {config.r}, lora_alpha = "
        f"{config.lora_alpha}, lora_dropout = {config.lora_dropout}, target modules {targets}, trained in full and "
        f"saved with the adapter: {sorted(config.modules_to_save or [])}.",
        "",
    ]
    if merged:
        lines.append("The adapter is merged into the weights: this folder is a plain transformers model.")
    else:
        lines += [
            f"This folder is the adapter; its base is the folder `{os.path.basename(base_folder)}` next to it. Load "
            f"the pair with `peft.AutoPeftModelFor{head.split('For', 1)[-1]}.from_pretrained(<this folder>)`, or with "
            f"`PeftModel.from_pretrained(AutoModelFor{head.split('For', 1)[-1]}.from_pretrained(<base>), "
            "<this folder>)`, then `merge_and_unload()` for plain transformers.",
        ]
    return "\n".join([*lines, ""])


def save_adapter(model, tokenizer, folder: str, card: str, *, base_model_name_or_path: str) -> str:
    """Write an adapter folder (adapter config, safetensors weights, tokenizer, card) atomically, naming its base."""
    folder = os.path.abspath(folder)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    config = model.peft_config[model.active_adapter]
    recorded = config.base_model_name_or_path
    config.base_model_name_or_path = base_model_name_or_path
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)  # replaces PEFT's template card
        if not os.path.isfile(os.path.join(tmp, ADAPTER_WEIGHTS)):
            raise ValueError(f"saving the adapter wrote no {ADAPTER_WEIGHTS} in {tmp!r}; nothing would load.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        config.base_model_name_or_path = recorded
    replace_folder(tmp, folder)  # the old one moves aside first: `folder` is complete or absent
    return folder


def save_peft_student(trainer, exported: PreTrainedModel, folder: str, card: str, *, merged: bool, base_folder: str):
    """Save a trained LoRA student: `exported` (from `export_peft_student`) as a plain model in `folder` (merged),
    or the adapter in `folder` and `exported`, its base, in `base_folder`. Call on every process."""
    from .hub import save_student  # hub imports the trainer: kept out of ModelArguments' imports of this module

    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class
        card += "\n" + peft_card_section(model, merged=merged, base_folder=base_folder)
        if merged:
            save_student(exported, tokenizer, folder, card)
        else:
            base_card = (
                "# Base of a LoRA student\n\nThe base model (frozen in training) of the LoRA adapter in "
                f"`{os.path.basename(folder)}` next to this folder, written by hf-distill. Load the adapter, not this "
                "folder alone: without it this is the untrained student.\n"
            )
            save_student(exported, tokenizer, base_folder, base_card)
            save_adapter(model, tokenizer, folder, card, base_model_name_or_path=os.path.abspath(base_folder))
    trainer.accelerator.wait_for_everyone()
    return os.path.abspath(folder)
