"""Benchmark rows that are not "one teacher, one student": multi-teacher KD and deep mutual learning.

**Multi-teacher rows** (`hf_distill.multi_teacher`). `extra_teacher_seeds: [43]` fine-tunes one more teacher per seed,
exactly as the teacher is fine-tuned (same checkpoint, rows, recipe and budget) but with that seed for its new
classification head, data order and dropout, each in its own resumable stage `teacher-seed<s>/`, evaluated and timed
as its own row of the table. A row whose recipe sets `teacher_weights` (one weight per teacher: the teacher first,
then the extra ones in the order of `extra_teacher_seeds`) is trained by `DistillationTrainer(teacher_model=[teacher,
*extra teachers])`; every other row keeps the one teacher. The row's stage spec holds the extra teachers'
fingerprints, so a changed extra teacher retrains the row instead of reusing it. Several teachers cannot be served
by the teacher cache: such a recipe sets `use_teacher_cache: false` (the teachers run live).

**Mutual-learning rows** (`hf_distill.mutual`, Zhang et al. 2018, https://arxiv.org/abs/1706.00384).
`mutual_rows: {dml: recipes/.../mutual/benchmark_dml.yaml}` trains `mutual_num_peers` (2) copies of `student_init/`
together by `MutualLearningTrainer`, no teacher, for the steps of every other student row, on the labelled rows alone
(like no-KD: DML's mutual term could read unlabelled text too, but the paper trains on labelled data, and the
comparison with no-KD stays one of objectives on the same rows). Peer 0, saved as a plain transformers model in
`rows/<row>/1-<recipe>/peer0/`, is the row's model (evaluated, timed and compared like any student); the row also
reports every peer's dev accuracy and the ensemble's (argmax of the peers' mean softmax, `eval/<row>-peers/`).

With `student_init_from: teacher` the peers start identical (the same body and head), so they differ only through
their own dropout masks at first: the mutual term starts as a dropout-consistency term (as in R-Drop) and grows as
the peers drift apart. With `student_init_from: pretrained` each peer also draws its own classification head (peer 0
the same head as every other row's).

`check_row_kinds` checks the configuration fields (called by `BenchmarkConfig`); `RowKindStages.check_row_recipes`
checks the recipes before any stage runs.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForSequenceClassification, set_seed

from .benchmark_config import is_folder_name
from .benchmark_stages import (
    BENCHMARK_OWNED_KEYS,
    METRICS_FILE,
    fingerprint,
    recipe_training_args,
    run_stage,
    run_trainer_stage,
)
from .data import row_counts
from .evaluation import predict_logits


def extra_teacher_name(seed: int) -> str:
    """The folder and table row of the extra teacher fine-tuned under `seed`: `teacher-seed<seed>`."""
    return f"teacher-seed{seed}"


def check_row_kinds(config) -> None:
    """`BenchmarkConfig`'s checks of `extra_teacher_seeds`, `mutual_rows` and `mutual_num_peers` (the recipes are
    checked at run time, against the repository root, by `RowKindStages.check_row_recipes`)."""
    seeds = config.extra_teacher_seeds
    if (
        isinstance(seeds, (str, int))
        or not isinstance(seeds, (list, tuple))
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
        or config.seed in seeds
    ):
        raise ValueError(
            f"extra_teacher_seeds must be a list of distinct integers other than seed={config.seed} (the teacher's "
            f"own), got {seeds!r}. E.g. extra_teacher_seeds: [{config.seed + 1}]."
        )
    config.extra_teacher_seeds = list(seeds)
    if seeds and not config.finetune_teacher:
        raise ValueError(
            f"extra_teacher_seeds={list(seeds)} fine-tunes more teachers like the teacher under other seeds, but "
            "finetune_teacher is false (the teacher is given, not fine-tuned). Set finetune_teacher: true, or drop "
            "extra_teacher_seeds."
        )
    rows = config.mutual_rows
    if not isinstance(rows, dict) or not all(isinstance(p, str) and p for p in rows.values()):
        raise ValueError(
            f"mutual_rows must map row names to one mutual-learning recipe each, got {rows!r}. E.g. mutual_rows: "
            "{dml: recipes/minilm-sst2_to_minilm-l3/mutual/benchmark_dml.yaml}."
        )
    chains = getattr(config, "chain_rows", None) or {}  # hf_distill.benchmark_chains
    taken = {"teacher", config.baseline_name, *config.rows, *chains, *map(extra_teacher_name, seeds)}
    for name in [*config.rows, *chains, *rows]:
        if name in map(extra_teacher_name, seeds):
            raise ValueError(f"row name {name!r} is taken (the teacher fine-tuned under seed {name[12:]}).")
    for name in rows:
        if not is_folder_name(name):
            raise ValueError(f"row name {name!r} must be a plain folder name like 'dml' (letters, _, -).")
        if name in taken:
            raise ValueError(
                f"mutual_rows names {name!r}, which is already a row of this benchmark (the teacher, the baseline, "
                "an extra teacher, one of rows or chain_rows). Give the mutual-learning row its own name, e.g. dml."
            )
    peers = config.mutual_num_peers
    if isinstance(peers, bool) or not isinstance(peers, int) or peers < 2:
        raise ValueError(
            f"mutual_num_peers must be an integer >= 2 (mutual learning needs at least two peers), got {peers!r}. "
            "E.g. mutual_num_peers: 2."
        )


def mutual_training_args(path: str | Path) -> dict[str, Any]:
    """The `MutualLearningConfig` keys of the mutual-learning recipe at `path`, less the benchmark-owned ones; its
    keys are checked against `scripts/mutual.py`'s dataclasses (its peer and data arguments are ignored here)."""
    from .arguments import DataArguments
    from .mutual_config import MutualLearningConfig, PeerArguments
    from .recipes import check_recipe_keys

    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of field: value, got {type(recipe).__name__}.")
    check_recipe_keys(recipe, (PeerArguments, DataArguments, MutualLearningConfig), source=str(path))
    fields_ = MutualLearningConfig.__dataclass_fields__
    return {k: v for k, v in recipe.items() if k in fields_ and k not in BENCHMARK_OWNED_KEYS}


class RowKindStages:
    """Mixed into `hf_distill.benchmark.Benchmark`: the extra teachers, the multi-teacher plumbing of a distilled
    row, and the mutual-learning rows. Needs its `config`, `out`, `teacher`, `teacher_stage`, `cache_args`, ..."""

    # ------------------------------------------------------------------ checks, before any stage
    def check_row_recipes(self) -> None:
        """Refuse, before any training, a multi-teacher recipe whose `teacher_weights` do not give one weight per
        teacher of the benchmark, or that the benchmark's teacher cache would serve, and a mutual-learning recipe
        that is missing or invalid."""
        from .mutual_config import MutualLearningConfig

        c = self.config
        n = 1 + len(c.extra_teacher_seeds)
        names = ["teacher", *map(extra_teacher_name, c.extra_teacher_seeds)]
        for name, recipes in c.rows.items():
            for path in recipes:
                training = recipe_training_args(self._path(path))
                weights = training.get("teacher_weights")
                if weights is None:
                    continue
                if isinstance(weights, (list, tuple)) and len(weights) != n:
                    raise ValueError(
                        f"row {name!r}, recipe {path}: teacher_weights={list(weights)} has {len(weights)} entries but "
                        f"this benchmark has {n} teacher(s) ({', '.join(names)}; extra_teacher_seeds="
                        f"{c.extra_teacher_seeds}). Give one weight per teacher, the teacher first, or set "
                        f"extra_teacher_seeds to {len(weights) - 1} seed(s), e.g. extra_teacher_seeds: "
                        f"{[c.seed + 1 + i for i in range(max(len(weights) - 1, 0))]}."
                    )
                if n > 1 and self.cache_args(training):
                    raise ValueError(
                        f"row {name!r}, recipe {path}: teacher_weights={list(weights)} distils from {n} teachers, "
                        "which the teacher cache cannot serve (it holds one teacher's outputs), and this benchmark's "
                        "teacher_cache: true would give the row the cache. Set use_teacher_cache: false in the recipe "
                        "(the teachers then run live), as recipes/minilm-sst2_to_minilm-l3/multi_teacher_seeds.yaml "
                        "does."
                    )
        for name, path in c.mutual_rows.items():
            file = self._path(path)
            if not file.is_file():
                raise FileNotFoundError(
                    f"mutual_rows[{name!r}]={path!r} does not exist (looked in {file}). Give a mutual-learning "
                    "recipe, e.g. recipes/minilm-sst2_to_minilm-l3/mutual/benchmark_dml.yaml."
                )
            try:
                self._training_args(
                    MutualLearningConfig, str(self.out / "rows" / name), max_steps=1, **mutual_training_args(file)
                )
            except ValueError as e:
                raise ValueError(f"mutual_rows[{name!r}] ({path}): {e}") from None

    # ------------------------------------------------------------------ the extra teachers
    @property
    def teacher_names(self) -> list[str]:
        """The teacher rows of the table: `teacher`, then one per extra teacher seed."""
        return ["teacher", *map(extra_teacher_name, self.config.extra_teacher_seeds)]

    def extra_teacher_stages(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Fine-tune (or reuse) every extra teacher: `teacher-seed<s>/` -> (folder, spec), as `teacher_stage`."""
        self._extra_teachers = {
            extra_teacher_name(s): (str(self.out / extra_teacher_name(s)), self.teacher_stage(seed=s))
            for s in self.config.extra_teacher_seeds
        }
        return self._extra_teachers

    @cached_property
    def extra_teachers(self) -> list:
        """The extra teachers, frozen, in the order of `extra_teacher_seeds`."""
        return [
            AutoModelForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)
            for path, _ in self._extra_teachers.values()
        ]

    def teachers_of(self, training: dict[str, Any]):
        """The `teacher_model` of a distilled stage: every teacher (the teacher first) when its recipe sets
        `teacher_weights`, else the teacher alone."""
        if training.get("teacher_weights") is None:
            return self.teacher
        return [self.teacher, *self.extra_teachers]

    def extra_teacher_spec(self, training: dict[str, Any]) -> dict[str, Any]:
        """The extra teachers' fingerprints, in the spec of a stage that distils from them (empty otherwise, so the
        stages of one-teacher rows keep their fingerprints)."""
        extra = getattr(self, "_extra_teachers", {})
        if training.get("teacher_weights") is None or not extra:
            return {}
        return {"extra_teachers": {name: fingerprint(spec) for name, (_, spec) in extra.items()}}

    def extra_teacher_rows(self, evaluations: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The results rows of the extra teachers (after the teacher's), marked by `teacher_seed`."""
        rows = []
        for s in self.config.extra_teacher_seeds:
            name = extra_teacher_name(s)
            info = next((r.info for r in self.stages if r.path == str(self.out / name)), {})
            counts = row_counts(self.labelled_train)
            rows.append(
                {
                    "name": name,
                    "recipes": [f"fine-tune (seed {s})"],
                    "teacher_seed": s,
                    "train_steps": info.get("global_step"),
                    "train_seconds": info.get("seconds"),
                    "train_rows_labelled": counts["labelled"],
                    "train_rows_unlabelled": counts["unlabelled"],
                    **evaluations[name],
                }
            )
        return rows

    # ------------------------------------------------------------------ mutual-learning rows
    def mutual_row_stages(
        self, name: str, recipe_path: str, init_spec: dict[str, Any], seed: int
    ) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
        """Train `mutual_num_peers` copies of `student_init/` together (`MutualLearningTrainer`) on the labelled rows
        for the row budget; return peer 0's folder (the row's model), the stage spec and the stage info, as
        `row_stages` does."""
        from .mutual import MutualLearningTrainer
        from .mutual_config import MutualLearningConfig

        c = self.config
        training = mutual_training_args(self._path(recipe_path))
        steps = self.row_steps(False)
        stage_name = f"1-{Path(recipe_path).stem}"
        spec = {
            "stage": f"{name}/{stage_name}",
            "trainer": "mutual_learning",
            "start": fingerprint(init_spec),
            "recipe": training,
            "num_peers": c.mutual_num_peers,
            "num_train_epochs": c.num_train_epochs,
            "steps": steps,
            **self._common_spec(),
            **({"train_seed": seed} if seed != c.seed else {}),
        }
        stage_dir = self.out / "rows" / name / ("" if seed == c.seed else f"seed{seed}") / stage_name

        def make_trainer(output_dir: str) -> MutualLearningTrainer:
            set_seed(seed)  # with student_init_from: pretrained, peer k's new head is the k-th drawn from the seed
            peers = [
                AutoModelForSequenceClassification.from_pretrained(self.out / "student_init")
                for _ in range(c.mutual_num_peers)
            ]
            args = self._training_args(MutualLearningConfig, output_dir, max_steps=steps, seed=seed, **training)
            return MutualLearningTrainer(
                model=peers,
                args=args,
                train_dataset=self.labelled_train,
                processing_class=self.tokenizer,
                data_collator=self.collator,
            )

        result = run_trainer_stage(stage_dir, spec, make_trainer)
        self.stages.append(result)
        info = {
            **row_counts(self.labelled_train),
            "recipe": recipe_path,
            "path": str(stage_dir),
            "steps": result.info.get("global_step"),
            "seconds": result.seconds,
        }
        return stage_dir / "peer0", spec, [info]

    def peers_eval_stage(self, name: str, peer0_dir: Path, spec: dict[str, Any], seed: int) -> dict[str, float]:
        """Dev accuracy of every peer of a mutual row and of their ensemble (argmax of the mean softmax), in
        `eval/<row>-peers/` (the row's own figures are peer 0's, from `eval_stage`)."""
        from .mutual import peer_accuracy_metrics, peer_folder

        c = self.config
        folder = f"{self.eval_name(name, seed)}-peers"
        eval_spec = {"stage": f"eval/{folder}", "model": fingerprint(spec), "max_eval_samples": c.max_eval_samples}

        def work(tmp: Path) -> dict:
            logits, labels = [], None
            for k in range(c.mutual_num_peers):
                peer = AutoModelForSequenceClassification.from_pretrained(peer_folder(str(peer0_dir.parent), k))
                with torch.inference_mode():
                    z, labels = predict_logits(peer.eval(), self.dataset["eval"], self.collator,
                                               batch_size=c.eval_batch_size)  # fmt: skip
                logits.append(z)
            metrics = peer_accuracy_metrics()((tuple(logits), labels))
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            return {"metrics": metrics}

        result = run_stage(self.out / "eval" / folder, eval_spec, work)
        self.stages.append(result)
        return result.info["metrics"]

    def add_peer_results(self, rows: list[dict[str, Any]], finals: dict, seed: int) -> None:
        """Every mutual row's peers and ensemble, in place: `num_peers`, `evaluated_peer` (0, whose figures the row
        shows), `peer_accuracy` (peer k's dev accuracy) and `ensemble_accuracy` (main training seed)."""
        for row in rows:
            if row["name"] not in self.config.mutual_rows:
                continue
            path, spec = finals[row["name"]]
            metrics = self.peers_eval_stage(row["name"], Path(path), spec, seed)
            row.update(
                num_peers=self.config.mutual_num_peers,
                evaluated_peer=0,
                peer_accuracy=[metrics[f"accuracy_peer{k}"] for k in range(self.config.mutual_num_peers)],
                ensemble_accuracy=metrics["accuracy_ensemble"],
            )

    def rows_budget(self) -> dict[str, Any]:
        """What the extra teachers and mutual rows add to results.json's budget (nothing without them)."""
        c = self.config
        extra = {"extra_teacher_seeds": list(c.extra_teacher_seeds)} if c.extra_teacher_seeds else {}
        if c.mutual_rows:
            extra |= {"mutual_rows": sorted(c.mutual_rows), "mutual_num_peers": c.mutual_num_peers}
        return extra
