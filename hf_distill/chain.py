"""Multi-stage distillation: each stage's distilled student is the next stage's teacher.

Two methods are one pipeline here:

- **Teacher-assistant chains** (TAKD, [Mirzadeh et al. 2020](https://arxiv.org/abs/1902.03393)): a large gap between
  teacher and student is bridged by intermediate "assistants", e.g. 12 -> 6 -> 3 layers: stage 1 builds a 6-layer
  student from the teacher (`make_student`) and distils it; stage 2 builds a 3-layer student from the stage-1 student
  and distils it with the stage-1 student as its teacher.
- **Born-again networks** ([Furlanello et al. 2018](https://arxiv.org/abs/1805.04770)): generations of one
  architecture, generation k+1 taught by generation k. The paper re-initialises every generation at random
  (`init: scratch`). For pre-trained transformers a random start throws the pre-training away, so the practical
  variant, and the default, is `init: teacher_layers`: the student is `make_student` of the current teacher (with all
  its layers, a copy of it), which then keeps learning from the task labels and from its frozen predecessor.

`run_chain(config)` runs the stages in order, each in its own folder under `config.output_dir`:

    stage<k>-<name>/          stage k's student, saved with its tokenizer as a plain transformers model
    stage<k>-<name>.checkpoints/   its Trainer checkpoints while it trains (deleted once the folder exists)
    eval/teacher/, eval/stage<k>-<name>/   accuracy, parameters and size of each model on the eval split (if any)
    chain.json                the summary: per stage its teacher, layers, parameters, steps and accuracy

Resume, stage by stage, as the benchmark does (`hf_distill.benchmark_stages.run_stage`): a finished stage folder is
reused and never retrained, an interrupted stage resumes from its last checkpoint, and a stage whose inputs changed
(its recipe, overrides, layers, budget, data, or any stage before it: each stage's spec holds its teacher's
fingerprint) is refused instead of mixing two runs. The given teacher is identified by the bytes of its config and
weight files, so a teacher folder overwritten in place is noticed too.

Every stage trains for `max_steps` optimizer steps (default: `num_train_epochs` over the training rows) under the
chain's `seed`, batch size and data; a stage's recipe contributes its objective and optimizer settings (the keys
`BENCHMARK_OWNED_KEYS` leaves it), and `overrides` change them for that stage alone. Sequence classification only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from .arguments import DataArguments
from .benchmark_stages import (
    WEIGHT_SUFFIXES,
    StageResult,
    evaluate_saved_model,
    fingerprint,
    resolve_teacher,
    run_stage,
    total_train_steps,
    train_with_resume,
)

# Re-exported: the configuration and its checks live in their own module; every name stays importable from here.
from .chain_config import (  # noqa: F401
    CHAIN_PATH_FIELDS,
    INIT_CHOICES,
    ChainConfig,
    ChainStage,
    PlannedStage,
    load_chain_config,
    plan_chain,
    resolve_path,
)
from .config import DistillationConfig
from .data import load_task_dataset, num_labels_of, tokenize_dataset
from .files import write_text_atomic
from .student import make_student
from .trainer import DistillationTrainer

CHAIN_FILE = "chain.json"


def _teacher_identity(spec: str, resolved: str) -> dict[str, Any]:
    """The chain teacher as stage 1's spec records it: the path as written and, for a local folder, the SHA-256 of
    its config and weight files (a folder overwritten in place then invalidates every stage built from it)."""
    identity: dict[str, Any] = {"teacher": spec}
    folder = Path(resolved)
    if folder.is_dir():
        identity["files"] = model_files_digest(folder)
    return identity


def model_files_digest(folder: str | os.PathLike) -> dict[str, str]:
    """File name -> SHA-256 of a saved model's config.json and weight files: the model's identity by content (the
    benchmark's chain rows put their teacher's in each stage's spec too)."""
    files = sorted(p for p in Path(folder).iterdir() if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    return {p.name: _sha256(p) for p in files}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_student(teacher, plan: PlannedStage, seed: int):
    """Stage `plan`'s student from its teacher: `make_student` of the planned layers, or (init scratch) a freshly
    initialised model of that config, drawn from `seed`."""
    if plan.layers is not None:
        return make_student(teacher, layers=plan.layers)
    student = make_student(teacher, num_layers=plan.num_layers, verbose=False)  # for its config only
    config = student.config
    del config.distillation_teacher_layers  # nothing was copied
    set_seed(seed)
    return type(student)._from_config(config)


# ---------------------------------------------------------------------------------------------------- the run
class Chain:
    """The stages of one chain, with data and tokenizer loaded on first use."""

    def __init__(self, config: ChainConfig, root: str | os.PathLike):
        self.config = config
        self.root = Path(root).resolve()
        self.out = resolve_path(self.root, config.output_dir or os.path.join("outputs", "chains", config.name))
        self.stages: list[StageResult] = []

    @cached_property
    def teacher_dir(self) -> str:
        return resolve_teacher(self.config.teacher_model_name_or_path, self.root)

    @cached_property
    def data_args(self) -> DataArguments:
        c = self.config
        files = {}
        for name in ("train_file", "validation_file"):
            value = getattr(c, name)
            if value:
                if not resolve_path(self.root, value).is_file():
                    raise FileNotFoundError(
                        f"{name}={value!r} does not exist (looked in {resolve_path(self.root, value)})."
                    )
                files[name] = str(resolve_path(self.root, value))
        keys = ("dataset_name", "dataset_config", "train_split", "eval_split", "text_column", "text_pair_column")
        keys += ("label_column", "max_length", "max_train_samples", "max_eval_samples")
        hub = {k: getattr(c, k) for k in keys if not (files and k.startswith("dataset_"))}
        return DataArguments(**files, **hub)

    @cached_property
    def dataset(self):
        raw = load_task_dataset(self.data_args, seed=self.config.seed)
        teacher_labels = AutoConfig.from_pretrained(self.teacher_dir).num_labels
        if num_labels_of(raw, self.config.label_column) != teacher_labels:
            raise ValueError(
                f"the data has {num_labels_of(raw, self.config.label_column)} labels but the teacher "
                f"{self.config.teacher_model_name_or_path!r} has {teacher_labels}: the chain needs a teacher "
                "fine-tuned on this task."
            )
        return tokenize_dataset(raw, self.tokenizer, self.data_args)

    @cached_property
    def tokenizer(self):
        c = self.config
        return AutoTokenizer.from_pretrained(_local_or_id(self.root, c.tokenizer_name_or_path) or self.teacher_dir)

    @cached_property
    def collator(self):
        return DataCollatorWithPadding(self.tokenizer)

    def data_spec(self) -> dict[str, Any]:
        c = self.config
        keys = ("seed", "train_file", "dataset_name", "dataset_config", "train_split", "text_column")
        keys += ("text_pair_column", "label_column", "max_length", "max_train_samples", "per_device_train_batch_size")
        return {k: getattr(c, k) for k in keys} | {"tokenizer": c.tokenizer_name_or_path}

    def stage(self, plan: PlannedStage, teacher_dir: str, teacher_spec: dict) -> tuple[Path, dict, StageResult]:
        """Train stage `plan` from the teacher in `teacher_dir` (or reuse it); return its folder, spec and result."""
        c = self.config
        stage = c.stages[plan.index - 1]
        steps = stage.max_steps or total_train_steps(
            len(self.dataset["train"]), c.per_device_train_batch_size, c.num_train_epochs
        )
        spec = {
            "stage": plan.folder,
            "teacher": fingerprint(teacher_spec),
            "init": stage.init,
            "num_layers": plan.num_layers,
            "layers": plan.layers,
            "training": plan.training,
            "steps": steps,
            **self.data_spec(),
        }
        stage_dir = self.out / plan.folder
        checkpoints = self.out / f"{plan.folder}.checkpoints"
        built: dict[str, Any] = {}

        def make_trainer(output_dir: str) -> DistillationTrainer:
            set_seed(c.seed)
            teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval().requires_grad_(False)
            student = build_student(teacher, plan, c.seed)
            built["params"] = student.num_parameters()
            args = DistillationConfig(
                output_dir=output_dir,
                max_steps=steps,
                per_device_train_batch_size=c.per_device_train_batch_size,
                seed=c.seed,
                eval_strategy="no",  # nothing is evaluated, hence nothing chosen, during training
                save_strategy="steps",
                save_steps=c.save_steps,
                save_total_limit=1,
                logging_steps=c.logging_steps,
                report_to="none",
                **plan.training,
            )
            return DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=self.dataset["train"],
                processing_class=self.tokenizer,  # saved with the student by save_model
                data_collator=self.collator,
            )

        def work(tmp: Path) -> dict:
            info = train_with_resume(make_trainer, tmp, checkpoints, spec)
            return {**info, "params": built["params"]}

        result = run_stage(stage_dir, spec, work, cleanup=[checkpoints])
        self.stages.append(result)
        return stage_dir, spec, result

    def evaluate(self, name: str, model_dir: str | Path, model_spec: dict) -> dict[str, Any] | None:
        """Accuracy, parameters and size of a saved model on the eval split (None without one), as its own stage."""
        c = self.config
        if "eval" not in self.dataset:
            return None
        spec = {
            "stage": f"eval/{name}",
            "model": fingerprint(model_spec),
            "eval": {k: getattr(c, k) for k in ("validation_file", "dataset_name", "eval_split", "max_eval_samples")},
            "max_length": c.max_length,
        }

        def work(tmp: Path) -> dict:
            metrics = evaluate_saved_model(
                model_dir, self.dataset["eval"], self.collator, batch_size=c.eval_batch_size, desc=name
            )
            write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=2))
            return {"metrics": metrics}

        result = run_stage(self.out / "eval" / name, spec, work)
        self.stages.append(result)
        return result.info["metrics"]

    def run(self) -> dict[str, Any]:
        c = self.config
        plans = plan_chain(c, self.root)  # every stage checked before anything trains
        self.out.mkdir(parents=True, exist_ok=True)
        teacher_dir, teacher_spec = self.teacher_dir, _teacher_identity(c.teacher_model_name_or_path, self.teacher_dir)
        teacher_eval = self.evaluate("teacher", teacher_dir, teacher_spec)
        summary = {
            "teacher": c.teacher_model_name_or_path,
            "layers": plans[0].teacher_depth,
            **({"accuracy": teacher_eval["accuracy"], "params": teacher_eval["params"]} if teacher_eval else {}),
        }
        rows, teacher_name = [], "teacher"
        for plan in plans:
            stage = c.stages[plan.index - 1]
            stage_dir, spec, result = self.stage(plan, teacher_dir, teacher_spec)
            info = result.info
            metrics = self.evaluate(plan.folder, stage_dir, spec)
            rows.append(
                {
                    "stage": plan.index,
                    "name": stage.name,
                    "path": str(stage_dir),
                    "teacher": teacher_name,
                    "recipe": stage.recipe,
                    "overrides": stage.overrides,
                    "init": stage.init,
                    "teacher_layers": plan.teacher_depth,
                    "num_layers": plan.num_layers,
                    "layers": plan.layers,
                    "original_teacher_layers": plan.original_layers,
                    "params": info.get("params"),
                    "steps": info.get("global_step"),
                    "accuracy": metrics["accuracy"] if metrics else None,
                    "status": result.status,
                    "seconds": result.seconds,
                }
            )
            teacher_dir, teacher_spec, teacher_name = str(stage_dir), spec, plan.folder
        results = {
            "chain": c.name,
            "output_dir": str(self.out),
            "seed": c.seed,
            "teacher": summary,
            "stages": rows,
            "runs": [{"path": s.path, "status": s.status, "seconds": round(s.seconds, 1)} for s in self.stages],
        }
        write_text_atomic(self.out / CHAIN_FILE, json.dumps(results, indent=2, default=str) + "\n")
        results["paths"] = {"chain_json": str(self.out / CHAIN_FILE), "final": rows[-1]["path"]}
        return results


def _local_or_id(root: Path, value: str | None) -> str | None:
    if not value:
        return None
    return str(resolve_path(root, value)) if resolve_path(root, value).exists() else value


def run_chain(config: ChainConfig, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run (or resume, or reuse) every stage of a chain in order and write `<output_dir>/chain.json`.

    Relative paths are resolved against `root`; default: the repository holding the config file (`source_root`).
    Returns the summary written to chain.json, plus `paths` (`chain_json`, `final`: the last stage's folder).
    """
    root = root if root is not None else config.source_root
    if root is None:
        raise ValueError(
            "root is None and the config was not read from a file: pass root=<the repository root> to resolve its "
            "relative paths against."
        )
    start = time.perf_counter()
    results = Chain(config, root).run()
    results["seconds"] = time.perf_counter() - start
    return results
