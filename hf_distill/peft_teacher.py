"""A teacher given as a base model plus a PEFT adapter (`ModelArguments.teacher_adapter_name_or_path`).

The adapter is checked against its `adapter_config.json` before the teacher is loaded (its base model, its task,
safetensors weights), loaded with `PeftModel.from_pretrained`, every adapter weight required to land, then merged
with `merge_and_unload()` (no adapter overhead in the teacher's forwards) and frozen. The student's side of PEFT
(LoRA students, saving adapters) is `hf_distill.peft_setup`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

from transformers import PreTrainedModel

from .peft_setup import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, peft_task_type, require_peft

logger = logging.getLogger(__name__)


def _same_model(recorded: str, given: str) -> bool:
    if os.path.exists(recorded) and os.path.exists(given):
        return os.path.realpath(recorded) == os.path.realpath(given)
    return recorded.rstrip("/") == given.rstrip("/")


def read_teacher_adapter(adapter: str, teacher_path: str) -> tuple[str, dict[str, Any]]:
    """Find the teacher adapter's folder and check its `adapter_config.json`, before the teacher is loaded.

    Args:
        adapter: `teacher_adapter_name_or_path` (a local folder saved by `PeftModel.save_pretrained`, or a Hub id).
        teacher_path: `teacher_model_name_or_path`, which must be the base model the adapter names.

    Returns:
        `(folder, adapter_config)`.
    """
    field = "teacher_adapter_name_or_path"
    require_peft(field)
    from .recipes import looks_local  # not at the top: recipes imports arguments, which imports this module

    folder = adapter
    if not os.path.isdir(adapter):
        if looks_local(adapter):
            raise FileNotFoundError(
                f"{field}={adapter!r} does not exist. Pass a folder written by PeftModel.save_pretrained (it holds "
                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}) or a Hub id."
            )
        from huggingface_hub import snapshot_download

        folder = snapshot_download(adapter, allow_patterns=sorted(ADAPTER_FILES))
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{field}={adapter!r} has no {ADAPTER_CONFIG}: it is not a PEFT adapter. Pass the folder written by "
            "PeftModel.save_pretrained (a merged model is a teacher: pass it as teacher_model_name_or_path)."
        )
    if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
        raise FileNotFoundError(
            f"{field}={adapter!r} has no {ADAPTER_WEIGHTS}, and hf-distill loads safetensors only (a pickled "
            "adapter_model.bin can run arbitrary code when loaded). Re-save the adapter with "
            "PeftModel.save_pretrained (safetensors by default), from a source you trust."
        )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    recorded = config.get("base_model_name_or_path")
    if not recorded:
        logger.warning(
            "%s=%r: %s names no base model; assuming it is %r.", field, adapter, ADAPTER_CONFIG, teacher_path
        )
    elif not _same_model(recorded, teacher_path):
        raise ValueError(
            f"{field}={adapter!r} was trained on the base model {recorded!r} (base_model_name_or_path in its "
            f"{ADAPTER_CONFIG}), but teacher_model_name_or_path={teacher_path!r}. Set teacher_model_name_or_path to "
            f"{recorded!r}; if {teacher_path!r} is that same model saved elsewhere, set base_model_name_or_path in "
            f"{ADAPTER_CONFIG} to it."
        )
    if config.get("peft_type") is not None and config.get("peft_type") != "LORA":
        logger.info("%s=%r is a %s adapter (merged like LoRA).", field, adapter, config.get("peft_type"))
    return folder, config


def merge_teacher_adapter(teacher: PreTrainedModel, folder: str, config: dict[str, Any], adapter: str):
    """The teacher with the adapter of `folder` loaded (`PeftModel.from_pretrained`), merged and frozen.

    Raises:
        ValueError: the adapter's task is not the teacher's head's, it cannot be merged (prompt learning), or some of
            its weights do not fit the teacher (missing or unexpected adapter keys).
    """
    field = "teacher_adapter_name_or_path"
    peft = require_peft(field)
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    task = peft_task_type(teacher, "teacher")
    if config.get("task_type") not in (None, task):
        raise ValueError(
            f"{field}={adapter!r} is a {config['task_type']} adapter (task_type in its {ADAPTER_CONFIG}), but the "
            f"teacher ({type(teacher).__name__}) has a {task} head. Use an adapter trained for this task on this base."
        )
    if config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"):
        raise ValueError(
            f"{field}={adapter!r} is a {config['peft_type']} adapter, which merge_and_unload cannot fold into the "
            "teacher's weights. Use a LoRA (or other mergeable) adapter, or a merged teacher as "
            "teacher_model_name_or_path."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wrapped = peft.PeftModel.from_pretrained(teacher, folder, is_trainable=False)
        except (RuntimeError, ValueError) as e:  # size mismatches, targets absent from the teacher
            raise ValueError(
                f"{field}={adapter!r} does not fit the teacher ({type(teacher).__name__}): {e} Use the adapter "
                "trained on teacher_model_name_or_path, with the same architecture and head."
            ) from e
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    with safe_open(os.path.join(folder, ADAPTER_WEIGHTS), framework="pt") as f:
        saved = set(f.keys())
    expected = set(get_peft_model_state_dict(wrapped))
    unexpected = sorted(saved - expected)
    if missing or unexpected:
        raise ValueError(
            f"{field}={adapter!r} does not fit the teacher ({type(teacher).__name__} from its base): "
            + (f"{missing[0]} " if missing else "")
            + (f"adapter weights with no place in the teacher: {unexpected[:5]}. " if unexpected else "")
            + "Use the adapter trained on teacher_model_name_or_path, with the same architecture and head."
        )
    for warning in caught:
        if "missing adapter keys" not in str(warning.message):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    merged = wrapped.merge_and_unload()
    merged.eval().requires_grad_(False)
    logger.info("teacher: %s + adapter %s (%s), merged", type(merged).__name__, adapter, config.get("peft_type"))
    return merged
