"""`DistillationTrainer`: a `transformers.Trainer` that trains a student on a weighted sum of distillation terms."""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from .cache import (
    TeacherCache,
    TeacherCacheCollator,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    cached_teacher_features,
    has_cached_teacher,
)
from .config import DistillationConfig, LayerMatch
from .features import check_attention_compatible, forward_with_features
from .layer_mapping import build_layer_matches, build_projections, hidden_size
from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES
from .losses.task import task_loss
from .student import num_layers

logger = logging.get_logger(__name__)

PROJECTIONS_NAME = "projections.pt"
TERMS = ("task", "logits", "hidden", "embeddings", "attention")
# Index of each count in the tensor `_get_num_items_in_batch` returns for a gradient-accumulation window.
ROWS, LABELS, TOKENS = 0, 1, 2
SAMPLE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "a gorgeous, witty, seductive movie", "not good"]


def forward_arg_names(model: nn.Module) -> set[str]:
    """Names a model's forward accepts (the inputs worth passing to it)."""
    return set(inspect.signature(model.forward).parameters)


class DistillationTrainer(Trainer):
    """Trains `model` (the student) to imitate a frozen `teacher_model`.

    The loss is `sum_k args.<k>_weight * loss_k` over the terms task, logits, hidden, embeddings and attention (see
    [`DistillationConfig`]); each term is logged on its own as `loss_<k>` (and `eval_loss_<k>`). Intermediate-layer
    terms pair layers by `args.layer_mapping` into `LayerMatch` records (`self.layer_matches`). When teacher and
    student widths differ, one learned linear projection per hidden-state pairing (`self.projections`) maps the
    student into the teacher's space: the projections are trained with the student (they are in the optimizer and
    in every checkpoint, so a resume restores them) but are never part of the saved student.

    The teacher is frozen, in eval mode, run under `torch.no_grad()`, never in the optimizer, never wrapped in DDP,
    and placed on the student's device (in `args.teacher_dtype` if set). The trainer takes the teacher over: these
    changes (eval mode, frozen, device, dtype) are made to the object passed in, not to a copy, to save its memory.

    Args:
        model: the student, a `PreTrainedModel` (e.g. from `make_student(teacher)`).
        teacher_model: the teacher, a `PreTrainedModel` of the same tokenizer and label set.
        args: a [`DistillationConfig`].
        teacher_processing_class: the teacher's tokenizer, if it was loaded separately; it must tokenize like
            `processing_class`, which is checked on sample texts before training.
        Other arguments are those of `transformers.Trainer`.
    """

    _tag_names = ["hf-distill", "distillation"]

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        teacher_model: PreTrainedModel | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="distillation-output")
        if not isinstance(args, DistillationConfig):
            raise ValueError(
                f"args must be a DistillationConfig, got {type(args).__name__}. "
                "Use DistillationConfig(output_dir=..., ...), which accepts every TrainingArguments field."
            )
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs both model (the student) and teacher_model.")
        if args.teacher_dtype is not None:
            if args.teacher_dtype != "auto":
                teacher_model = teacher_model.to(getattr(torch, args.teacher_dtype))
        _preflight_models(teacher_model, model, args)
        _preflight_tokenizers(processing_class, teacher_processing_class)
        _preflight_segment_ids(train_dataset, processing_class, teacher_model, model)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # Every term is normalised over the gradient-accumulation window by the counts from
        # `_get_num_items_in_batch`, so the Trainer must not divide by the number of accumulation steps again.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True  # makes the Trainer call `_get_num_items_in_batch` for us

        self.teacher = teacher_model
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.teacher.to(self.args.device)

        self.layer_matches: list[LayerMatch] = []
        if args.needs_layer_mapping:
            self.layer_matches = build_layer_matches(
                args.layer_mapping,
                num_layers(self.teacher),
                num_layers(model),
                hidden_loss=args.hidden_loss if args.hidden_weight > 0 else None,
                attention_loss=args.attention_loss if args.attention_weight > 0 else None,
            )
        if args.attention_weight > 0:
            check_attention_compatible(self.teacher, model)
        self.projections = build_projections(
            self.layer_matches,
            hidden_size(model.config),
            hidden_size(self.teacher.config),
            embeddings=args.embeddings_weight > 0,
        ).to(self.args.device)
        if len(self.projections):
            self.add_callback(_ZeroProjectionGrads(self.projections))
        if len(self.projections) and self.is_deepspeed_enabled:
            raise ValueError(
                "the student (width "
                f"{hidden_size(model.config)}) and teacher (width {hidden_size(self.teacher.config)}) differ in "
                "width, so hidden/embedding matching needs trainer-owned projections, which DeepSpeed does not "
                "manage. Use DDP or FSDP, a student of the teacher's width (make_student keeps it), or set "
                "hidden_weight=0 and embeddings_weight=0."
            )
        self._teacher_inputs = forward_arg_names(self.teacher)
        self._student_inputs = forward_arg_names(model)
        self._shift_labels = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.teacher_cache: TeacherCache | None = None
        if args.use_teacher_cache and self.train_dataset is not None:
            self.teacher_cache = self._attach_teacher_cache()

    # ---------------------------------------------------------------- data plumbing
    def _attach_teacher_cache(self) -> TeacherCache | None:
        """Build or look up the teacher cache of train_dataset; train from it (see `hf_distill.cache`)."""
        args = self.args
        if not isinstance(self.train_dataset, Dataset):
            raise ValueError(
                f"use_teacher_cache=True needs train_dataset to be a datasets.Dataset, got "
                f"{type(self.train_dataset).__name__}. Pass a datasets.Dataset or set use_teacher_cache=False."
            )
        if not any(getattr(args, f"{t}_weight") > 0 for t in TERMS if t != "task"):
            return None  # nothing of the teacher's is used
        spec = TeacherCacheSpec(
            logits=args.logits_weight > 0,
            top_k=args.teacher_cache_top_k,
            hidden_layers=[m.teacher_layer for m in self.layer_matches if m.feature == "hidden"],
            attention_layers=[m.teacher_layer for m in self.layer_matches if m.feature == "attention"],
            embeddings=args.embeddings_weight > 0,
            dtype=args.teacher_cache_dtype,
        )
        # The collator gets, at train time, the columns `remove_unused_columns` keeps: the build collates the same,
        # so the cached teacher sees every input the collator makes of them (an attention_mask it adds, ...).
        columns = list(self.train_dataset.column_names)
        if args.remove_unused_columns:
            self._set_signature_columns_if_needed()
            columns = [c for c in columns if c in self._signature_columns]
            self._signature_columns = None  # recomputed with the cache's columns once the cache exists
        with args.main_process_first(desc="teacher cache"):
            cache = build_teacher_cache(
                self.teacher,
                self.train_dataset,
                self.data_collator,
                cache_dir=args.teacher_cache_dir or os.path.join(args.output_dir, "teacher_cache"),
                spec=spec,
                tokenizer=self.processing_class,
                batch_size=args.per_device_eval_batch_size,
                columns=columns,
            )
        # The cache was keyed by this very dataset's contents, so attaching it needs no second hash.
        self.train_dataset = attach_teacher_cache(self.train_dataset, cache, verify=False)
        self.data_collator = TeacherCacheCollator(self.data_collator, cache.layouts, cache.padding_side)
        return cache

    def _set_signature_columns_if_needed(self):
        # Keep what either model consumes: `remove_unused_columns` would otherwise drop columns only the teacher
        # reads (e.g. token_type_ids for a BERT teacher of a DistilBERT student), and the teacher cache's columns.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            teacher_columns = forward_arg_names(self.teacher) if hasattr(self, "teacher") else set()
            cache = getattr(self, "teacher_cache", None)
            cache_columns = list(cache.layouts) if cache is not None else []
            self._signature_columns = list(
                dict.fromkeys([*self._signature_columns, *sorted(teacher_columns), *cache_columns])
            )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Counts over the whole gradient-accumulation window: rows, labelled items and real tokens.

        Every term divides its sum by the matching count, so the micro-batch losses add up to the exact window mean
        (and, with `average_tokens_across_devices`, the exact mean over all processes).
        """
        if not batch_samples:
            return None
        counts = torch.zeros(3, dtype=torch.long)
        for batch in batch_samples:
            input_ids = batch["input_ids"]
            counts[ROWS] += input_ids.shape[0]
            mask = batch.get("attention_mask")
            counts[TOKENS] += int(mask.sum()) if mask is not None else input_ids.numel()
            labels = batch.get("labels")
            if labels is not None:
                if labels.is_floating_point():
                    counts[LABELS] += labels.shape[0]
                else:
                    counts[LABELS] += int((labels[..., 1:] if self._shift_labels else labels).ne(-100).sum())
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).view(-1, 3).sum(0)
        return counts

    # ---------------------------------------------------------------- the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        args = self.args
        labels = inputs.get("labels")
        mask = inputs.get("attention_mask")
        counts = (
            num_items_in_batch if torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 3 else None
        )
        # Under DDP gradients are averaged over processes; a loss normalised by counts summed over all processes
        # must be scaled back up by their number (as Trainer.compute_loss does).
        scale = self.accelerator.num_processes if counts is not None and args.average_tokens_across_devices else 1

        hidden = [m for m in self.layer_matches if m.feature == "hidden"]
        attention = [m for m in self.layer_matches if m.feature == "attention"]
        embeddings = args.embeddings_weight > 0

        student_inputs = {k: v for k, v in inputs.items() if k in self._student_inputs and k != "labels"}
        student = forward_with_features(
            model,
            student_inputs,
            hidden_layers=sorted({m.student_layer for m in hidden}),
            attention_layers=sorted({m.student_layer for m in attention}),
            embeddings=embeddings,
        )
        s_logits = student.outputs.logits
        needs_teacher = any(getattr(args, f"{t}_weight") > 0 for t in TERMS if t != "task")
        if needs_teacher and has_cached_teacher(inputs):
            teacher = cached_teacher_features(
                inputs,
                num_classes=s_logits.shape[-1],
                logits=args.logits_weight > 0,
                hidden_layers=sorted({m.teacher_layer for m in hidden}),
                attention_layers=sorted({m.teacher_layer for m in attention}),
                embeddings=embeddings,
            )
        elif needs_teacher:
            teacher_inputs = {k: v for k, v in inputs.items() if k in self._teacher_inputs and k != "labels"}
            with torch.no_grad():
                teacher = forward_with_features(
                    self.teacher,
                    teacher_inputs,
                    hidden_layers=sorted({m.teacher_layer for m in hidden}),
                    attention_layers=sorted({m.teacher_layer for m in attention}),
                    embeddings=embeddings,
                )

        token_mask = mask.bool() if mask is not None else None
        micro_tokens = token_mask.sum() if token_mask is not None else inputs["input_ids"].numel()
        n_tokens = counts[TOKENS] if counts is not None else None
        terms: dict[str, torch.Tensor] = {}
        micro: dict[str, torch.Tensor | int] = {}  # this micro-batch's count per term, to log per-batch means
        if args.task_weight > 0 and labels is not None:
            terms["task"] = task_loss(
                s_logits,
                labels,
                shift_labels=self._shift_labels,
                num_items_in_batch=counts[LABELS] if counts is not None else None,
            )
            if counts is not None:
                lab = labels[..., 1:] if self._shift_labels and not labels.is_floating_point() else labels
                micro["task"] = lab.shape[0] if labels.is_floating_point() else lab.ne(-100).sum()
        if args.logits_weight > 0:
            token_level = s_logits.dim() == 3
            terms["logits"] = LOGIT_LOSSES[args.logits_loss](
                s_logits,
                teacher.outputs.logits,
                token_mask if token_level else None,
                temperature=args.temperature,
                num_items_in_batch=(n_tokens if token_level else counts[ROWS]) if counts is not None else None,
            )
            micro["logits"] = micro_tokens if token_level else s_logits.shape[0]
        if hidden:
            terms["hidden"] = _weighted_mean(
                [
                    HIDDEN_LOSSES[m.loss](
                        self._project(m.key, student.hidden_states[m.student_layer]),
                        teacher.hidden_states[m.teacher_layer],
                        token_mask,
                        num_items_in_batch=n_tokens,
                    )
                    for m in hidden
                ],
                [m.weight for m in hidden],
            )
            micro["hidden"] = micro_tokens
        if embeddings:
            terms["embeddings"] = HIDDEN_LOSSES[args.hidden_loss](
                self._project("embeddings", student.embeddings),
                teacher.embeddings,
                token_mask,
                num_items_in_batch=n_tokens,
            )
            micro["embeddings"] = micro_tokens
        if attention:
            terms["attention"] = _weighted_mean(
                [
                    ATTENTION_LOSSES[m.loss](
                        student.attentions[m.student_layer],
                        teacher.attentions[m.teacher_layer],
                        token_mask,
                        num_items_in_batch=n_tokens,
                    )
                    for m in attention
                ],
                [m.weight for m in attention],
            )
            micro["attention"] = micro_tokens

        if not terms:
            raise ValueError(
                "no loss term could be computed for this batch: task_weight > 0 needs a 'labels' column and every "
                "other weight is 0. Add labels or set logits_weight > 0."
            )
        loss = sum(getattr(args, f"{name}_weight") * value for name, value in terms.items()) * scale

        mode = "train" if model.training else "eval"
        for name, value in terms.items():
            # Log the micro-batch mean of each term, whatever the accumulation window's normaliser was.
            if counts is not None:
                total = counts[{"task": LABELS, "logits": ROWS if s_logits.dim() == 2 else TOKENS}.get(name, TOKENS)]
                value = value * total / micro[name]
            self._metrics[mode][f"loss_{name}"].append(float(value.detach()))

        if return_outputs:
            outputs = student.outputs
            # prediction_step hands every output but the loss to compute_metrics: keep the logits only.
            for key in ("hidden_states", "attentions"):
                if key in outputs:
                    outputs[key] = None
            outputs["loss"] = loss
            return loss, outputs
        return loss

    def _project(self, key: str, student_features: torch.Tensor) -> torch.Tensor:
        if key in self.projections:
            layer = self.projections[key]
            return layer(student_features.to(layer.weight.dtype))
        return student_features

    # ---------------------------------------------------------------- projections: optimizer, DDP, checkpoints
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if len(self.projections):
            params = list(self.projections.parameters())
            already = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in already for p in params):
                optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if len(self.projections) and self.accelerator.num_processes > 1:
            # The projections live outside the DDP-wrapped student, so DDP does not average their gradients.
            # Averaging the accumulated gradient after every micro-step is exact (averaging is linear).
            for p in self.projections.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes
        return loss

    def _clip_grad_norm(self, model):
        # The Trainer clips the student's gradients; the projections, outside the student, are clipped on their own.
        norm = super()._clip_grad_norm(model)
        if len(self.projections):
            nn.utils.clip_grad_norm_(self.projections.parameters(), self.args.max_grad_norm)
        return norm

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if len(self.projections) and self.args.should_save:
            tmp = os.path.join(output_dir, PROJECTIONS_NAME + ".tmp")
            torch.save({"layer_matches": [m.key for m in self.layer_matches], **self.projections.state_dict()}, tmp)
            os.replace(tmp, os.path.join(output_dir, PROJECTIONS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not len(self.projections):
            return
        path = os.path.join(checkpoint, PROJECTIONS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint={checkpoint!r} has no {PROJECTIONS_NAME}, but this run learns projections "
                f"({list(self.projections)}). Resume from a checkpoint of the same recipe."
            )
        state = torch.load(path, map_location=self.args.device, weights_only=True)
        state.pop("layer_matches", None)
        self.projections.load_state_dict(state)

    # ---------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)  # in place: `evaluate()` returns this same dict, so eval_loss_<term> reaches its caller
        super().log(logs, start_time)
        self._metrics[mode].clear()


class _ZeroProjectionGrads(TrainerCallback):
    """The Trainer zeroes the student's gradients after each optimizer step; the projections need the same."""

    def __init__(self, projections: nn.ModuleDict):
        self.projections = projections

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)


def _weighted_mean(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def _preflight_models(teacher: PreTrainedModel, student: PreTrainedModel, args: DistillationConfig) -> None:
    """Checks that need only the two models, before any data is touched."""
    t_vocab, s_vocab = getattr(teacher.config, "vocab_size", None), getattr(student.config, "vocab_size", None)
    if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
        raise ValueError(
            f"vocab_size differs: teacher {t_vocab}, student {s_vocab}. Teacher and student read the same token ids, "
            "so they must share a tokenizer: build the student with make_student(teacher) or pick a student of the "
            "teacher's family."
        )
    t_head, s_head = type(teacher).__name__, type(student).__name__
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
    if args.logits_weight > 0 and (t_head.endswith("Model") or s_head.endswith("Model")):
        raise ValueError(
            f"logits_weight={args.logits_weight} needs models with a head, got teacher {t_head} and student {s_head}. "
            "Load task models (e.g. AutoModelForSequenceClassification) or set logits_weight=0."
        )


def _preflight_segment_ids(dataset, tokenizer, teacher: PreTrainedModel, student: PreTrainedModel) -> None:
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


def _preflight_tokenizers(student_tok, teacher_tok) -> None:
    if student_tok is None or teacher_tok is None or student_tok is teacher_tok:
        return
    for text in SAMPLE_TEXTS:
        s_ids, t_ids = student_tok(text)["input_ids"], teacher_tok(text)["input_ids"]
        if s_ids != t_ids:
            raise ValueError(
                f"teacher_processing_class and processing_class tokenize {text!r} differently ({t_ids} vs {s_ids}). "
                "Teacher and student must share one tokenizer: pass the teacher's tokenizer as processing_class."
            )
