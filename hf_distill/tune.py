"""Tuning a distillation recipe: `TuneConfig` and `tune_distillation`, over `Trainer.hyperparameter_search` (optuna).

What is searched (each dimension optional, with its range): the temperature, the task/logit balance `alpha`
(`logits_weight = alpha * s`, `task_weight = (1 - alpha) * s`, with `s` the recipe's `task_weight + logits_weight`, so
the scale against the intermediate terms stays the recipe's), the weights of the intermediate terms the recipe turns
on (`hidden_weight`, `attention_weight`, `embeddings_weight`) and the learning rate.

What is selected on: a metric (accuracy by default) on a validation slice carved, with a seed, from the *labelled
training rows*. The slice is removed from the rows the trials train on, and so is any training row, labelled or from
a transfer set, whose text equals a validation text: no row is both trained on and validated on. The dev split (the
data's `validation_file` / `eval_split`, on which the benchmark reports) is never used to choose: a local
`validation_file` is not even opened. (A Hub dataset loads all its splits at once; its eval split is then dropped
unread, except that, as in `scripts/distill.py`, transfer-set rows that copy a dev text are dropped.)

What a trial costs: every trial trains a fresh student (`model_init`) on the same rows. With `use_teacher_cache` the
teacher runs once, over the training rows and the validation slice, before the first trial; the trials read its
outputs from disk, so a trial costs about what training the student alone does (`benchmarks/tune_cost.py`).

The study lives in a sqlite file under `tune_dir`: rerunning the same command continues it up to `n_trials` complete
trials (refused if the search settings changed). The sampler is seeded before every trial from the seed and the
trial's number: the same seed, data and recipe give the same trials, and a study continued after an interruption
samples what it would have sampled uninterrupted (never the points it already tried again).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import DataCollatorWithPadding
from transformers.trainer_utils import SaveStrategy

from .arguments import DataArguments, ModelArguments
from .cache import TeacherCache, TeacherCacheSpec, attach_teacher_cache, build_teacher_cache
from .config import DistillationConfig
from .data import (
    UNLABELLED_COLUMN,
    _texts,
    apply_label_info,
    check_transfer_weights,
    load_task_dataset,
    num_labels_of,
    row_counts,
    tokenize_dataset,
)
from .evaluation import classification_metrics
from .models import check_max_length, load_or_make_student, load_teacher
from .resume import diff_settings, run_settings, setting_defaults
from .trainer import DistillationTrainer, NonFiniteLossError
from .tune_config import (
    DEFAULT_VALIDATION_FRACTION,
    TuneConfig,
    base_params,
    search_dimensions,
    suggest_params,
    trial_values,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- data: the validation slice
def carve_validation(train: Dataset, data_args: DataArguments, tune: TuneConfig) -> tuple[Dataset, Dataset, dict]:
    """Split a raw train split (labelled rows first, then any transfer-set rows) into training and validation rows.

    The validation rows are `tune.validation_size` labelled rows chosen with `tune.validation_seed`; they and every
    other training row whose text equals one of theirs (a duplicate sentence, a transfer-set copy) are removed from
    the training rows, which keep their order (labelled first).

    Returns:
        `(train, validation, info)`, info counting the rows of each.
    """
    counts = row_counts(train)
    labelled = counts["labelled"]
    size = tune.validation_size(labelled)
    if size >= labelled:
        given = "validation_samples" if tune.validation_samples is not None else "validation_fraction"
        raise ValueError(
            f"{given}={getattr(tune, given) or DEFAULT_VALIDATION_FRACTION} holds out {size} rows, but the train "
            f"split has {labelled} labelled rows: none would be left to train on. Hold out fewer rows, or raise "
            "max_train_samples."
        )
    order = np.random.default_rng(tune.validation_seed).permutation(labelled)
    validation_rows = sorted(order[:size].tolist())
    validation = train.select(validation_rows)
    seen = set(_texts(validation, data_args))
    texts = _texts(train, data_args)
    held = set(validation_rows)
    keep = [i for i in range(len(train)) if i not in held and texts[i] not in seen]
    copies = len(train) - size - len(keep)
    if copies:
        logger.warning("dropped %d training rows whose text is also in the validation slice", copies)
    if UNLABELLED_COLUMN in validation.column_names:
        validation = validation.remove_columns(UNLABELLED_COLUMN)
    kept = train.select(keep)
    info = {
        "validation_rows": size,
        "validation_seed": tune.validation_seed,
        "train_rows": row_counts(kept),
        "dropped_training_copies": copies,
    }
    return kept, validation, info


def train_only(data_args: DataArguments) -> DataArguments:
    """`data_args` without its dev split (`validation_file`, `max_eval_samples`): what tuning may look at."""
    return dataclasses.replace(data_args, validation_file=None, max_eval_samples=None)


def load_tuning_splits(data_args: DataArguments, tune: TuneConfig, seed: int) -> tuple[DatasetDict, dict]:
    """`{"train", "validation"}`: the task's train split (with its transfer set) less a validation slice of it.

    The dev split is not loaded from a local `validation_file` (it is not opened at all), nor kept from a Hub
    dataset: tuning must never select on the split the benchmark reports.
    """
    raw = load_task_dataset(train_only(data_args), seed=seed)
    raw.pop("eval", None)
    if "train" not in raw:
        raise ValueError("tuning needs a train split to carve its validation slice from: set train_file or "
                         "dataset_name.")  # fmt: skip
    train, validation, info = carve_validation(raw["train"], data_args, tune)
    return DatasetDict(train=train, validation=validation), info


def _with_cached_teacher(trainer: DistillationTrainer, dataset: Dataset) -> tuple[Dataset, TeacherCache]:
    """`dataset` with the teacher's outputs attached from a cache of the trainer's spec, so evaluating it (once per
    trial) runs no teacher either. The columns are those `remove_unused_columns` keeps, as for the training rows."""
    cache = trainer.teacher_cache
    columns = list(dataset.column_names)
    if trainer.args.remove_unused_columns:
        trainer._set_signature_columns_if_needed()
        columns = [c for c in columns if c in trainer._signature_columns]
    built = build_teacher_cache(
        trainer.teacher,
        dataset,
        trainer.data_collator.collator,
        cache_dir=os.path.dirname(cache.path),
        spec=TeacherCacheSpec(**cache.components["spec"]),
        tokenizer=trainer.processing_class,
        batch_size=trainer.args.per_device_eval_batch_size,
        columns=columns,
    )
    return attach_teacher_cache(dataset, built, verify=False), built


# ---------------------------------------------------------------------- the search
@dataclass
class TuneResult:
    """What `tune_distillation` found: every trial of the study, the best one, and how they were obtained."""

    best: dict[str, Any]
    trials: list[dict[str, Any]]
    settings: dict[str, Any]
    validation: dict[str, Any]
    teacher_cache: dict[str, Any] | None
    tune_dir: str
    storage: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trial_args(args: DistillationConfig, tune_dir: str) -> DistillationConfig:
    """A copy of the recipe's args for the trials: runs under tune_dir, no checkpoints, no push."""
    args = copy.deepcopy(args)
    args.output_dir = os.path.join(tune_dir, "trials")
    args.save_strategy = SaveStrategy.NO  # a trial is judged by its validation score; checkpoints would fill disks
    args.load_best_model_at_end = False
    args.push_to_hub = False
    if args.teacher_cache_dir is None:
        args.teacher_cache_dir = os.path.join(tune_dir, "teacher_cache")
    return args


def _trial_seed(seed: int, number: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, number, stream]).generate_state(1)[0])


def _sampler(tune: TuneConfig):
    """The optuna sampler, reseeded before every trial from `(sampler_seed, trial number)`.

    A sampler seeded once replays its draws from the start whenever the study is continued by a new process: a
    study resumed after a kill would re-run the very points it had already tried (it did: 4 of 12 trials of the
    SST-2 sweep). Seeded per trial, a trial's draws depend only on the seed, its number and the study's history, so
    a continued study samples exactly what an uninterrupted one does.
    """
    import optuna

    base = optuna.samplers.TPESampler if tune.sampler == "tpe" else optuna.samplers.RandomSampler
    seed = tune.sampler_seed

    class PerTrialSeeded(base):
        def before_trial(self, study, trial):
            self._rng.rng.seed(_trial_seed(seed, trial.number, 0))
            inner = getattr(self, "_random_sampler", None)  # TPE's startup / fallback sampler
            if inner is not None:
                inner._rng.rng.seed(_trial_seed(seed, trial.number, 1))
            super().before_trial(study, trial)

    PerTrialSeeded.__name__ = PerTrialSeeded.__qualname__ = f"PerTrialSeeded{base.__name__}"
    sampler = PerTrialSeeded(seed=seed)
    if not hasattr(getattr(sampler, "_rng", None), "rng"):  # optuna's private RNG holder, present in optuna 5
        raise RuntimeError(
            f"optuna {optuna.__version__}'s {base.__name__} keeps its random state elsewhere than optuna 5 did, so "
            "hf-distill cannot seed it per trial (a continued study would repeat its earlier trials). Install "
            "optuna 5 (pip install 'optuna>=5,<6')."
        )
    return sampler


def _trial_record(trial) -> dict[str, Any]:
    seconds = trial.duration.total_seconds() if trial.duration is not None else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": dict(trial.params),
        "values": trial.user_attrs.get("values"),
        "objective": trial.value,
        "metrics": trial.user_attrs.get("metrics"),
        "seconds": seconds,
        "cpu_seconds": trial.user_attrs.get("cpu_seconds"),
        "recipe_values": trial.user_attrs.get("recipe_values", False),
    }


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in settings.items() if k != "run"}, **settings["run"]}


def tune_distillation(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DistillationConfig,
    tune: TuneConfig,
    *,
    teacher=None,
    tokenizer=None,
    enqueue: list[dict[str, float]] | None = None,
) -> TuneResult:
    """Search the recipe's distillation values with `DistillationTrainer.hyperparameter_search` (optuna).

    Args:
        model_args, data_args, training_args: the base recipe (as `scripts/distill.py` parses it).
        tune: what to search and how to select (see [`TuneConfig`]).
        teacher, tokenizer: an already loaded teacher and tokenizer (default: loaded from `model_args`).
        enqueue: trial parameters to run first (after the recipe's own values, with `enqueue_base`).

    Returns:
        A [`TuneResult`]; the study itself stays in `<tune_dir>/study.db`.
    """
    import optuna

    start = time.perf_counter()
    # ------------------------------------------------------------------ checks, before anything is loaded
    dims = search_dimensions(tune, training_args, transfer_set=data_args.transfer_source is not None)
    check_transfer_weights(data_args, training_args)
    tune_dir = tune.tune_dir or f"{training_args.output_dir.rstrip(os.sep)}-tune"
    if training_args.world_size > 1:
        raise ValueError(
            f"tune_distillation runs its trials in one process, got world_size={training_args.world_size}. Run "
            "scripts/tune.py with python (not torchrun / accelerate launch with several processes)."
        )
    args = _trial_args(training_args, tune_dir)

    # ------------------------------------------------------------------ data and models
    raw, validation = load_tuning_splits(data_args, tune, seed=args.seed)
    if teacher is None:
        teacher, tokenizer = load_teacher(model_args, num_labels=num_labels_of(raw, data_args.label_column))
    check_max_length(data_args.max_length, teacher=teacher)
    raw = apply_label_info(raw, data_args.label_column, teacher)
    ds = tokenize_dataset(raw, tokenizer, data_args)
    compute_metrics = classification_metrics()
    labels = np.asarray(ds["validation"]["labels"])
    available = compute_metrics((np.zeros((len(labels), teacher.config.num_labels)), labels))
    if tune.metric != "loss" and tune.metric not in available:
        raise ValueError(
            f"metric={tune.metric!r} is not computed for this task; the validation metrics are "
            f"{sorted(available)} (and 'loss'). Set metric to one of them."
        )

    # ------------------------------------------------------------------ study: created once, continued on reruns
    settings = {
        "search_space": [d.describe() for d in dims],
        "sampler": f"{tune.sampler} (seed {tune.sampler_seed})",
        "metric": f"eval_{tune.metric}",
        "direction": tune.objective_direction(),
        "validation": validation,
        # Everything in the recipe that changes what a trial trains (see hf_distill.resume): a rerun must match it.
        "run": run_settings(model_args, train_only(data_args), training_args, train_rows=len(ds["train"])),
    }
    os.makedirs(tune_dir, exist_ok=True)
    storage = f"sqlite:///{os.path.abspath(os.path.join(tune_dir, 'study.db'))}"
    study = optuna.create_study(
        study_name=tune.study_name, storage=storage, direction=settings["direction"], load_if_exists=True
    )
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
        base = base_params(dims, training_args) if tune.enqueue_base else None
        if base is not None:
            study.enqueue_trial(base, user_attrs={"recipe_values": True})
        for params in enqueue or []:
            study.enqueue_trial(params)
    elif changed := diff_settings(
        _flat(recorded), _flat(settings), setting_defaults(model_args, train_only(data_args), training_args)
    ):
        raise ValueError(
            f"the study {tune.study_name!r} in {storage} was run with other settings ({'; '.join(changed)}). Rerun "
            "with the same settings to continue it, or set another tune_dir (or study_name) to start a new study."
        )
    trainer = DistillationTrainer(
        model_init=lambda: load_or_make_student(model_args, teacher),
        teacher_model=teacher,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    caches = []
    if trainer.teacher_cache is not None:
        trainer.eval_dataset, validation_cache = _with_cached_teacher(trainer, ds["validation"])
        caches = [trainer.teacher_cache, validation_cache]

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    def hp_space(trial) -> dict[str, float]:
        values = trial_values(suggest_params(trial, dims), training_args)
        trial.set_user_attr("values", values)
        current["trial"], current["cpu"] = trial, time.process_time()
        return values

    def compute_objective(metrics: dict[str, float]) -> float:
        trial = current["trial"]
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        # CPU time of this process (all its threads) from the trial's setup to its evaluation: unlike the wall time,
        # hardly changed by other work on a shared machine.
        trial.set_user_attr("cpu_seconds", round(time.process_time() - current["cpu"], 3))
        return metrics[f"eval_{tune.metric}"]

    current: dict[str, Any] = {}
    if done < tune.n_trials:
        trainer.hyperparameter_search(
            hp_space=hp_space,
            compute_objective=compute_objective,
            n_trials=tune.n_trials - done,
            direction=settings["direction"],
            backend="optuna",
            study_name=tune.study_name,
            storage=storage,
            load_if_exists=True,
            sampler=_sampler(tune),
            catch=(NonFiniteLossError,),  # a diverging trial fails alone; the study goes on
        )
    study = optuna.load_study(study_name=tune.study_name, storage=storage)
    waiting = optuna.trial.TrialState.WAITING  # enqueued, not run yet
    trials = [_trial_record(t) for t in study.trials if t.state != waiting]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"no trial of the study in {storage} completed: {[t['state'] for t in trials]}.")
    return TuneResult(
        best=_trial_record(study.best_trial),
        trials=trials,
        settings=settings,
        validation=validation,
        teacher_cache=None
        if not caches
        else {
            "paths": [c.path for c in caches],  # the training rows', the validation slice's
            "built": any(c.built for c in caches),  # by this call (False: found on disk)
            "build_seconds": sum(c.build_seconds for c in caches),  # when they were built
        },
        tune_dir=tune_dir,
        storage=storage,
        seconds=time.perf_counter() - start,
    )
