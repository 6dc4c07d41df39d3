"""Self-distillation from a mean teacher: the teacher is an exponential moving average (EMA) of the student.

Mean teacher (Tarvainen & Valpola 2017, https://arxiv.org/abs/1703.01780), the EMA "teacher" / "target" network of
self-distillation methods such as BYOL (https://arxiv.org/abs/2006.07733) and DINO (https://arxiv.org/abs/2104.14294):
with `DistillationConfig(ema_teacher=True)` no teacher model is needed. The trainer's teacher is a frozen deep copy of
the student (`build_ema_teacher`: same architecture, eval mode, `requires_grad=False`), and after every optimizer step

    teacher_param <- ema_decay * teacher_param + (1 - ema_decay) * student_param      (every parameter)
    teacher_buffer <- student_buffer                                                   (every buffer: a copy)

(`ema_update_`; once per optimizer step, not per micro-batch of a gradient-accumulation window: `EMATeacherCallback`
acts in `on_step_end`). The student is distilled from it with the usual terms (logit KD, hidden states, ...) and its
task loss: the teacher's predictions average the student's recent weights, a smoother target than the student's own.

- Start: at the beginning of a run (`global_step == 0`, also each `model_init` run) the teacher becomes a copy of the
  student, so the logit term of step 1 is the divergence from the initial copy. Through the first `ema_start_step`
  optimizer steps the teacher stays a copy of the student (a warm-up while the student moves fast); the average
  starts after step `ema_start_step` (0: at once).
- Dropout: the teacher runs in eval mode (dropout off), like every hf-distill teacher (and DINO's teacher); the
  student keeps its dropout, so the two differ even while the teacher is a copy. The mean-teacher paper applies noise
  (input augmentation, dropout) to both models; this is the noise-free-teacher variant.
- Checkpoints: the teacher's weights are training state, written to every checkpoint as `ema_teacher.safetensors`
  (`EMA_TEACHER_NAME`) and restored on resume, so a resumed run reaches the weights of the uninterrupted one. They
  are never part of the saved or pushed student (`save_model` and `hf_distill.hub` write the student alone).
- A `teacher_model` passed with `ema_teacher=True` is not distilled from (`scripts/distill.py` passes the model the
  student was built from, for its evaluation and model card): the EMA teacher replaces it, and it is left untouched.

Refused before training (each error names the field, the value and the fix, see `check_ema_args` and
`check_ema_engine`): `ema_decay` outside [0, 1), `ema_start_step` < 0, `use_teacher_cache` (the teacher changes every
step), several teachers (`teacher_weights`, `intermediate_teacher`, a list of teacher models), `teacher_dtype` (the
average must keep the student's precision), and FSDP / DeepSpeed (sharded student parameters).
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "EMA_TEACHER_NAME",
    "EMATeacherCallback",
    "EMATeacherMixin",
    "build_ema_teacher",
    "check_ema_args",
    "check_ema_engine",
    "copy_student_",
    "ema_teacher_for",
    "ema_update_",
]

EMA_TEACHER_NAME = "ema_teacher.safetensors"


def check_ema_args(args) -> None:
    """`DistillationConfig`'s checks of `ema_teacher`, `ema_decay`, `ema_start_step` and what they combine with."""
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(
            f"ema_decay must be in [0, 1), got {args.ema_decay}. The teacher becomes ema_decay * teacher + "
            "(1 - ema_decay) * student after each optimizer step: use e.g. 0.999 (0 makes the teacher the student; "
            "1 would never update it)."
        )
    start = args.ema_start_step
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(
            f"ema_start_step must be an int >= 0, got {start!r}: the optimizer steps through which the teacher is a "
            "copy of the student before the average starts. Use e.g. 0 (average from the first step)."
        )
    if not args.ema_teacher:
        return
    for name, present, why, fix in (
        (
            "use_teacher_cache",
            args.use_teacher_cache,
            "a cache stores one fixed teacher's outputs, and the EMA teacher changes after every step",
            "use_teacher_cache=False",
        ),
        (
            "teacher_weights",
            args.teacher_weights is not None,
            "the EMA teacher is one model, a copy of the student, not several teachers",
            "teacher_weights=None",
        ),
        (
            "intermediate_teacher",
            args.intermediate_teacher != 0,
            "the EMA teacher is one model, a copy of the student, not several teachers",
            "intermediate_teacher=0",
        ),
        (
            "teacher_dtype",
            args.teacher_dtype is not None,
            "the moving average is kept in the teacher's dtype, and a half-precision average rounds away updates of "
            "(1 - ema_decay) x the difference; the teacher has the student's dtype",
            "teacher_dtype=None",
        ),
    ):
        if present:
            raise ValueError(
                f"{name}={getattr(args, name)!r} cannot be used with ema_teacher=True: {why}. Set {fix}, or "
                "ema_teacher=False to distil from a teacher model."
            )


def check_ema_engine(trainer) -> None:
    """Refuse an EMA teacher when the student's parameters are sharded (FSDP, DeepSpeed): the update reads the
    student's full parameters on every process, which a sharded (or ZeRO-partitioned) student does not have."""
    engine = "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed" if trainer.is_deepspeed_enabled else None
    if engine is not None:
        raise ValueError(
            f"ema_teacher=True updates a full copy of the student from its parameters after every step, but {engine} "
            "shards or partitions the student's parameters. Train with DDP or on one device, or set "
            "ema_teacher=False."
        )


def build_ema_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of `student`: same architecture and weights, eval mode (dropout off), no gradients."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def ema_teacher_for(student: nn.Module, teacher_model=None) -> nn.Module:
    """The trainer's teacher under `ema_teacher=True`: `build_ema_teacher(student)`. A `teacher_model` given as well
    is not distilled from (and left as it is); a list of them is refused."""
    if isinstance(teacher_model, (list, tuple)):
        raise ValueError(
            f"teacher_model is a list of {len(teacher_model)} models, but ema_teacher=True distils from one teacher, "
            "the moving average of the student. Pass one teacher_model (or none), or set ema_teacher=False for "
            "multi-teacher distillation."
        )
    if teacher_model is not None:
        logger.info(
            "ema_teacher=True: the student is distilled from a moving average of itself, not from the teacher_model "
            "passed in (%s), which is left as it is.",
            type(teacher_model).__name__,
        )
    return build_ema_teacher(student)


def _paired(teacher: nn.Module, student: nn.Module, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(teacher tensor, student tensor)` of every parameter (`what="parameters"`) or buffer, matched by name."""
    t_items = list(getattr(teacher, f"named_{what}")())
    s_items = list(getattr(student, f"named_{what}")())
    if [n for n, _ in t_items] != [n for n, _ in s_items]:
        raise ValueError(
            f"the EMA teacher's {what} do not match the student's ({len(t_items)} vs {len(s_items)}, e.g. "
            f"{sorted({n for n, _ in t_items} ^ {n for n, _ in s_items})[:3]}): the teacher must be a copy of this "
            "student (build_ema_teacher). A model_init must build the same student every time."
        )
    return [(t, s) for (_, t), (_, s) in zip(t_items, s_items)]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: every teacher parameter becomes `decay * teacher + (1 - decay) * student`; a parameter the student
    does not train (`requires_grad=False`) and every buffer become the student's (a copy).

    The arithmetic is exactly that expression per element (`t * decay`, `s * (1 - decay)`, their sum, each rounded
    in the parameter's dtype), so a test can compare with it bit for bit. Tied parameters are updated once.

    Args:
        teacher: the EMA teacher (`build_ema_teacher(student)` or a model of the same parameter names and shapes).
        student: the student, after its optimizer step.
        decay: in [0, 1); 0 copies the student's parameters.
    """
    params = _paired(teacher, student, "parameters")
    # A parameter the student does not train (a LoRA student's base) is copied: averaging two equal values can move
    # it by a rounding error at every step.
    averaged = [(t, s) for t, s in params if s.requires_grad]
    if averaged:
        teacher_params = [t for t, _ in averaged]
        student_params = [s.detach().to(t.device, t.dtype) for t, s in averaged]
        # One kernel launch per list instead of per tensor (as torch.optim does); the same arithmetic as a loop.
        torch._foreach_mul_(teacher_params, decay)
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1.0 - decay))
    for t, s in [(t, s) for t, s in params if not s.requires_grad] + _paired(teacher, student, "buffers"):
        t.copy_(s)


@torch.no_grad()
def copy_student_(teacher: nn.Module, student: nn.Module) -> None:
    """In place: the teacher's parameters and buffers become the student's (the start and the warm-up)."""
    for what in ("parameters", "buffers"):
        for t, s in _paired(teacher, student, what):
            t.copy_(s)


class EMATeacherCallback(TrainerCallback):
    """Keeps `teacher` the moving average of the trainer's student (the callback `DistillationTrainer` adds).

    - `on_train_begin` of a run from scratch (`global_step == 0`): the teacher becomes a copy of the student (a
      resumed run's teacher is loaded from the checkpoint instead, by `EMATeacherMixin`).
    - `on_step_end` (once per optimizer step, after the step): after step `global_step`, a copy of the student while
      `global_step <= args.ema_start_step`, else `ema_update_(teacher, student, args.ema_decay)`. `args` is read at
      every step, so a hyperparameter-search trial's `ema_decay` is the one used.

    Args:
        teacher: the EMA teacher, placed on the student's device.
    """

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            copy_student_(self.teacher, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step <= args.ema_start_step:
            copy_student_(self.teacher, model)
        else:
            ema_update_(self.teacher, model, args.ema_decay)


class EMATeacherMixin:
    """Mixed into `DistillationTrainer` before `transformers.Trainer`: with `args.ema_teacher`, every checkpoint holds
    the teacher's weights (`ema_teacher.safetensors`) and a resume restores them."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.ema_teacher and self.args.should_save:
            tmp = os.path.join(output_dir, EMA_TEACHER_NAME + ".tmp")
            # save_model deduplicates tied weights, which safetensors' save_file refuses.
            save_model(self.teacher, tmp, force_contiguous=True)
            os.replace(tmp, os.path.join(output_dir, EMA_TEACHER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.args.ema_teacher:
            return
        path = os.path.join(checkpoint, EMA_TEACHER_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint={checkpoint!r} has no {EMA_TEACHER_NAME}, but this run distils from an EMA "
                "teacher (ema_teacher=True), whose weights are part of the training state. Resume from a checkpoint "
                "of an ema_teacher run, or start a new run in a fresh output_dir."
            )
        load_model(self.teacher, path, device=str(next(self.teacher.parameters()).device))
