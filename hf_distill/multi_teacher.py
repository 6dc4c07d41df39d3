"""Multi-teacher distillation: several frozen teachers of one tokenizer and label set, one student.

`DistillationTrainer(teacher_model=[t_0, t_1, ...])` distils an ensemble. The teachers may be of different
architectures (a BERT and a DistilBERT, two fine-tunes of one checkpoint, ...), but they read the student's token ids
and score the same classes (or vocabulary), which is checked before any training step.

- **The logit term** is the usual `logits_loss` against the mixture of the teachers' softened distributions,

      p_mix = sum_i w_i softmax(z_i / T),   w = teacher_weights / sum(teacher_weights)

  (`multi_teacher_average="probs"`, the default): a weighted average of *probabilities* at the logit term's
  temperature T, given to the loss as the teacher logits `T * log p_mix` (`mix_teacher_distributions`), whose softmax
  at T is `p_mix` exactly. So every softmax divergence (`kl`, `reverse_kl`, `jsd`, the LM divergences) and the T²
  scaling work unchanged, and a scheduled temperature re-mixes at the new T. Multi-label heads mix each class's
  Bernoulli probability `sigmoid(z_i / T)` alike.
- **Intermediate terms** (hidden states, attention, embeddings, relations) and the layer mapping are taken against
  one teacher, `intermediate_teacher` (an index into the list, default 0): it is `trainer.teacher`, and the other
  teachers are run for their logits only, when the logit term is on.

Not TextBrewer's multi-teacher distillation: its `MultiTeacherDistiller` averages the teachers' *logits*, and the
softmax of a mean of logits is the normalised weighted *geometric* mean of the teachers' distributions
(`prod_i p_i^{w_i}`, renormalised), a sharper target where they disagree than the arithmetic mean above.
`multi_teacher_average="logits"` gives that target (`average_teacher_logits`), and is what `logits_loss="mse"` (which
compares raw logits, no softmax) needs.

A teacher of weight 0 is not run; when a single teacher has weight > 0 its own logits are the target, so
`teacher_weights=[1, 0]` trains exactly as that teacher alone.

Refused with more than one teacher (each `ValueError` names the field, the value and the fix):
`use_teacher_cache` (the cache holds one teacher's outputs in fixed columns; one cache per teacher is not
implemented), `fused_lm_head` (no logits are made, so there is nothing to mix), `teacher_noise_std > 0` (noise is
drawn for one teacher's logits per micro-batch), `seq_kd` (completions are sampled from one teacher), and
`logits_loss="mse"` with `multi_teacher_average="probs"`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .placement import prepare_teacher
from .tasks import is_sequence_classifier, resolve_problem_type, unwrap_peft

logger = logging.getLogger(__name__)

__all__ = [
    "MULTI_TEACHER_AVERAGES",
    "MultiTeacherMixin",
    "average_teacher_logits",
    "check_multi_teacher_args",
    "check_teacher_labels",
    "load_extra_teachers",
    "mix_teacher_distributions",
    "normalized_teacher_weights",
    "split_teachers",
]

MULTI_TEACHER_AVERAGES = ("probs", "logits")
# Files of which a saved tokenizer has at least one (fast, WordPiece / BPE and SentencePiece ones).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForCausalLM", "ForMaskedLM", "ForQuestionAnswering")


# --------------------------------------------------------------------------------------------------------------------
# The target: pure functions of the teachers' logits
# --------------------------------------------------------------------------------------------------------------------


def normalized_teacher_weights(weights: Sequence[float] | None, num_teachers: int) -> list[float]:
    """`teacher_weights` divided by their sum (`None`: equal weights), one per teacher."""
    if weights is None:
        return [1.0 / num_teachers] * num_teachers
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_pairs(logits_list: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(logits_list) != len(weights) or not logits_list:
        raise ValueError(f"got {len(logits_list)} teachers' logits and {len(weights)} weights: give one weight each.")
    shapes = {tuple(z.shape) for z in logits_list}
    if len(shapes) > 1:
        raise ValueError(
            f"the teachers' logits have shapes {sorted(shapes)}: the teachers of one student must share its label set "
            "/ vocabulary and positions (same num_labels, same tokenizer)."
        )


def mix_teacher_distributions(
    logits_list: Sequence[torch.Tensor],
    weights: Sequence[float],
    temperature: float,
    *,
    multi_label: bool = False,
) -> torch.Tensor:
    """Teacher logits whose softened distribution is the weighted mixture of the teachers' softened distributions.

    Returns `T * log(sum_i w_i softmax(z_i / T))` with `w = weights / sum(weights)`, in fp32: the logit losses take
    `softmax(teacher_logits / T)`, and the softmax of `log p_mix` is `p_mix` itself (it already sums to 1), so a loss
    given these logits at temperature T compares the student with exactly `p_mix`. An entry to which every teacher
    of weight > 0 gives probability 0 (a `-inf` logit) is `-inf`. The mixture is accumulated teacher by teacher
    (`logaddexp`), so its memory does not grow with the number of teachers.

    With `multi_label` (a multi-label head, whose classes are independent yes/no decisions distilled through
    `sigmoid(z / T)`), each class's probability is mixed instead: `p_mix = sum_i w_i sigmoid(z_i / T)` and the result
    is `T * (log p_mix - log(1 - p_mix))`, whose sigmoid at T is `p_mix`.

    Args:
        logits_list: one `(..., C)` logits tensor per teacher, all of one shape (e.g. `(B, C)` or `(B, L, V)`).
        weights: one weight >= 0 per teacher, not all 0 (normalised here; teachers of weight 0 are skipped).
        temperature: the logit term's temperature T > 0.
        multi_label: mix per-class sigmoids instead of softmaxes over the last dim.

    Returns:
        fp32 `(..., C)` logits.
    """
    _check_pairs(logits_list, weights)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}. Use e.g. 2.0.")
    normalized = normalized_teacher_weights(weights, len(weights))
    used = [(z, w) for z, w in zip(logits_list, normalized) if w > 0]

    def log_mix(log_prob) -> torch.Tensor:  # log sum_i w_i exp(log_prob(z_i / T)), teacher by teacher
        total = None
        for z, w in used:
            term = log_prob(z.float() / temperature) + math.log(w)
            total = term if total is None else torch.logaddexp(total, term)
        return total

    if not multi_label:
        return temperature * log_mix(lambda x: F.log_softmax(x, dim=-1))
    return temperature * (log_mix(F.logsigmoid) - log_mix(lambda x: F.logsigmoid(-x)))


def average_teacher_logits(logits_list: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i z_i` (`w` normalised to sum 1), in fp32: the weighted mean of the teachers' logits (TextBrewer's
    multi-teacher target, `multi_teacher_average="logits"`). Its softmax at T is the normalised weighted geometric
    mean of the teachers' softmaxes at T, not their average."""
    _check_pairs(logits_list, weights)
    normalized = normalized_teacher_weights(weights, len(weights))
    return sum(w * z.float() for z, w in zip(logits_list, normalized) if w > 0)


# --------------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------------


def check_multi_teacher_args(args) -> None:
    """`DistillationConfig`'s checks of `teacher_weights`, `intermediate_teacher` and `multi_teacher_average` (the
    number of teachers is checked by the trainer, which has them)."""
    if args.multi_teacher_average not in MULTI_TEACHER_AVERAGES:
        raise ValueError(
            f"multi_teacher_average must be one of {MULTI_TEACHER_AVERAGES}, got {args.multi_teacher_average!r}. Use "
            "'probs' (average the teachers' probabilities at the temperature) or 'logits' (average their logits)."
        )
    index = args.intermediate_teacher
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(
            f"intermediate_teacher must be an int >= 0 (an index into the list of teachers), got {index!r}. Use 0 "
            "for the first teacher (teacher_model_name_or_path in a recipe)."
        )
    weights = args.teacher_weights
    if weights is None:
        return
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
        raise ValueError(
            f"teacher_weights must be a non-empty list of numbers, one per teacher, got {weights!r}. Use e.g. "
            "[0.5, 0.5], or leave it unset for equal weights."
        )
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise ValueError(f"teacher_weights must be numbers, got {weights!r}. Use e.g. [0.5, 0.5].") from e
    bad = [i for i, w in enumerate(values) if not w >= 0 or not math.isfinite(w)]
    if bad:
        raise ValueError(
            f"teacher_weights must be finite and >= 0, got {values} (teacher {bad[0]} has {values[bad[0]]}). Use e.g. "
            "[0.5, 0.5]; a weight of 0 leaves that teacher out of the logit target."
        )
    if sum(values) == 0:
        raise ValueError(
            f"teacher_weights are all 0 ({values}): the logit target would have no teacher. Give at least one "
            "teacher a weight > 0, e.g. [0.5, 0.5]."
        )
    args.teacher_weights = values
    if len(values) > 1 and args.use_teacher_cache:
        raise ValueError(_CACHE_REFUSAL.format(n=len(values), what=f"teacher_weights={values}"))


_CACHE_REFUSAL = (
    "use_teacher_cache=True stores one teacher's outputs, but {what} asks for {n} teachers (multi-teacher "
    "distillation does not support the teacher cache: one cache per teacher is not implemented). Set "
    "use_teacher_cache=False (the teachers run live), or distil from one teacher."
)


def _head(model) -> str:
    name = type(unwrap_peft(model)).__name__
    return next((suffix for suffix in HEADS if name.endswith(suffix)), name)


def split_teachers(
    teacher_model, student: PreTrainedModel, args, train_dataset=None, processing_class=None
) -> tuple[PreTrainedModel, list[PreTrainedModel]]:
    """The trainer's `teacher_model` (one model or a list) as `(the intermediate teacher, every teacher in order)`.

    With one teacher nothing is checked here (`teacher_weights`, if given, must then have one entry and
    `intermediate_teacher` be 0). With several, each is checked against the first one (head, `vocab_size`,
    `num_labels`, `problem_type`) and against the student with the trainer's own preflight checks, and the settings
    multi-teacher training does not support are refused (see the module docstring).
    """
    from .preflight import preflight_models, preflight_segment_ids  # preflight imports config, which imports us

    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    n = len(teachers)
    if n == 0 or any(t is None for t in teachers):
        raise ValueError("teacher_model is an empty list or holds None: pass one teacher model, or a list of them.")
    weights = args.teacher_weights
    if weights is not None and len(weights) != n:
        raise ValueError(
            f"teacher_weights={list(weights)} has {len(weights)} entries but {n} teacher(s) were given. Give one "
            "weight per teacher, in the order of teacher_model (a recipe: teacher_model_name_or_path first, then "
            "extra_teacher_model_names_or_paths), or leave teacher_weights unset for equal weights."
        )
    if args.intermediate_teacher >= n:
        raise ValueError(
            f"intermediate_teacher={args.intermediate_teacher} is out of range for {n} teacher(s): use an index in "
            f"[0, {n - 1}] (the teacher whose hidden states / attention / embeddings the student matches)."
        )
    if n == 1:
        return teachers[0], teachers
    if args.use_teacher_cache:
        raise ValueError(_CACHE_REFUSAL.format(n=n, what=f"teacher_model (a list of {n})"))
    for name, present, why, fix in (
        ("fused_lm_head", args.fused_lm_head, "the fused path makes no teacher logits to mix", "fused_lm_head=False"),
        ("teacher_noise_std", args.teacher_noise_std > 0, "the noise is drawn for one teacher", "teacher_noise_std=0"),
        ("seq_kd", args.seq_kd, "completions are sampled from one teacher", "seq_kd=False (lmbda > 0 works)"),
    ):
        if present:
            raise ValueError(
                f"{name}={getattr(args, name)} is not supported with several teachers ({n} were given): {why}. Set "
                f"{fix}, or distil from one teacher."
            )
    if args.logits_weight > 0 and args.logits_loss == "mse" and args.multi_teacher_average == "probs":
        raise ValueError(
            "logits_loss='mse' compares raw logits, which have no probabilities to average, but "
            "multi_teacher_average='probs'. Set multi_teacher_average='logits' (the weighted mean of the teachers' "
            "logits), or a softmax divergence such as logits_loss='kl'."
        )
    first = unwrap_peft(teachers[0]).config
    for i, teacher in enumerate(teachers[1:], start=1):
        config = unwrap_peft(teacher).config
        if _head(teacher) != _head(teachers[0]):
            raise ValueError(
                f"teacher {i} is a {type(unwrap_peft(teacher)).__name__} but teacher 0 a "
                f"{type(unwrap_peft(teachers[0])).__name__}: the teachers' logits are mixed position by position, so "
                "they need the same kind of head. Load every teacher with the same AutoModelFor... class."
            )
        for name in ("vocab_size", "num_labels"):
            if name == "num_labels" and not _head(teacher).endswith("Classification"):
                continue
            mine, theirs = getattr(config, name, None), getattr(first, name, None)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"{name} differs between the teachers: teacher 0 has {theirs}, teacher {i} has {mine}. The "
                    "teachers of one student must share its tokenizer and label set: use teachers fine-tuned on the "
                    "same classes from checkpoints of one vocabulary."
                )
        preflight_models(teacher, student, args)
        preflight_segment_ids(train_dataset, processing_class, teacher, student)
        if is_sequence_classifier(student):
            resolve_problem_type(student, teacher, train_dataset)  # refuses a problem_type other than the student's
    return teachers[args.intermediate_teacher], teachers


def check_teacher_labels(teacher: PreTrainedModel, extra_teachers: Sequence[PreTrainedModel]) -> None:
    """Each extra teacher that names its classes (a non-default `id2label`) must name them as `teacher` does, in the
    same order: the mixture averages class i of every teacher. Run after `apply_label_info` (which may have written
    the data's names into `teacher`'s config)."""

    def names(config) -> tuple[str, ...] | None:
        id2label = getattr(config, "id2label", None) or {}
        found = tuple(str(id2label[i]).casefold() for i in sorted(id2label, key=int))
        return None if found == tuple(f"label_{i}" for i in range(len(found))) else found

    reference = names(teacher.config)
    for i, extra in enumerate(extra_teachers, start=1):
        theirs = names(extra.config)
        if reference is not None and theirs is not None and theirs != reference:
            raise ValueError(
                f"extra_teacher_model_names_or_paths[{i - 1}] (teacher {i}) names its classes {list(theirs)}, but "
                f"teacher 0 names them {list(reference)}: the mixture averages the teachers class by class, so they "
                "must number the classes alike. Use teachers fine-tuned with the same label order."
            )


# --------------------------------------------------------------------------------------------------------------------
# Loading (scripts/distill.py)
# --------------------------------------------------------------------------------------------------------------------


def load_extra_teachers(model_args, tokenizer, num_labels: int | None = None) -> list[PreTrainedModel]:
    """The teachers of `model_args.extra_teacher_model_names_or_paths`, each loaded as `load_teacher` loads the main
    one (safetensors only, its trained head checked against `num_labels`; no adapter).

    A teacher folder that ships a tokenizer must have the same vocabulary as `tokenizer` (the main teacher's, which
    tokenizes the data for every model); one without tokenizer files is checked by its `vocab_size` only (by the
    trainer). Errors name the list entry.
    """
    from transformers import AutoTokenizer

    from .models import load_teacher  # models imports arguments, which imports config, which imports us

    teachers = []
    for i, path in enumerate(model_args.extra_teacher_model_names_or_paths or []):
        field = f"extra_teacher_model_names_or_paths[{i}]"
        one = copy.copy(model_args)
        one.teacher_model_name_or_path, one.teacher_adapter_name_or_path = path, None
        # The tokenizer loaded with it is the main one (cheap, always there); the teacher's own is compared below.
        one.tokenizer_name_or_path = model_args.tokenizer_name_or_path or model_args.teacher_model_name_or_path
        try:
            teacher, _ = load_teacher(one, num_labels=num_labels)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{field}={path!r}: {e}") from e
        own = None
        if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            own = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        else:
            logger.warning("%s=%r has no tokenizer files: only its vocab_size is checked.", field, path)
        if own is not None and tokenizer is not None and own.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"{field}={path!r} has a tokenizer of another vocabulary ({len(own)} tokens) than the one the data is "
                f"tokenized with ({len(tokenizer)} tokens, from {one.tokenizer_name_or_path!r}): every teacher reads "
                "the student's token ids. Use teachers of one tokenizer (e.g. fine-tunes of one checkpoint)."
            )
        teachers.append(teacher)
    return teachers


# --------------------------------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------------------------------


class MultiTeacherMixin:
    """Mixed into `DistillationTrainer` before `TeacherDataMixin`: places the other teachers as `self.teacher` is
    placed, and makes the logit term's teacher logits from all of them."""

    def _place_teachers(self, teachers: list[PreTrainedModel]) -> list[PreTrainedModel]:
        """`teachers` frozen, in eval mode and placed like `self.teacher` (which is the intermediate one, already
        placed), in `args.teacher_dtype` if set."""
        args = self.args
        placed = []
        for i, teacher in enumerate(teachers):
            if i == args.intermediate_teacher:
                placed.append(self.teacher)
                continue
            if args.teacher_dtype not in (None, "auto"):
                teacher = teacher.to(getattr(torch, args.teacher_dtype))
            teacher.eval()
            teacher.requires_grad_(False)
            placed.append(prepare_teacher(teacher, self.accelerator, args))
        from .preflight import forward_arg_names

        self._teacher_input_names = [forward_arg_names(t) for t in placed]
        return placed

    def _mixed_teacher_logits(self, logits: torch.Tensor, inputs: dict, multi_label: bool) -> torch.Tensor:
        """The logit term's teacher logits: `logits` (the intermediate teacher's) with one teacher, or one teacher of
        weight > 0; else the other teachers are run (no_grad) and mixed by `multi_teacher_average`."""
        teachers = self.teachers
        if len(teachers) == 1:
            return logits
        args = self.args
        weights = normalized_teacher_weights(args.teacher_weights, len(teachers))
        used = [i for i, w in enumerate(weights) if w > 0]
        outputs = []
        for i in used:
            if i == args.intermediate_teacher:
                outputs.append(logits)
                continue
            names = self._teacher_input_names[i]
            with torch.no_grad():
                outputs.append(teachers[i](**{k: v for k, v in inputs.items() if k in names and k != "labels"}).logits)
        if len(outputs) == 1:
            return outputs[0]
        chosen = [weights[i] for i in used]
        if args.multi_teacher_average == "logits":
            return average_teacher_logits(outputs, chosen)
        return mix_teacher_distributions(outputs, chosen, args.temperature, multi_label=multi_label)

    def _set_signature_columns_if_needed(self):
        # Keep the columns any teacher reads (a BERT teacher's token_type_ids among DistilBERT models), not only the
        # student's and the intermediate teacher's.
        unset = self._signature_columns is None
        super()._set_signature_columns_if_needed()
        names = getattr(self, "_teacher_input_names", [])
        if unset and len(names) > 1:
            extra = sorted(set().union(*names) - set(self._signature_columns))
            self._signature_columns = [*self._signature_columns, *extra]
