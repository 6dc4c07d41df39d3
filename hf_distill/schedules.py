"""Schedules of the temperature and the terms' weights, as `TrainerCallback`s.

`TermSchedule(field, start, end, kind, start_step, end_step)` sets `args.<field>` (`temperature` or a
`<term>_weight`) at the beginning of every optimizer step, before that step's losses, to a function of
`state.global_step` alone, so a run resumed from a checkpoint uses exactly the values of the uninterrupted run:

- before `start_step`: 0 for a weight (the term starts at `start_step`), `start` for the temperature;
- from `start_step` to `end_step` (default: the run's last step): from `start` to `end`, linearly
  (`start + (end - start) p`) or by cosine (`end + (start - end) (1 + cos(pi p)) / 2`), `p = (step - start_step) /
  (end_step - start_step)`;
- after `end_step`: `end`.

Annealing the temperature from high to low is the usual use (in the spirit of Annealing KD, Jafari et al. 2021,
https://arxiv.org/abs/2104.07163); starting a feature term late lets the student first fit the logits. The schedule
writes the value into the trainer's `args`, which `compute_loss` reads at every micro-batch; after training `args`
holds the last value. `DistillationConfig.schedules` builds these from a recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

__all__ = ["SCHEDULE_KINDS", "SCHEDULE_KEYS", "TermSchedule", "TermSchedules", "parse_schedule", "parse_schedules"]

SCHEDULE_KINDS = ("linear", "cosine")
SCHEDULE_KEYS = ("field", "start", "end", "kind", "start_step", "end_step")


@dataclass
class TermSchedule(TrainerCallback):
    """Sets `args.<field>` at each optimizer step's beginning (see the module docstring).

    Args:
        field: `"temperature"` or a loss weight field (`"logits_weight"`, `"hidden_weight"`, `"relation_weight"`, ...).
        start: the value at `start_step`.
        end: the value from `end_step` on; None means `start` (a constant, e.g. a weight that switches on).
        kind: `"linear"` or `"cosine"`.
        start_step: first optimizer step (0-based `global_step`) of the schedule; a weight is 0 before it.
        end_step: step at which `end` is reached; None means the run's `max_steps`.
    """

    field: str
    start: float
    end: float | None = None
    kind: str = "linear"
    start_step: int = 0
    end_step: int | None = None

    def __post_init__(self):
        if self.end is None:
            self.end = self.start
        self.start, self.end = float(self.start), float(self.end)
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedules: kind must be one of {SCHEDULE_KINDS}, got {self.kind!r} ({self}).")
        if not self.field == "temperature" and not self.field.endswith("_weight"):
            raise ValueError(
                f"schedules: field must be 'temperature' or a loss weight such as 'hidden_weight', got {self.field!r}."
            )
        low = "> 0" if self.field == "temperature" else ">= 0"
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (value > 0 if self.field == "temperature" else value >= 0):
                raise ValueError(f"schedules: {self.field} {name} must be {low}, got {value} ({self}).")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"schedules: start_step must be an int >= 0, got {self.start_step!r} ({self}).")
        if self.end_step is not None and (
            isinstance(self.end_step, bool) or not isinstance(self.end_step, int) or self.end_step <= self.start_step
        ):
            raise ValueError(
                f"schedules: end_step must be an int > start_step={self.start_step} or None (the last step), got "
                f"{self.end_step!r} ({self})."
            )

    def value(self, step: int, max_steps: int | None = None) -> float:
        """The value at optimizer step `step` (0-based) of a run of `max_steps` steps."""
        if step < self.start_step:
            return self.start if self.field == "temperature" else 0.0
        end_step = self.end_step if self.end_step is not None else max_steps
        if end_step is None or end_step <= self.start_step:
            return self.end if end_step is not None else self.start
        progress = min((step - self.start_step) / (end_step - self.start_step), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2

    def _apply(self, args, state) -> None:
        if not hasattr(args, self.field):
            raise ValueError(
                f"schedules: the trainer's arguments have no field {self.field!r}. Use 'temperature' or a loss weight "
                "of DistillationConfig."
            )
        setattr(args, self.field, self.value(state.global_step, state.max_steps))

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(args, state)  # for an evaluation before the first step (eval_on_start)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(args, state)


class TermSchedules(TrainerCallback):
    """Several `TermSchedule`s as one callback (what `DistillationTrainer` adds for `DistillationConfig.schedules`;
    `Trainer.add_callback` warns about a second callback of one class)."""

    def __init__(self, schedules: list[TermSchedule]):
        self.schedules = list(schedules)

    def on_train_begin(self, args, state, control, **kwargs):
        for schedule in self.schedules:
            schedule.on_train_begin(args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        for schedule in self.schedules:
            schedule.on_step_begin(args, state, control, **kwargs)


def parse_schedules(items: list | None, config=None) -> list[TermSchedule]:
    """`DistillationConfig.schedules` as `TermSchedule`s, checked against `config` when given: one schedule per field,
    a field `config` has, a weight scheduled only where the configured weight is > 0 (the trainer builds a term's
    layer matches, projections and cache for weights > 0 only), and no temperature schedule on a top-k + tail cache
    (whose log-probabilities are stored at one temperature)."""
    schedules = [parse_schedule(item) for item in items or []]
    fields = [s.field for s in schedules]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ValueError(f"schedules: {repeated} scheduled more than once; give one schedule per field.")
    if config is None:
        return schedules
    for schedule in schedules:
        if not hasattr(config, schedule.field):
            raise ValueError(
                f"schedules: DistillationConfig has no field {schedule.field!r}. Use 'temperature' or a loss weight "
                "such as 'logits_weight'."
            )
        if schedule.field != "temperature" and getattr(config, schedule.field) == 0:
            raise ValueError(
                f"schedules: {schedule.field} is scheduled but {schedule.field}=0, and the trainer builds a term (its "
                f"layers, projections, cached teacher outputs) only for a weight > 0. Set {schedule.field} to a value "
                f"> 0 (e.g. {schedule.end}); the schedule then sets it at every step."
            )
        if schedule.field == "temperature" and getattr(config, "teacher_cache_top_k_tail", False):
            raise ValueError(
                "schedules: temperature is scheduled, but teacher_cache_top_k_tail=True stores the teacher's "
                "log-probabilities at one temperature. Remove the temperature schedule, or set "
                "teacher_cache_top_k_tail=False."
            )
    return schedules


def parse_schedule(item: Any) -> TermSchedule:
    """One entry of `DistillationConfig.schedules`: a mapping of `TermSchedule`'s arguments, or the same as a string
    of `key=value` pairs (`"field=temperature start=4 end=1 kind=cosine"`)."""
    if isinstance(item, TermSchedule):
        return item
    if isinstance(item, str):
        pairs = [part.split("=", 1) for part in item.replace(",", " ").split()]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ValueError(
                f"schedules: could not read {item!r}; write key=value pairs of {SCHEDULE_KEYS}, e.g. "
                "'field=temperature start=4.0 end=1.0 kind=cosine'."
            )
        item = {key.strip(): value.strip() for key, value in pairs}
    if not isinstance(item, dict):
        raise ValueError(f"schedules: each entry must be a mapping or a 'key=value ...' string, got {item!r}.")
    unknown = sorted(set(item) - set(SCHEDULE_KEYS))
    if unknown or "field" not in item or "start" not in item:
        raise ValueError(
            f"schedules: entry {item!r} has unknown keys {unknown} or lacks field/start; keys are {SCHEDULE_KEYS}, "
            "e.g. {field: temperature, start: 4.0, end: 1.0, kind: cosine}."
        )
    kwargs = dict(item)
    try:
        for key in ("start", "end"):
            if kwargs.get(key) not in (None, "None"):
                kwargs[key] = float(kwargs[key])
            else:
                kwargs[key] = None
        for key in ("start_step", "end_step"):
            if kwargs.get(key) in (None, "None"):
                kwargs[key] = None if key == "end_step" else 0
            elif isinstance(kwargs[key], str):
                kwargs[key] = int(kwargs[key])
    except ValueError as error:
        raise ValueError(f"schedules: could not read the numbers of {item!r}: {error}.") from None
    if kwargs["start"] is None:
        raise ValueError(f"schedules: entry {item!r} needs a start value.")
    return TermSchedule(**kwargs)
