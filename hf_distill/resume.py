"""Resuming a run only when it is the same run: the settings that define it are recorded with its checkpoints.

When `scripts/distill.py` starts training it writes `<output_dir>/run_config.json` (atomically), and a copy goes into
every checkpoint. On a restart, `prepare_output_dir` resumes from the last complete checkpoint only if its recorded
settings equal this run's; otherwise it refuses with a list of the differing fields,
`name: checkpoint value -> this run's value`, and the ways out. Checkpoints cut short by a kill while saving (no
readable `trainer_state.json`, which `Trainer` writes last) are never resumed from: they are deleted.

The settings are every field of the script's dataclasses that can change the trained weights, plus the data's row
counts and file sizes and the number of processes; fields that cannot (logging, evaluation, saving, the Hub, data
loader workers, output paths) are left out so that changing them does not block a resume. Secrets (`*_token`) are
never written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# What a previous run left in output_dir besides its checkpoints; `overwrite_output_dir` deletes these too.
RUN_OUTPUTS = (RUN_CONFIG_NAME, "student", "student.tmp")
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

# Fields that cannot change the trained weights: where and how often to log, evaluate and save, the Hub, data loader
# processes, device and distributed plumbing, memory-for-compute trades. Every other field is part of the run.
NOT_RUN_SETTINGS = frozenset(
    {
        # where things go
        "output_dir",
        "teacher_cache_dir",
        "resume_from_checkpoint",
        "resume",
        "overwrite_output_dir",
        # logging and trackers
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "log_on_each_node",
        "logging_nan_inf_filter",
        "include_num_input_tokens_seen",
        "log_level",
        "log_level_replica",
        "disable_tqdm",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "skip_memory_metrics",
        "debug",
        # evaluation
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "per_device_eval_batch_size",
        "prediction_loss_only",
        "eval_on_start",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "eval_accumulation_steps",
        "include_for_metrics",
        "batch_eval_metrics",
        "bf16_full_eval",
        "fp16_full_eval",
        "do_train",
        "do_eval",
        "do_predict",
        # saving and the Hub
        "save_only_model",
        "save_strategy",
        "save_steps",
        "save_on_each_node",
        "save_total_limit",
        "enable_jit_checkpoint",
        "push_to_hub",
        "hub_token",
        "hub_private_repo",
        "hub_model_id",
        "hub_strategy",
        "hub_always_push",
        "hub_revision",
        "restore_callback_states_from_checkpoint",
        # data loader processes, devices, distributed plumbing, memory
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "use_cpu",
        "local_rank",
        "ddp_backend",
        "ddp_timeout",
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "torch_empty_cache_steps",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "use_cache",
    }
)
# Paths that mean the same run whichever directory the script is started from.
PATH_FIELDS = (
    "teacher_model_name_or_path",
    "student_model_name_or_path",
    "tokenizer_name_or_path",
    "teacher_adapter_name_or_path",
    "train_file",
    "validation_file",
)


def _is_secret(name: str) -> bool:
    return name.endswith("_token") or "password" in name or "secret" in name


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, enums and paths strings)."""
    return json.loads(json.dumps(value, default=str))


def run_settings(*args_objects, **extra: Any) -> dict[str, Any]:
    """The settings that define a run, from the script's dataclasses plus derived values.

    Args:
        args_objects: `ModelArguments`, `DataArguments`, `DistillationConfig`, ... instances. A `TrainingArguments`
            contributes its `to_dict()` (enums as values). Fields in `NOT_RUN_SETTINGS` and secrets are left out;
            local paths are made absolute.
        extra: derived settings, e.g. `train_rows=8000, num_processes=2`.

    Returns:
        A flat `dict` field name -> JSON value, sorted by name.
    """
    settings: dict[str, Any] = {}
    for obj in args_objects:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        init_fields = {f.name for f in dataclasses.fields(obj) if f.init}
        for name, value in values.items():
            if name in init_fields and name not in NOT_RUN_SETTINGS and not _is_secret(name):
                settings[name] = value
    for name in PATH_FIELDS:
        value = settings.get(name)
        if isinstance(value, str) and os.path.exists(value):
            settings[name] = os.path.abspath(value)
            if os.path.isfile(value):
                settings[f"{name}_bytes"] = os.path.getsize(value)
    settings.update(extra)
    return _jsonable(dict(sorted(settings.items())))


def setting_defaults(*args_objects) -> dict[str, Any]:
    """The default value (as JSON) of every field of `args_objects`' classes that has one, for `diff_settings`."""
    defaults: dict[str, Any] = {}
    for obj in args_objects:
        for f in dataclasses.fields(obj):
            if not f.init or f.name in NOT_RUN_SETTINGS or _is_secret(f.name):
                continue
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                continue
            defaults[f.name] = getattr(value, "value", value)  # enums as `to_dict()` writes them
    return _jsonable(defaults)


def diff_settings(
    recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """`name: recorded -> current` for every field whose value differs (or that only one side has).

    A field that only `current` has and that is at its default in `defaults` is not a difference: it was added to
    hf-distill after the run was recorded, and a new field's default keeps the behaviour the run had without it
    (so a run recorded before e.g. `ema_teacher` existed can still be resumed, but not with `ema_teacher=true`).
    """
    missing = "<not set>"
    defaults = defaults or {}
    return [
        f"{name}: {recorded.get(name, missing)!r} -> {current.get(name, missing)!r}"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name, missing) != current.get(name, missing)
        and not (name not in recorded and name in defaults and current[name] == defaults[name])
    ]


def write_run_config(directory: str, settings: dict[str, Any]) -> str:
    """Write `{"settings": ...}` to `<directory>/run_config.json` atomically (temp file, then `os.replace`)."""
    import transformers

    from . import __version__

    path = os.path.join(directory, RUN_CONFIG_NAME)
    record = {
        "settings": settings,
        "hf_distill_version": __version__,
        "transformers_version": transformers.__version__,
    }
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_run_config(directory: str) -> dict[str, Any] | None:
    """The settings recorded in `<directory>/run_config.json`, or `None` if there is no readable record."""
    try:
        with open(os.path.join(directory, RUN_CONFIG_NAME), encoding="utf-8") as f:
            return json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` directories of `output_dir`, by increasing step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_RE.match(name))]
    return [
        os.path.join(output_dir, name) for _, name in sorted(found) if os.path.isdir(os.path.join(output_dir, name))
    ]


def is_complete_checkpoint(path: str) -> bool:
    """Whether `Trainer` finished writing `path`: weights, and a readable `trainer_state.json` (written last)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHTS_NAMES):
        return False
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            return "global_step" in json.load(f)
    except (OSError, ValueError):
        return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _ways_out(output_dir: str) -> str:
    return (
        f"To start this run from scratch, pass --resume never --overwrite_output_dir true (deletes the checkpoints, "
        f"{RUN_CONFIG_NAME} and student in {output_dir}), or choose another --output_dir."
    )


def _check_same_run(
    checkpoint: str,
    recorded: dict[str, Any] | None,
    settings: dict[str, Any],
    output_dir: str,
    defaults: dict[str, Any] | None = None,
):
    if recorded is None:
        raise ValueError(
            f"checkpoint {checkpoint} has no readable {RUN_CONFIG_NAME} (neither in it nor next to it), so hf-distill "
            f"cannot check that it is a checkpoint of this run. {_ways_out(output_dir)}"
        )
    differences = diff_settings(recorded, settings, defaults)
    if differences:
        raise ValueError(
            f"refusing to resume from {checkpoint}: it was trained with other settings "
            f"(checkpoint value -> this run's value):\n  " + "\n  ".join(differences) + f"\n{_ways_out(output_dir)} "
            "To continue the checkpoint's run instead, run again with its settings."
        )


def prepare_output_dir(
    output_dir: str,
    settings: dict[str, Any],
    *,
    resume: str = "auto",
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: str | None = None,
    is_main_process: bool = True,
    defaults: dict[str, Any] | None = None,
) -> str | None:
    """Decide whether this run resumes, clean up `output_dir` accordingly and record the run's settings.

    Args:
        output_dir: the run's `output_dir`.
        settings: from `run_settings`.
        resume: `"auto"` resumes from the last complete checkpoint if its settings equal `settings`, and raises a
            ValueError listing the differing fields otherwise; `"never"` starts from scratch and raises if
            `output_dir` holds checkpoints (unless `overwrite_output_dir`).
        overwrite_output_dir: delete the checkpoints and outputs (`run_config.json`, `student`) of a previous run
            first, then start from scratch.
        resume_from_checkpoint: an explicit checkpoint; its recorded settings are checked the same way.
        is_main_process: only the main process deletes and writes; the others (run after it, e.g. under
            `TrainingArguments.main_process_first`) come to the same decision.
        defaults: from `setting_defaults`: fields added to hf-distill since the checkpoint was recorded, left at
            their defaults, do not block resuming it.

    Returns:
        The checkpoint to pass to `Trainer.train(resume_from_checkpoint=...)`, or `None` to start from scratch.
    """
    if resume_from_checkpoint and (overwrite_output_dir or resume == "never"):
        given = "overwrite_output_dir=true" if overwrite_output_dir else "resume='never'"
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} asks to resume but {given} asks to start from "
            "scratch. Drop one of them."
        )
    found = list_checkpoints(output_dir)
    if overwrite_output_dir:
        old = [path for path in found + [os.path.join(output_dir, n) for n in RUN_OUTPUTS] if os.path.lexists(path)]
        if is_main_process and old:
            logger.warning("overwrite_output_dir: deleting %s", ", ".join(old))
            for path in old:
                _remove(path)
        found = []
    elif resume_from_checkpoint:
        checkpoint = resume_from_checkpoint
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(
                f"resume_from_checkpoint={checkpoint!r} does not exist. Pass a checkpoint-<step> directory written by "
                "a previous run, or leave it unset to resume from the last checkpoint in output_dir."
            )
        if not is_complete_checkpoint(checkpoint):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} is incomplete (no weights or no readable {TRAINER_STATE_NAME}"
                ": the run was probably killed while saving it). Resume from an earlier checkpoint."
            )
        recorded = read_run_config(checkpoint) or read_run_config(os.path.dirname(os.path.abspath(checkpoint)))
        _check_same_run(checkpoint, recorded, settings, output_dir, defaults)
        if found and os.path.abspath(os.path.dirname(os.path.abspath(checkpoint))) != os.path.abspath(output_dir):
            _check_same_run(
                found[-1], read_run_config(found[-1]) or read_run_config(output_dir), settings, output_dir, defaults
            )
        if is_main_process:
            write_run_config(output_dir, settings)
        logger.info("resuming from %s (same settings)", checkpoint)
        return checkpoint
    elif found and resume == "never":
        raise ValueError(
            f"resume='never' but output_dir={output_dir!r} already holds checkpoints "
            f"({', '.join(os.path.basename(p) for p in found)}). Pass --overwrite_output_dir true to delete them and "
            "start over, --resume auto to continue that run if it has this run's settings, or another --output_dir."
        )

    complete = [path for path in found if is_complete_checkpoint(path)]
    if found:
        # Checked before anything is deleted: a different run's folder is left exactly as it was.
        last = complete[-1] if complete else found[-1]
        _check_same_run(last, read_run_config(last) or read_run_config(output_dir), settings, output_dir, defaults)
    incomplete = [path for path in found if path not in complete]
    if incomplete and is_main_process:
        logger.warning("deleting incomplete checkpoint(s) (killed while saving?): %s", ", ".join(incomplete))
        for path in incomplete:
            _remove(path)
    if is_main_process:
        write_run_config(output_dir, settings)
    if complete:
        logger.info("resuming from %s (same settings)", complete[-1])
        return complete[-1]
    return None


class RunConfigCallback(TrainerCallback):
    """Copies the run's settings into every checkpoint, so that a checkpoint moved elsewhere can still be checked."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(checkpoint):
            write_run_config(checkpoint, self.settings)
