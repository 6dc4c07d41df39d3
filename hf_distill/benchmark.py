"""Benchmark: fine-tune a teacher, distil one student per recipe plus a no-KD baseline, and compare them on one budget.

`run_benchmark(config)` runs these stages, each in its own folder under `config.output_dir`:

    teacher/                   the teacher fine-tuned on the task (absent when `finetune_teacher: false`)
    teacher-seed<s>/           with `extra_teacher_seeds`: the same fine-tune under seed s, one more teacher of the
                               rows whose recipe sets `teacher_weights` (multi-teacher KD, `hf_distill.benchmark_rows`)
    student_init/              the student built from alternating teacher layers: the start of every row
                               (`student_init_from: pretrained`: the pre-trained model's layers, no head)
    general/                   with `general_recipe`: student_init's body generally distilled from the pre-trained
                               teacher on the training text, the start of the rows of `general_rows`
    rows/<row>/<k>-<recipe>/   the student after stage k of a row (a row is a list of recipes run in order, each
                               stage starting from the previous stage's student); the baseline is a row too
    rows/<row>/seed<s>/...     the same row under another training seed (`student_seeds`)
    rows/<mutual row>/1-<recipe>/peer<k>/   with `mutual_rows`: the peers of deep mutual learning, peer 0 the row's
                               model, every peer and the ensemble evaluated in eval/<row>-peers/ (`benchmark_rows`)
    rows/<chain row>/<k>-<recipe>/   with `chain_rows`: stage k taught by stage k-1's model, each stage a whole row's
                               steps (teacher-assistant chains, born-again networks: `hf_distill.benchmark_chains`)
    teacher_cache/             the teacher's outputs on the training rows, one cache per set of features
                               (`teacher_cache: true`), shared by every distilled row, seed and rerun
    eval/<model>/              dev accuracy, parameters, size on disk and per-row predictions of one final model
                               (`<row>-seed<s>` for a row under another training seed)
    eval/latency/              CPU latency of every final model at batch 1 and 32, timed round-robin
                               (`latency-seed<s>` when the first of `student_seeds` is not `seed`)
    deploy/, eval/<row>-<variant>/, eval/deploy-latency/   with `deploy_rows`: those rows' students exported to ONNX
                               and quantised, evaluated and timed beside the teacher (`hf_distill.benchmark_deploy`)
    results.json, results.md, plots/*.png   rebuilt from the folders above on every run (cheap)

and, with `results_file`, the run's record in the repository (`benchmarks/results/<name>.json`), from which the
tables of `BENCHMARKS.md` are generated (`hf_distill.benchmark_report`).

Resume, stage by stage. A stage writes into `<folder>.tmp` and renames it to `<folder>` when done, so a folder exists
only when its stage finished; its `stage.json` records the settings it was made with. A finished folder is reused
as is (never retrained, never rewritten), and reusing it under different settings is an error rather than a silent
mix of two runs. A Trainer stage keeps its checkpoints in `<folder>.checkpoints` while it trains: an interrupted stage
resumes from its last checkpoint (weights, optimizer, scheduler, RNG and data position), and the checkpoints are
deleted once the stage's folder exists.

Budget. Every student row (the baseline included) trains on the same fixed shuffled `max_train_samples` labelled
rows, with the same batch size and `max_length`. With a transfer set (`unlabelled_file`, `unlabelled_split` or
`unlabelled_from_train`) the distilled rows train on those labelled rows plus the unlabelled ones (teacher terms
only), while the teacher, the no-KD row and any `labelled_only_rows` see the labelled rows only: without a teacher,
unlabelled text teaches nothing, so that is the real-world comparison. Every student row gets the same number of
optimizer steps, `ceil(distilled rows' training rows / batch) * num_train_epochs` (`match_steps`, the default), so
a row on the labelled rows alone cycles over them more often rather than training less; with `match_steps: false`
each row trains `num_train_epochs` over its own rows. Every row's training rows (labelled + unlabelled) and steps
are in results.json and the table. A row of k recipes splits its steps evenly over its stages (TinyBERT: half
intermediate-layer distillation, half logit distillation), so it costs no more optimizer steps than a one-stage row.
Recipes contribute their objective and optimizer settings; the benchmark owns everything that defines the budget and
the bookkeeping (`BENCHMARK_OWNED_KEYS`) and ignores the recipes' model and data arguments (it supplies the teacher,
the student and the data itself).

Noise. One dev point is a handful of sentences, so every student row's points over no-KD come with a 95% paired
bootstrap interval over the dev rows (`paired_bootstrap`), and `student_seeds` trains rows under several seeds (data
order, dropout): the table then shows the mean and the standard deviation over seeds, and the interval pools them.
Each result row keeps `dev_correct` (per training seed, a string of 1/0: dev row i right or wrong), so records of
separate runs of the same benchmark can be combined and their intervals recomputed.

Honesty. Nothing is chosen by dev score: no evaluation during training, no best-checkpoint selection; the final model
of each run is evaluated once. Seeds are fixed (data subset, head initialisation, data order, dropout), so a rerun in a
fresh output folder reproduces the accuracies; latencies are wall-clock medians and vary with the machine's load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .arguments import ModelArguments
from .benchmark_chains import ChainStages

# Re-exported: configuration, stages and reporting live in their own modules; every name stays importable from here.
from .benchmark_config import (  # noqa: F401
    BENCHMARK_PATH_FIELDS,
    BenchmarkConfig,
    check_baseline_recipe,
    check_transfer_recipes,
    load_benchmark_config,
)
from .benchmark_data import TRANSFER_KEYS, BenchmarkInputs  # noqa: F401
from .benchmark_deploy import DeployStages
from .benchmark_eval import EvaluationStages
from .benchmark_general import GeneralStages
from .benchmark_report import (  # noqa: F401
    LOSS_TERMS,
    RESULT_KEYS,
    add_relative_metrics,
    format_table,
    git_state,
    loss_curves,
    make_plots,
    paired_bootstrap,
    results_markdown,
    results_record,
    stale_results_blocks,
    update_results_blocks,
    write_json_atomic,
)
from .benchmark_rows import RowKindStages
from .benchmark_stages import (  # noqa: F401
    BENCHMARK_OWNED_KEYS,
    LOG_HISTORY_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SPEC_FILE,
    STAGE_FILE,
    WEIGHT_SUFFIXES,
    StageResult,
    evaluate_saved_model,
    fingerprint,
    recipe_training_args,
    resolve_teacher,
    run_stage,
    run_trainer_stage,
    save_student_from_layers,
    split_budget,
    total_train_steps,
    train_with_resume,
)
from .config import DistillationConfig
from .data import row_counts
from .models import load_teacher
from .trainer import DistillationTrainer


# ---------------------------------------------------------------------------------------------------- the pipeline
class Benchmark(ChainStages, RowKindStages, DeployStages, EvaluationStages, GeneralStages, BenchmarkInputs):
    """The stages of one benchmark, in the order `run` calls them; data and models are loaded only when a stage needs
    them, so a rerun over finished folders loads nothing."""

    def _common_spec(self) -> dict[str, Any]:
        c = self.config
        keys = ("seed", "train_file", "validation_file", "dataset_name", "dataset_config", "train_split", "eval_split")
        keys += ("text_column", "label_column", "max_length", "max_train_samples", "per_device_train_batch_size")
        return {k: getattr(c, k) for k in keys}

    def _training_args(self, cls, output_dir: str, **kwargs):
        c = self.config
        kwargs.setdefault("seed", c.seed)
        return cls(
            output_dir=output_dir,
            per_device_train_batch_size=c.per_device_train_batch_size,
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
    def teacher_stage(self, seed: int | None = None) -> dict[str, Any]:
        """`teacher/`; with another `seed` (`extra_teacher_seeds`), the same fine-tune under that seed (head
        initialisation, data order, dropout) into `teacher-seed<seed>/`."""
        c = self.config
        seed = c.seed if seed is None else seed
        folder = "teacher" if seed == c.seed else f"teacher-seed{seed}"
        spec = {
            "stage": folder,
            "teacher": c.teacher_model_name_or_path,
            "learning_rate": c.teacher_learning_rate,
            "num_train_epochs": c.teacher_num_train_epochs,
            **self._common_spec(),
            **({"teacher_seed": seed} if seed != c.seed else {}),
        }
        if not c.finetune_teacher:
            return {**spec, "given": self.teacher_dir}
        stage_dir = self.out / folder

        def make_trainer(output_dir: str) -> Trainer:
            set_seed(seed)  # the new classification head is initialised from this seed
            model, _ = load_teacher(ModelArguments(teacher_model_name_or_path=self.base_teacher), self.num_labels)
            args = self._training_args(
                TrainingArguments,
                output_dir,
                num_train_epochs=c.teacher_num_train_epochs,
                learning_rate=c.teacher_learning_rate,
                seed=seed,
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

        self.stages.append(run_trainer_stage(stage_dir, spec, make_trainer))
        return spec

    # ------------------------------------------------------------------ (2) the student, from alternating layers
    def student_init_stage(self, teacher_spec: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        spec = {
            "stage": "student_init",
            "teacher": fingerprint(teacher_spec),
            "num_layers": c.student_num_layers,
            "layers": c.student_layers,
            **({"from": c.student_init_from} if c.student_init_from != "teacher" else {}),
        }

        def work(tmp: Path) -> dict:
            if c.student_init_from == "pretrained":
                return self.pretrained_student_work(tmp)
            return save_student_from_layers(self.teacher, self.tokenizer, tmp, c.student_num_layers, c.student_layers)

        self.stages.append(run_stage(self.out / "student_init", spec, work))
        return spec

    # ------------------------------------------------------------------ (3)+(4) one row: its stages in order
    def row_stages(
        self,
        name: str,
        recipes: list[str],
        init_spec: dict[str, Any],
        transfer: bool = False,
        seed: int | None = None,
        start: tuple[Path, dict[str, Any]] | None = None,
    ) -> tuple[Path, dict, list]:
        """Train a row's stages in order, each from the previous stage's student; return the final stage's folder.

        `transfer`: a distilled row that trains on the transfer set too (when the benchmark has one). `seed`: the
        training seed (data order, dropout); the benchmark's `seed` by default. Another seed trains into
        `rows/<row>/seed<seed>/`, from the same student and on the same rows. `start`: the folder and spec of the
        student the row starts from (default `student_init/`; `general/` for the rows of `general_rows`).
        """
        c = self.config
        seed = c.seed if seed is None else seed
        if name in c.chain_rows:  # each stage taught by the previous one's model (hf_distill.benchmark_chains)
            return self.chain_row_stages(name, recipes, init_spec, transfer, seed)
        if name in c.mutual_rows:  # trained by MutualLearningTrainer (hf_distill.benchmark_rows)
            return self.mutual_row_stages(name, recipes[0], init_spec, seed)
        distilled = name != c.baseline_name
        transfer_spec = self.transfer_spec() if transfer else {}
        total_steps = self.row_steps(transfer)
        previous_dir, previous_spec = start or (self.out / "student_init", init_spec)
        row_dir = self.out / "rows" / name / ("" if seed == c.seed else f"seed{seed}")
        stage_infos = []
        for k, recipe_path in enumerate(recipes, start=1):
            training = recipe_training_args(self._path(recipe_path))
            cache = self.cache_args(training) if distilled else {}
            stage_name = f"{k}-{Path(recipe_path).stem}"
            steps = split_budget(total_steps, len(recipes))[k - 1]
            spec = {
                "stage": f"{name}/{stage_name}",
                "start": fingerprint(previous_spec),
                "recipe": training,
                "stage_index": k,
                "num_stages": len(recipes),
                "num_train_epochs": c.num_train_epochs,
                **self._common_spec(),
                **transfer_spec,  # changing the transfer set retrains the distilled rows, never reuses them
                # Only where they differ from what earlier benchmarks did, so finished stages of those stay valid:
                **({"steps": steps} if steps != split_budget(self.steps(transfer), len(recipes))[k - 1] else {}),
                **({"train_seed": seed} if seed != c.seed else {}),
                **({"teacher_cache": True} if cache else {}),  # float16 storage: close to, not equal to, live
                **self.extra_teacher_spec(training),  # a multi-teacher stage: a changed extra teacher retrains it
            }
            stage_dir = row_dir / stage_name
            start_dir = previous_dir

            def make_trainer(output_dir: str, training=training, start_dir=start_dir, steps=steps, cache=cache):
                set_seed(seed)
                student = AutoModelForSequenceClassification.from_pretrained(start_dir)
                args = self._training_args(
                    DistillationConfig, output_dir, max_steps=steps, seed=seed, **{**training, **cache}
                )
                return DistillationTrainer(
                    model=student,
                    teacher_model=self.teachers_of(training),  # every teacher when the recipe sets teacher_weights
                    args=args,
                    train_dataset=self.train_rows(transfer),
                    processing_class=self.tokenizer,
                    data_collator=self.collator,
                )

            result = run_trainer_stage(stage_dir, spec, make_trainer)
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

    def cache_args(self, training: dict[str, Any]) -> dict[str, Any]:
        """The teacher-cache arguments of a distilled stage: one cache folder for the whole benchmark, in which each
        set of cached features (logits; + hidden states; + attention maps) is built once and reused by every row,
        seed and rerun. Empty when `teacher_cache` is off or the recipe sets its own cache arguments."""
        if not self.config.teacher_cache or "use_teacher_cache" in training:
            return {}
        fields_ = DistillationConfig.__dataclass_fields__
        attention = training.get("attention_weight", fields_["attention_weight"].default) > 0
        return {
            "use_teacher_cache": True,
            "teacher_cache_dir": str(self.out / "teacher_cache"),
            "teacher_cache_attentions": attention,
        }

    # ------------------------------------------------------------------ all of it
    def run(self) -> dict[str, Any]:
        c = self.config
        check_baseline_recipe(self._path(c.baseline_recipe))
        check_transfer_recipes(c, self._path)
        self.check_row_recipes()  # multi-teacher and mutual-learning recipes (hf_distill.benchmark_rows)
        self.check_chain_rows()  # every stage's recipe and depth (hf_distill.benchmark_chains)
        self.out.mkdir(parents=True, exist_ok=True)
        teacher_spec = self.teacher_stage()
        extra_teachers = self.extra_teacher_stages()  # teacher-seed<s>/ for each of extra_teacher_seeds
        init_spec = self.student_init_stage(teacher_spec)
        student_layers = self.stages[-1].info.get("teacher_layers")  # the teacher layers student_init copies
        rows = {c.baseline_name: [c.baseline_recipe], **c.rows, **{n: [r] for n, r in c.mutual_rows.items()}}
        rows |= c.chain_rows  # row name -> its stages ({recipe, num_layers})
        labelled_only = {c.baseline_name, *c.labelled_only_rows, *c.mutual_rows}  # DML: labelled rows, like no-KD
        transfer = {name: name not in labelled_only for name in rows}
        general = self.general_stage(init_spec) if c.general_recipe else None
        starts = {name: general if name in c.general_rows else None for name in rows}
        main_seed = c.student_seeds[0]  # its models are evaluated, timed and shown
        trained = {
            name: self.row_stages(name, recipes, init_spec, transfer[name], seed=main_seed, start=starts[name])
            for name, recipes in rows.items()
        }
        # Further training seeds: the same rows from the same student, another data order and dropout.
        extra_seeds = {name: list(c.student_seeds[1:]) for name in rows if c.seed_rows is None or name in c.seed_rows}
        reseeded = {
            (name, s): self.row_stages(name, rows[name], init_spec, transfer[name], seed=s, start=starts[name])
            for name, seeds in extra_seeds.items()
            for s in seeds
        }

        finals = {"teacher": (self.teacher_dir, teacher_spec), **extra_teachers}
        finals.update({name: (final_dir, final_spec) for name, (final_dir, final_spec, _) in trained.items()})
        evaluations = {
            name: self.eval_stage(name if name in self.teacher_names else self.eval_name(name, main_seed), path, spec)
            for name, (path, spec) in finals.items()
        }
        seed_evaluations = {
            key: self.eval_stage(self.eval_name(*key), path, spec) for key, (path, spec, _) in reseeded.items()
        }
        latency = self.latency_stage(finals, self.eval_name("latency", main_seed))
        for name, latencies in latency["latencies"].items():
            evaluations[name].update(latencies)
        deploy = self.deploy_stages(finals, evaluations, main_seed)  # [] without deploy_rows

        # Training seeds per row, the evaluated-and-timed one first; the teachers train under `seed` (and their own).
        seeds_of = {name: [c.seed] for name in self.teacher_names}
        seeds_of |= {name: [main_seed, *extra_seeds.get(name, [])] for name in rows}
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
        results_rows += self.extra_teacher_rows(evaluations)
        for name, (_, _, stage_infos) in trained.items():
            seeds = seeds_of[name]
            per_seed = [evaluations[name]["accuracy"]] + [seed_evaluations[name, s]["accuracy"] for s in seeds[1:]]
            row = {
                "name": name,
                "recipes": [Path(s["recipe"]).stem for s in stage_infos],
                "stages": stage_infos,
                "train_steps": sum(s["steps"] or 0 for s in stage_infos),
                "train_seconds": sum(s["seconds"] for s in stage_infos),
                **_rows_of(stage_infos[0]),
                **evaluations[name],
                "transfer_set": transfer[name] and bool(self.transfer_spec()),
                "seeds": seeds,
                **({"general_steps": c.general_steps} if name in c.general_rows else {}),
            }
            if len(seeds) > 1:
                # The accuracy of a row trained under several seeds is their mean; size and latency are the first's.
                row.update(accuracy=float(np.mean(per_seed)), accuracy_std=float(np.std(per_seed, ddof=1)))
                row["accuracy_per_seed"] = dict(zip(seeds, per_seed))
            results_rows.append(row)
        self.add_peer_results(results_rows, finals, main_seed)  # mutual rows: every peer's and the ensemble's accuracy
        add_relative_metrics(results_rows, baseline=c.baseline_name)
        correct = {name: self.correct_by_seed(name, seeds) for name, seeds in seeds_of.items()}
        self.add_intervals(results_rows, correct)
        for row in results_rows:  # per dev row, right (1) or wrong (0), per training seed: records can be combined
            if correct[row["name"]] is not None:
                row["dev_correct"] = {
                    str(s): "".join("1" if ok else "0" for ok in v) for s, v in correct[row["name"]].items()
                }

        results = {
            "benchmark": c.name,
            "config": {k: v for k, v in dataclasses.asdict(c).items() if k != "source_root"},  # no machine path
            "teacher": self.teacher_dir,
            "output_dir": str(self.out),
            "budget": {
                "train_rows": c.max_train_samples,
                "steps_per_student_row": sum(s["steps"] or 0 for s in trained[c.baseline_name][2]),
                "student_teacher_layers": student_layers,
                "match_steps": c.match_steps,
                "transfer_set": self.transfer_spec() or None,
                "teacher_cache": c.teacher_cache,
                "student_seeds": list(c.student_seeds),
                "per_device_train_batch_size": c.per_device_train_batch_size,
                "max_length": c.max_length,
                "num_train_epochs": c.num_train_epochs,
                "stage_split": "a row of k recipes gives each stage 1/k of the steps",
                **({"chain_stages": "every stage of a chain row trains a whole row's steps"} if c.chain_rows else {}),
                **({"student_init_from": c.student_init_from} if c.student_init_from != "teacher" else {}),
                **({"general_steps": c.general_steps, "general_rows": c.general_rows} if c.general_recipe else {}),
                **self.rows_budget(),  # extra_teacher_seeds, mutual_rows (only when set)
            },
            "torch_threads": latency["torch_threads"],
            "rows": results_rows,
            **({"deploy": deploy} if deploy else {}),
            "stages": [{"path": s.path, "status": s.status, "seconds": round(s.seconds, 1)} for s in self.stages],
        }
        results["plots"] = make_plots(results, self.out / "plots", self.out / "teacher" / LOG_HISTORY_FILE)
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        (self.out / "results.md").write_text(results_markdown(results), encoding="utf-8")
        results["paths"] = {"results_json": str(self.out / "results.json"), "results_md": str(self.out / "results.md")}
        return results


def _rows_of(counts: dict[str, int]) -> dict[str, int | None]:
    return {"train_rows_labelled": counts.get("labelled"), "train_rows_unlabelled": counts.get("unlabelled")}


def run_benchmark(
    config: BenchmarkConfig, root: str | os.PathLike | None = None, *, command: str | None = None
) -> dict[str, Any]:
    """Run (or resume, or reuse) every stage of a benchmark and write results.json, results.md and the plots; with
    `config.results_file`, also the results record committed with the repository (`results_record`).

    Relative paths are resolved against `root`; default: the repository holding the config file (`source_root`).
    `command`: how the run was started, for the record (the script passes its command line).
    """
    root = root if root is not None else config.source_root
    if root is None:
        raise ValueError(
            "root is None and the config was not read from a file: pass root=<the repository root> to resolve its "
            "relative paths against."
        )
    start = time.perf_counter()
    bench = Benchmark(config, root)
    started = git_state(bench.root)  # the code that runs is the code of now, however long the run takes
    results = bench.run()
    if config.results_file:
        path = bench._path(config.results_file.format(name=config.name))
        command = command or f"run_benchmark(load_benchmark_config(...), name={config.name!r})"
        write_json_atomic(path, results_record(results, command=command, root=bench.root, started=started,
                                               invocation_seconds=time.perf_counter() - start))  # fmt: skip
        results["paths"]["record"] = str(path)
    return results
