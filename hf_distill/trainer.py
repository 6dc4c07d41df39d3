"""`DistillationTrainer`: a `transformers.Trainer` that trains a student on a weighted sum of distillation terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, set_seed
from transformers.trainer_utils import number_of_arguments
from transformers.utils import logging

from .cache import TeacherCache, cached_teacher_features, has_cached_teacher
from .config import DistillationConfig, LayerMatch
from .ema_teacher import EMATeacherCallback, EMATeacherMixin, check_ema_engine, ema_teacher_for
from .features import check_attention_compatible, forward_with_features
from .layer_mapping import build_layer_matches, build_projections, hidden_size
from .logit_term import (
    check_fused_lm_head,
    check_sparse_temperature,
    fused_logit_term,
    fused_task_term,
    last_hidden_states,
    logit_term,
    logits_from_hidden,
    no_positions,
)
from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, KD_LOGIT_LOSSES, MULTI_LABEL_LOGIT_LOSSES
from .losses.task import task_loss
from .minilm_term import build_minilm_term, capture_qkv, minilm_term
from .multi_teacher import MultiTeacherMixin, split_teachers
from .noisy_teacher import TeacherNoise
from .on_policy import OnPolicyMixin
from .placement import prepare_teacher, teacher_placement
from .preflight import (
    SAMPLE_TEXTS,
    forward_arg_names,
    preflight_models,
    preflight_problem_type,
    preflight_segment_ids,
    preflight_tokenizers,
)
from .projections import PROJECTIONS_NAME, ZeroProjectionGrads
from .relation_term import build_relation_term, relation_layers, relation_term
from .schedules import TermSchedules, parse_schedules
from .student import num_layers
from .tasks import (
    MULTI_LABEL,
    is_causal_lm,
    is_sequence_classifier,
    resolve_problem_type,
)
from .term_metrics import NonFiniteLossError, NonFiniteLossGuard, TermMetrics
from .trainer_counts import (
    KD_POSITIONS,
    LABELS,
    NUM_COUNTS,
    ROWS,
    TOKENS,
    WindowCountsMixin,
    ddp_loss_scale,
    window_counts,
)
from .trainer_data import TeacherDataMixin
from .trainer_logging import TermLoggingMixin
from .trainer_projections import ProjectionsMixin
from .trainer_search import SearchRunsMixin

logger = logging.get_logger(__name__)

TERMS = ("task", "logits", "hidden", "embeddings", "attention", "relation", "minilm")
__all__ = [
    "KD_POSITIONS",
    "PROJECTIONS_NAME",
    "SAMPLE_TEXTS",
    "DistillationTrainer",
    "NonFiniteLossError",
    "forward_arg_names",
]


class DistillationTrainer(
    WindowCountsMixin,
    OnPolicyMixin,
    ProjectionsMixin,
    EMATeacherMixin,
    MultiTeacherMixin,
    TeacherDataMixin,
    TermLoggingMixin,
    SearchRunsMixin,
    Trainer,
):
    """Trains `model` (the student) to imitate a frozen `teacher_model`.

    The loss is `sum_k args.<k>_weight * loss_k` over the terms task, logits, hidden, embeddings and attention (see
    [`DistillationConfig`]); each term is logged on its own as `loss_<k>` (and `eval_loss_<k>`, and in `predict()`'s
    metrics `test_loss_<k>`): the per-item mean over the logging window and every process, a term with no item in
    the window left out. A non-finite training loss stops the run (`NonFiniteLossError`) before the optimizer step,
    naming the terms and the step. Intermediate-layer
    terms pair layers by `args.layer_mapping` into `LayerMatch` records (`self.layer_matches`). When teacher and
    student widths differ, one learned linear projection per hidden-state pairing (`self.projections`) maps the
    student into the teacher's space: the projections are trained with the student (they are in the optimizer and
    in every checkpoint, so a resume restores them) but are never part of the saved student. One global gradient
    norm covers the student and the projections (`max_grad_norm` is applied once), and projection biases get no
    weight decay.

    The task follows the student's head, under any PEFT wrapper: causal LMs shift their labels; sequence classifiers
    use `config.problem_type` (else inferred as transformers does): single-label (cross-entropy + softmax KD),
    regression (MSE + MSE between the outputs) or multi-label (binary cross-entropy + per-class sigmoid KD).

    The logit term is `KD_LOGIT_LOSSES[args.logits_loss]` (forward / reverse KL, JSD, generalized JSD, total
    variation, skew KLs, MSE) with its own parameter (`jsd_beta`, `skew_alpha`). For large vocabularies,
    `logits_chunk_size` computes it a chunk of positions at a time, and `fused_lm_head` (causal LMs) computes it and
    the task term from both models' last hidden states and LM heads, without any (tokens x vocabulary) logits in
    training (see `hf_distill.logit_term`).

    With `lmbda` / `seq_kd` (causal LMs), micro-batches get completions sampled by the student / teacher before the
    window is counted: on-policy distillation (GKD, see `hf_distill.on_policy`).

    `relation_weight` adds a relation term across the batch's samples (RKD / similarity-preserving KD on pooled
    hidden states, `hf_distill.relation_term`), `minilm_weight` MiniLM's self-attention relations between one layer
    pair (`hf_distill.minilm_term`), `teacher_noise_std` perturbs the teacher's logits in training
    (noisy teacher, `hf_distill.noisy_teacher`), and `schedules` set the temperature and the weights at every
    step (`hf_distill.schedules`). With `ema_teacher` the teacher is a moving average of the student itself, built
    here (mean-teacher self-distillation, `hf_distill.ema_teacher`): `teacher_model` is then not needed.

    With `teacher_cache_top_k_tail` the logit term is the forward KL against the teacher's top-k + tail
    (`sparse_kl_loss`), from the cache or from the live teacher's logits alike.

    The teacher is frozen, in eval mode, run under `torch.no_grad()`, never in the optimizer, never wrapped in DDP,
    and placed on the student's device (in `args.teacher_dtype` if set). The trainer takes the teacher over: these
    changes (eval mode, frozen, device, dtype) are made to the object passed in, not to a copy, to save its memory.

    Args:
        model: the student, a `PreTrainedModel` (e.g. from `make_student(teacher)`).
        teacher_model: the teacher, a `PreTrainedModel` of the same tokenizer and label set, or a list of them
            (multi-teacher: `teacher_weights`, `intermediate_teacher`, see `hf_distill.multi_teacher`).
        args: a [`DistillationConfig`].
        teacher_processing_class: the teacher's tokenizer, if it was loaded separately; it must tokenize like
            `processing_class`, which is checked on sample texts before training.
        model_init: instead of `model`, a function returning a fresh student (what `hyperparameter_search` needs).
            Every `train()` then starts from a new student and fresh projections (seeded by `args.seed`), and a
            trial's values (temperature, weights, learning rate, ...) are the ones its loss uses. A trial may not
            switch on a teacher term that is off in `args` (its layer matches, projections and cache do not exist).
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
        model_init = kwargs.pop("model_init", None)
        if model_init is not None:
            if model is not None:
                raise ValueError("pass either model or model_init (a function returning a fresh student), not both.")
            # The checks below need a student: build one as `train()` will, seeded first.
            set_seed(args.seed)
            model = model_init() if number_of_arguments(model_init) == 0 else model_init(None)
        if args.ema_teacher and model is not None:
            teacher_model = ema_teacher_for(model, teacher_model)  # a frozen copy of the student, averaged each step
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs both model (the student) and teacher_model.")
        teacher_model, teachers = split_teachers(teacher_model, model, args, train_dataset, processing_class)
        if args.teacher_dtype is not None:
            if args.teacher_dtype != "auto":
                teacher_model = teacher_model.to(getattr(torch, args.teacher_dtype))
        preflight_models(teacher_model, model, args)
        preflight_tokenizers(processing_class, teacher_processing_class)
        preflight_segment_ids(train_dataset, processing_class, teacher_model, model)
        self._sequence_level = is_sequence_classifier(model)
        self.problem_type = resolve_problem_type(model, teacher_model, train_dataset) if self._sequence_level else None
        preflight_problem_type(self.problem_type, args)
        if args.logits_chunk_size is not None and self._sequence_level:
            raise ValueError(
                f"logits_chunk_size={args.logits_chunk_size} chunks a token-level logit term over positions, but the "
                f"student ({type(model).__name__}) has one row of logits per sequence. Set logits_chunk_size=None."
            )
        if self.problem_type is not None and getattr(model.config, "problem_type", None) is None:
            # Saved with the student, so pipelines read its outputs right (sigmoid per class for multi-label).
            model.config.problem_type = self.problem_type

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_init = model_init  # set after Trainer.__init__, which would build a second student from it
        if model_init is not None and (self.optimizer is not None or self.lr_scheduler is not None):
            raise ValueError("model_init builds a new student per run, so it cannot be used with optimizers=(...).")
        # Every term is normalised over the gradient-accumulation window by the counts from
        # `_get_num_items_in_batch`, so the Trainer must not divide by the number of accumulation steps again.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True  # makes the Trainer call `_get_num_items_in_batch` for us

        if args.ema_teacher:
            check_ema_engine(self)  # the update needs the student's full parameters: not FSDP / DeepSpeed
        self.teacher = teacher_model
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.teacher = prepare_teacher(self.teacher, self.accelerator, self.args)  # device, FSDP2 or ZeRO-3
        self.teachers = self._place_teachers(teachers)  # [self.teacher] unless several teachers were given
        if args.ema_teacher:
            self.add_callback(EMATeacherCallback(self.teacher))

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
        # Built before the cache is attached: a relation layer the cache would not hold is refused here.
        self.relation = build_relation_term(args, self.teacher, model, self.layer_matches)
        self.minilm = build_minilm_term(args, self.teacher, model)  # None when minilm_weight == 0
        self._teacher_noise = TeacherNoise(args)  # teacher_noise_std > 0: noised logits in training only
        if args.schedules:
            self.add_callback(TermSchedules(parse_schedules(args.schedules, args)))
        self.projections = build_projections(
            self.layer_matches,
            hidden_size(model.config),
            hidden_size(self.teacher.config),
            embeddings=args.embeddings_weight > 0,
        ).to(self.args.device)
        if len(self.projections):
            self.add_callback(ZeroProjectionGrads(self.projections))
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
        # Decided from the model under any PEFT wrapper: a PeftModelForCausalLM wraps a causal LM.
        self._shift_labels = is_causal_lm(model)
        self._fused_lm_head = args.fused_lm_head
        if self._fused_lm_head:
            check_fused_lm_head(model, self.teacher, teacher_placement(self.accelerator))
        self._check_on_policy()  # lmbda / seq_kd: causal LMs, unsharded, prompts in the data
        self._logits_for_metrics = True  # False while prediction_step keeps the loss only (see compute_loss)
        self._term_metrics = TermMetrics(TERMS, self.args.device)
        self._term_mode, self._term_prefix = "train", "eval"  # which buffer compute_loss fills, and its log prefix
        self._nonfinite_guard = NonFiniteLossGuard(TERMS)
        self.add_callback(self._nonfinite_guard)
        self.teacher_cache: TeacherCache | None = None
        if args.use_teacher_cache and self.train_dataset is not None:
            self.teacher_cache = self._attach_teacher_cache()
        # What the layer matches, projections and cache were built for; a model_init run may not go beyond it.
        self._built_terms = {t for t in TERMS if t != "task" and getattr(args, f"{t}_weight") > 0}
        self._student_shape = (type(model), num_layers(model), hidden_size(model.config))

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
        counts = window_counts(num_items_in_batch, NUM_COUNTS)
        scale = ddp_loss_scale(self, counts)

        hidden = [m for m in self.layer_matches if m.feature == "hidden"]
        attention = [m for m in self.layer_matches if m.feature == "attention"]
        embeddings = args.embeddings_weight > 0
        relation = self.relation if args.relation_weight > 0 else None  # a schedule may hold it at 0
        relation_student, relation_teacher = relation_layers(relation)
        minilm = self.minilm if args.minilm_weight > 0 else None  # q / k / v of one layer pair, hooked below

        # With fused_lm_head the models' LM heads run on no position and their inputs, the last hidden states, are
        # kept instead: `last_hidden_states` hooks the decoder bodies (see hf_distill.logit_term).
        fused = self._fused_lm_head
        student_inputs = {k: v for k, v in inputs.items() if k in self._student_inputs and k != "labels"}
        if fused:
            student_inputs["logits_to_keep"] = no_positions(inputs["input_ids"].device)
        with last_hidden_states(model, enabled=fused) as student_last, capture_qkv(model, minilm, "student") as s_qkv:
            student = forward_with_features(
                model,
                student_inputs,
                hidden_layers=sorted({m.student_layer for m in hidden} | relation_student),
                attention_layers=sorted({m.student_layer for m in attention}),
                embeddings=embeddings,
            )
        s_logits = getattr(student.outputs, "logits", None)  # None: a headless body (feature terms only)
        s_hidden = student_last.get("hidden")
        token_level = s_logits is not None and s_logits.dim() == 3
        if s_logits is not None and token_level == self._sequence_level:
            raise ValueError(
                f"the student ({type(model).__name__}) returned logits of shape {tuple(s_logits.shape)}, but its "
                f"class says it is a {'sequence' if self._sequence_level else 'token'}-level model, so the counts "
                "the terms are normalised by would be wrong. Use a transformers *ForSequenceClassification, "
                "*ForTokenClassification, *ForMaskedLM or *ForCausalLM model (or a PEFT model with the matching "
                "task_type)."
            )
        needs_teacher = any(getattr(args, f"{t}_weight") > 0 for t in TERMS if t != "task")
        teacher_last: dict[str, torch.Tensor] = {}
        if needs_teacher and has_cached_teacher(inputs):
            check_sparse_temperature(self.teacher_cache_temperature, args)  # a search may have changed T since
            teacher = cached_teacher_features(
                inputs,
                num_classes=s_logits.shape[-1] if s_logits is not None else 0,
                logits=args.logits_weight > 0,
                hidden_layers=sorted({m.teacher_layer for m in hidden} | relation_teacher),
                attention_layers=sorted({m.teacher_layer for m in attention}),
                embeddings=embeddings,
            )
        elif needs_teacher:
            teacher_inputs = {k: v for k, v in inputs.items() if k in self._teacher_inputs and k != "labels"}
            if fused:
                teacher_inputs["logits_to_keep"] = student_inputs["logits_to_keep"]
            with (
                torch.no_grad(),
                last_hidden_states(self.teacher, enabled=fused) as teacher_last,
                capture_qkv(self.teacher, minilm, "teacher") as t_qkv,
            ):
                teacher = forward_with_features(
                    self.teacher,
                    teacher_inputs,
                    hidden_layers=sorted({m.teacher_layer for m in hidden} | relation_teacher),
                    attention_layers=sorted({m.teacher_layer for m in attention}),
                    embeddings=embeddings,
                )

        rows = inputs["input_ids"].shape[0]
        token_mask = mask.bool() if mask is not None else None
        micro_tokens = token_mask.sum() if token_mask is not None else inputs["input_ids"].numel()
        n_tokens = counts[TOKENS] if counts is not None else None
        problem_type = self._problem_type(labels)
        terms: dict[str, torch.Tensor] = {}
        # Per term: this micro-batch's item count, and the count of the whole window it was divided by.
        micro: dict[str, torch.Tensor | int] = {}
        window: dict[str, torch.Tensor | None] = {}
        if args.task_weight > 0 and labels is not None:
            window["task"] = counts[LABELS] if counts is not None else None
            if fused:
                terms["task"] = fused_task_term(model, s_hidden, labels, args, window["task"])
            else:
                terms["task"] = task_loss(
                    s_logits,
                    labels,
                    shift_labels=self._shift_labels,
                    num_items_in_batch=window["task"],
                    problem_type=problem_type,
                )
            micro["task"] = self._label_count(labels)
        if args.logits_weight > 0:
            if self.problem_type is None and problem_type is not None:
                preflight_problem_type(problem_type, args)  # known only now, from the labels' dtype
            positions = self._logit_positions(labels, mask) if token_level else None
            if token_level:
                every = (s_hidden if fused else s_logits).shape[:2].numel()
                micro["logits"] = positions.sum() if positions is not None else every
            else:
                micro["logits"] = rows
            window["logits"] = counts[KD_POSITIONS] if counts is not None else None
            if fused:
                t_hidden = teacher_last["hidden"]
                terms["logits"] = fused_logit_term(
                    model, self.teacher, s_hidden, t_hidden, positions, args, window["logits"]
                )
            else:
                table = MULTI_LABEL_LOGIT_LOSSES if problem_type == MULTI_LABEL else KD_LOGIT_LOSSES
                sparse = getattr(teacher.outputs, "sparse_logits", None)  # a top-k + tail cache
                t_logits = self._mixed_teacher_logits(teacher.outputs.logits, inputs, problem_type == MULTI_LABEL)
                t_logits = self._teacher_noise(t_logits, self.state.global_step, model.training)
                terms["logits"] = logit_term(s_logits, t_logits, positions, args, table, window["logits"], sparse)
        # Feature matching compares representations of every real token, whatever `distill_on` says.
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
            micro["hidden"], window["hidden"] = micro_tokens, n_tokens
        if embeddings:
            terms["embeddings"] = HIDDEN_LOSSES[args.hidden_loss](
                self._project("embeddings", student.embeddings),
                teacher.embeddings,
                token_mask,
                num_items_in_batch=n_tokens,
            )
            micro["embeddings"], window["embeddings"] = micro_tokens, n_tokens
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
            micro["attention"], window["attention"] = micro_tokens, n_tokens

        if relation is not None:  # a per-micro-batch mean weighted by its share of the window's rows
            window["relation"] = counts[ROWS] if counts is not None else None
            terms["relation"] = relation_term(
                relation, student.hidden_states, teacher.hidden_states, mask, window["relation"]
            )
            micro["relation"] = rows
        if minilm is not None:  # a mean over (relation head, real query position): a per-token term
            terms["minilm"] = minilm_term(minilm, s_qkv, t_qkv, token_mask, n_tokens)
            micro["minilm"], window["minilm"] = micro_tokens, n_tokens

        if not terms:
            raise ValueError(
                "no loss term could be computed for this batch: task_weight > 0 needs a 'labels' column and every "
                "other weight is 0. Add labels or set logits_weight > 0."
            )
        loss = sum(getattr(args, f"{name}_weight") * value for name, value in terms.items()) * scale

        for name, value in terms.items():
            # Each term is sum / denominator (clamped to 1); buffering sum and items keeps exact window means.
            denominator = window[name] if window[name] is not None else micro[name]
            denominator = denominator.clamp(min=1) if torch.is_tensor(denominator) else max(denominator, 1)
            self._term_metrics.add(self._term_mode, name, value.detach() * denominator, micro[name])
        if model.training:
            self._nonfinite_guard.observe(loss, terms)

        if return_outputs:
            outputs = student.outputs
            if fused and self._logits_for_metrics:
                # Evaluation with metrics needs the predictions: the one place fused mode makes the logits.
                outputs["logits"] = logits_from_hidden(model, s_hidden)
            # prediction_step hands every output but the loss to compute_metrics: keep the logits only.
            for key in ("hidden_states", "attentions"):
                if key in outputs:
                    outputs[key] = None
            outputs["loss"] = loss
            return loss, outputs
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # With fused_lm_head, compute_loss makes the student's logits only when the predictions are kept.
        self._logits_for_metrics = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._logits_for_metrics = True


def _weighted_mean(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)
