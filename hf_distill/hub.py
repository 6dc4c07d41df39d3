"""Publishing: the student folder (an allow-list of files, written atomically), its model card, and its push.

A published student is what `from_pretrained` needs and nothing else: safetensors weights, config, tokenizer files and
the model card. Training arguments (they hold `hub_token`), optimizer state, the projections and the teacher belong to
the run's checkpoints and never reach the student folder or the Hub.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any

from .files import replace_folder
from .trainer import PROJECTIONS_NAME

logger = logging.getLogger(__name__)

# Every file a student folder may hold: what `save_pretrained` writes for a model (safetensors only) and for the
# tokenizers transformers ships, plus the card. `model-00001-of-00003.safetensors` shards match SHARD_PATTERN.
ALLOWED_FILES = frozenset(
    {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The one sub-folder a student folder may hold: its ONNX exports (`hf_distill.deploy_run`, `--deploy_variants`).
ONNX_FOLDER = "onnx"
ALLOWED_ONNX_FILES = frozenset({"model.onnx", "model_int8.onnx", "model_int8_static.onnx"})
# Named in errors as training-only: the trainer's projections, optimizer/scheduler state, arguments, the teacher.
TRAINING_ONLY_PATTERN = re.compile(
    rf"({re.escape(PROJECTIONS_NAME)}|projections.*|optimizer.*|scheduler.*|training_args.*|trainer_state\.json|"
    r"rng_state.*|teacher.*|ema_teacher.*|.*\.bin|.*\.pt|.*\.pth|.*\.pkl)"
)
HUB_ID_PATTERN = re.compile(r"[\w.-]+/[\w.-]+|[\w.-]+")
KD_PAPER = "https://arxiv.org/abs/1503.02531"  # Hinton et al. 2015, Distilling the Knowledge in a Neural Network


def is_allowed_file(name: str) -> bool:
    """Whether a file name (`onnx/<file>` inside the ONNX folder) may be part of a published student (see
    `ALLOWED_FILES`, `ALLOWED_ONNX_FILES`)."""
    folder, _, file = name.rpartition("/")
    if folder:
        return folder == ONNX_FOLDER and file in ALLOWED_ONNX_FILES
    return name in ALLOWED_FILES or SHARD_PATTERN.fullmatch(name) is not None


def publishable_files(folder: str | os.PathLike, *, token: str | None = None) -> list[str]:
    """The files of a student folder that a push uploads; raises if the folder holds anything else, or the token.

    Raises:
        FileNotFoundError: `folder` has no `config.json` (not a saved model).
        ValueError: an entry is not on the allow-list (sub-folders, `*.bin`, `training_args.bin`, optimizer state,
            projections, ...), or a file contains `token`.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{folder!r} has no config.json: pass the student folder written by save_student (<output_dir>/student)."
        )
    names = sorted(os.listdir(folder))
    onnx_dir = os.path.join(folder, ONNX_FOLDER)
    if os.path.isdir(onnx_dir):  # the ONNX exports: model.onnx and its int8 variants, nothing else
        names.remove(ONNX_FOLDER)
        inside = sorted(os.listdir(onnx_dir))
        names += [f"{ONNX_FOLDER}/{n}" for n in inside]
    bad = [name for name in names if not (is_allowed_file(name) and os.path.isfile(os.path.join(folder, name)))]
    if bad:
        training = [name for name in bad if TRAINING_ONLY_PATTERN.fullmatch(name)]
        raise ValueError(
            f"{folder!r} holds files a student push never uploads: {bad}"
            + (f" (training-only files {training})" if training else "")
            + ". Only safetensors weights, config, tokenizer files, README.md and onnx/ (model.onnx and its int8 "
            "variants) are published: push the folder "
            "written by save_student (<output_dir>/student), not a checkpoint or the output_dir."
        )
    if token:
        secret = token.encode()
        leaked = [name for name in names if secret in _read_bytes(os.path.join(folder, name))]
        if leaked:
            raise ValueError(
                f"{folder!r}: {leaked} contain the Hub token; refusing to push. Remove the token from these files "
                "(a student folder never needs it) and save the student again."
            )
    return names


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def save_student(model, tokenizer, folder: str | os.PathLike, card: str, *, state_dict: dict | None = None) -> str:
    """Write the student folder: safetensors weights, config, tokenizer files and `README.md`, and nothing else.

    Everything is written into `<folder>.tmp` first and renamed into place, so `folder` never holds a half-written
    student; a previous student there is replaced. Files `save_pretrained` writes that are not on the allow-list
    (`ALLOWED_FILES`) are dropped with a warning. Call it on the main process only.

    Args:
        model: the student (unwrapped: a `PreTrainedModel`).
        tokenizer: its tokenizer (or `None`).
        folder: the student folder, e.g. `<output_dir>/student`.
        card: the model card (Markdown with YAML front matter), see [`model_card`].
        state_dict: the full state dict to save instead of `model.state_dict()` (gathered under FSDP / ZeRO-3).

    Returns:
        The folder, as a string.
    """
    folder = os.path.abspath(os.fspath(folder))
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
    try:
        # transformers 5 writes safetensors only; the check below refuses anything else anyway.
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        dropped = [name for name in sorted(os.listdir(tmp)) if not is_allowed_file(name)]
        for name in dropped:
            path = os.path.join(tmp, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if dropped:
            logger.warning("student folder: not kept (not on the allow-list of a published student): %s", dropped)
        if not any(name.endswith(".safetensors") for name in os.listdir(tmp)):
            raise ValueError(f"saving the student wrote no safetensors weights in {tmp!r}; nothing would load.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, folder)  # the old one moves aside first: `folder` is complete or absent
    return folder


def save_student_from_trainer(trainer, folder: str | os.PathLike, card: str) -> str:
    """[`save_student`] for a trained `Trainer`: call it on every process.

    The full state dict is gathered through the trainer's accelerator (a collective under FSDP and DeepSpeed ZeRO-3,
    hence on every process); only the main process writes. Processes wait for the write before returning.
    """
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_student(model, trainer.processing_class, folder, card, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return os.path.abspath(os.fspath(folder))


def is_hub_id(name: str | None) -> bool:
    """`org/name` or `name` that is not a local path: what the Hub accepts as `base_model`."""
    if not name or os.path.exists(name) or name.startswith((".", "~", "/")):
        return False
    return HUB_ID_PATTERN.fullmatch(name) is not None


def _sparse_teacher(args: Any) -> str:
    """How the logit term sees the teacher when it is the sparse KL (`teacher_cache_top_k_tail`), else ``""``."""
    if not getattr(args, "teacher_cache_top_k_tail", False):
        return ""
    return f", the teacher as its top-{args.teacher_cache_top_k} probabilities plus the tail mass (sparse KL)"


def _divergence_parameter(args: Any) -> str:
    """The logit divergence's own parameter, as the card states it (``""`` for divergences without one)."""
    loss = getattr(args, "logits_loss", None)
    if loss == "generalized_jsd":
        return f" (beta = {getattr(args, 'jsd_beta', None)}, the teacher's weight in the mixture, TRL's convention)"
    if loss in ("skew_kl", "skew_reverse_kl"):
        return f" (alpha = {getattr(args, 'skew_alpha', None)})"
    return ""


def _fused(args: Any) -> str:
    if not getattr(args, "fused_lm_head", False):
        return ""
    return ", computed from both models' last hidden states and LM heads in chunks (fused)"


def loss_terms(args: Any) -> list[tuple[str, float, str]]:
    """`(term, weight, what)` for each loss term of a [`DistillationConfig`] with a non-zero weight."""
    mapping = f"teacher->student layer mapping `{getattr(args, 'layer_mapping', None)}`"
    pair = getattr(args, "relation_layer", None) or "last->last"
    described = {
        "task": "task loss on the labels",
        "logits": f"{getattr(args, 'logits_loss', None)}{_divergence_parameter(args)} at temperature "
        f"{_configured(args, 'temperature')} between teacher and student logits ([Hinton et al. 2015]({KD_PAPER}))"
        f"{_sparse_teacher(args)}{_fused(args)}",
        "hidden": f"{getattr(args, 'hidden_loss', None)} between hidden states, {mapping}",
        "embeddings": f"{getattr(args, 'hidden_loss', None)} between embedding outputs",
        "attention": f"{getattr(args, 'attention_loss', None)} between attention probabilities, {mapping}",
        "relation": f"{getattr(args, 'relation_loss', None)} between the batch's "
        f"{getattr(args, 'relation_pooling', None)}-pooled representations of block pair {pair} (relation-based KD)",
        "minilm": f"KL between the self-attention relations {getattr(args, 'minilm_relations', None)} "
        f"({getattr(args, 'minilm_relation_heads', None)} relation heads) of block pair "
        f"{getattr(args, 'minilm_layer', None) or 'last->last'} ([MiniLM](https://arxiv.org/abs/2002.10957), "
        "[MiniLMv2](https://arxiv.org/abs/2012.15828))",
    }
    if (getattr(args, "teacher_noise_std", 0) or 0) > 0:
        described["logits"] += (
            f"; noisy teacher: {args.teacher_noise_mode} Gaussian noise of std {args.teacher_noise_std} on the "
            f"teacher's logits of {args.teacher_noise_fraction:.0%} of the rows, in training"
        )
    if getattr(args, "ema_teacher", False):  # self-distillation: hf_distill.ema_teacher
        warm_up = f", a copy of the student through step {args.ema_start_step}" if args.ema_start_step else ""
        for term in described.keys() - {"task"}:
            described[term] += (
                f"; the teacher is an exponential moving average of the student (decay {args.ema_decay}{warm_up}; "
                "[mean teacher](https://arxiv.org/abs/1703.01780))"
            )
    schedules = getattr(args, "schedules", None) or []
    terms = []
    for term, what in described.items():
        weight = _configured(args, f"{term}_weight") or 0
        fields_ = (f"{term}_weight", "temperature") if term == "logits" else (f"{term}_weight",)
        scheduled = [_describe_schedule(s) for s in schedules if _scheduled_field(s) in fields_]
        if weight > 0 or any(_scheduled_field(s) == f"{term}_weight" for s in schedules):  # a weight from 0 up
            terms.append((term, float(weight), what + "".join(f"; scheduled: {s}" for s in scheduled)))
    return terms


def _configured(args: Any, field: str) -> Any:
    """`args.<field>` as configured: a scheduled field's schedule start value, not the value the schedule callback
    left in `args` after the last step (the card is written after training)."""
    for entry in getattr(args, "schedules", None) or []:
        if _scheduled_field(entry) == field:
            from .schedules import parse_schedule

            return parse_schedule(entry).start
    return getattr(args, field, None)


def _describe_schedule(entry: Any) -> str:
    from .schedules import parse_schedule

    s = parse_schedule(entry)
    steps = f"steps {s.start_step}-{s.end_step if s.end_step is not None else 'end'}"
    return f"{s.field} {s.start:g} -> {s.end:g} ({s.kind}, {steps})"


def _scheduled_field(entry: Any) -> str | None:
    """The field a `schedules` entry changes (a mapping's `field`, or `field=...` in a `key=value` string)."""
    if isinstance(entry, dict):
        return entry.get("field")
    for pair in str(entry).split():
        key, _, value = pair.partition("=")
        if key == "field":
            return value
    return None


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def model_card(
    *,
    teacher: str,
    recipe: str,
    dataset: str,
    student_params: int,
    teacher_params: int,
    metrics: dict[str, float] | None = None,
    base_model: str | None = None,
    dataset_id: str | None = None,
    distillation: Any | None = None,
    model_name: str | None = None,
) -> str:
    """Model card of a distilled student: YAML front matter (parsed by `huggingface_hub.ModelCard`) and a body stating
    teacher, recipe, dataset, teacher and student accuracy, accuracy kept, parameters, measured speed-up, loss terms.

    Args:
        teacher: the teacher as given (a Hub id or a local directory).
        recipe: the recipe file (or "command line").
        dataset: the data trained on, as given (a Hub dataset or a local file).
        student_params / teacher_params: parameter counts.
        metrics: `teacher_accuracy`, `student_accuracy` and `speedup_batch32` (measured, never assumed); missing
            figures are written as "not measured".
        base_model: the `base_model` of the front matter; default: `teacher` when it is a Hub id. A local teacher
            gives no `base_model` (the Hub refuses one that is not a model id).
        dataset_id: a Hub dataset id for the `datasets` field (and the `model-index` results), when trained on one.
        distillation: the run's [`DistillationConfig`]; its non-zero loss terms are listed with their weights.
        model_name: the student's name in `model-index` (e.g. the Hub repo id).
    """
    from huggingface_hub import EvalResult, ModelCardData

    metrics = metrics or {}

    def fmt(key: str, pattern: str) -> str:
        return pattern.format(metrics[key]) if metrics.get(key) is not None else "not measured"

    kept = None
    if metrics.get("teacher_accuracy") and metrics.get("student_accuracy") is not None:
        kept = 100.0 * metrics["student_accuracy"] / metrics["teacher_accuracy"]
    base_model = base_model or (teacher if is_hub_id(teacher) else None)
    name = model_name or f"student distilled from {teacher}"
    eval_results = None
    if dataset_id and metrics.get("student_accuracy") is not None:
        eval_results = [
            EvalResult(
                task_type="text-classification",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                metric_type="accuracy",
                metric_value=float(metrics["student_accuracy"]),
            )
        ]
    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["hf-distill", "distillation", "knowledge-distillation"],
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# Student distilled from `{teacher}`",
        "",
        f"Distilled with hf-distill from the teacher `{teacher}` using the recipe `{recipe}` on `{dataset}`. It loads "
        "with plain `transformers` (`AutoModelForSequenceClassification.from_pretrained`), weights in safetensors.",
        "",
        "| | teacher | student |",
        "|---|---|---|",
        f"| parameters | {_params(teacher_params)} | {_params(student_params)} "
        f"({100.0 * student_params / teacher_params:.0f}% of the teacher) |",
        f"| accuracy | {fmt('teacher_accuracy', '{:.4f}')} | {fmt('student_accuracy', '{:.4f}')} |",
        "",
        f"- Accuracy kept: {f'{kept:.1f}%' if kept is not None else 'not measured'} of the teacher's.",
        f"- Measured speed-up over the teacher at batch 32: {fmt('speedup_batch32', '{:.2f}x')} (median latency of "
        "the same real rows, both models timed in turn).",
        "",
    ]
    if distillation is not None:
        terms = loss_terms(distillation)
        lines += [
            "## Distillation objective",
            "",
            "loss = " + " + ".join(f"{weight:g} · loss_{term}" for term, weight, _ in terms),
            "",
            "| term | weight | loss |",
            "|---|---|---|",
            *(f"| {term} | {weight:g} | {what} |" for term, weight, what in terms),
            "",
        ]
    return "\n".join(lines)


def count_parameters(model) -> int:
    """Parameters of `model`, whole even when DeepSpeed ZeRO-3 has partitioned them (`ds_numel` is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def student_card(
    *,
    model_args,
    data_args,
    training_args,
    student,
    teacher,
    metrics: dict[str, float] | None = None,
    recipe_path: str | None = None,
    model_name: str | None = None,
) -> str:
    """[`model_card`] of a `scripts/distill.py` run, from its argument dataclasses and models.

    Local paths (recipe, data file, a local teacher) are shown relative to the repository holding the recipe when
    they lie in or next to it (`recipes/x.yaml`, `../shared/data/sst2/train.tsv`), so the card holds no path of this
    machine that the user did not type.
    """
    from .recipes import display_path, recipe_root

    root = recipe_root(recipe_path) if recipe_path else os.getcwd()

    def shown(path: str) -> str:
        return display_path(os.path.abspath(path), root) if os.path.exists(path) else path

    if data_args.train_file:
        dataset, dataset_id = shown(data_args.train_file), None
    else:
        dataset_id = data_args.dataset_name
        dataset = "/".join(part for part in (data_args.dataset_name, data_args.dataset_config) if part)
    return model_card(
        teacher=shown(model_args.teacher_model_name_or_path),
        recipe=shown(recipe_path) if recipe_path else "command line",
        dataset=dataset,
        dataset_id=dataset_id,
        student_params=count_parameters(student),
        teacher_params=count_parameters(teacher),
        metrics=metrics,
        distillation=training_args,
        model_name=model_name,
    )


def push_student(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    api=None,
    commit_message: str = "Upload distilled student (hf-distill)",
) -> str:
    """Upload the student folder's allow-listed files (weights, config, tokenizer, model card) to the Hub.

    The folder is checked first with [`publishable_files`]: anything else in it (training arguments, optimizer
    state, projections, `*.bin`, sub-folders) or a file containing `token` refuses the push before any request. The
    files are sent by name in one commit, so nothing added to the folder meanwhile goes with them.

    Returns:
        The commit URL.
    """
    folder = os.fspath(folder)
    # The token the upload will use: the given one, else HF_TOKEN (HfApi's own fallback); neither may be uploaded.
    names = publishable_files(folder, token=token or os.environ.get("HF_TOKEN"))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in names]
    info = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    return str(getattr(info, "commit_url", info))
