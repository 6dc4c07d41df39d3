"""Chain rows of the benchmark: rows whose stages each have a teacher of their own, for the two methods in which a
distilled model teaches the next one.

- **Teacher-assistant chains** (TAKD, [Mirzadeh et al. 2020](https://arxiv.org/abs/1902.03393)): the gap between
  teacher and student is bridged by an assistant of intermediate depth, teacher -> assistant -> student.
- **Born-again networks** ([Furlanello et al. 2018](https://arxiv.org/abs/1805.04770)): generation k+1, of the same
  architecture, is distilled from generation k.

`BenchmarkConfig.chain_rows` maps a row name to its stages in order, each a recipe file or a mapping
`{recipe: <file>, num_layers: <n>}`:

    chain_rows:
      ta_chain:        # 6 -> 4 -> 3 layers
        - {recipe: recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml, num_layers: 4}
        - recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml
      born_again:      # two generations of the 3-layer student
        - recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml
        - recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml

Stage 1 is taught by the benchmark's (fine-tuned) teacher; stage k > 1 by stage k-1's final model. A stage with
`num_layers` distils a new student of that depth, `make_student` of its teacher's evenly spaced ("alternating")
layers; a stage without it distils the benchmark's student, `student_init/`, the start of every other row. The last
stage is such a stage (refused otherwise): its model is the row's model, evaluated, timed and tabled like any row,
with the student shape of every other row, so a chain row differs from vanilla KD by its teachers alone.

Born-again here is the practical variant: each generation starts from `student_init/` (the teacher's layers), not
from a random initialisation as in the paper, which for a pre-trained transformer would throw the pre-training away
(`hf_distill.chain` offers `init: scratch` outside the benchmark). Generation 1 is then vanilla KD, and the row's
difference to vanilla KD is generation 2.

Shared first stage. When a plain row of `rows` trains exactly what a chain's first stage (one without `num_layers`)
would, the same single recipe from `student_init/` on the same rows (transfer set or not) for a whole row's steps
under the same seed, the chain's stage 1 is that row's stage (`twin_row`): trained once, by whichever of the two
comes first, and reused by the other, instead of training the same model twice (an hour a seed on the flagship).
Its stage info names the row (`shared_with`) and carries its training time, which the chain row's train (s) includes.

Budget. Every stage trains the steps of a whole plain row (`row_steps`), so a k-stage chain row costs k plain rows:
each stage's steps are in the row's `stages` and its `train_steps` (the table's train steps column) is their sum.

Teacher cache. With `teacher_cache`, every stage reads its teacher's outputs from the benchmark's cache folder. A
cache there is keyed by its teacher's weights (`hf_distill.cache.teacher_cache_fingerprint`), so stage 1 shares the
benchmark teacher's cache with the plain rows and a stage taught by an earlier stage's model gets a cache of its own,
built once from that model: no stage can read another teacher's outputs.

Resume. Each stage is a `run_stage` under `rows/<row>/<k>-<recipe>/` (`seed<s>/` for other training seeds), reused
when finished and resumed from its checkpoints when interrupted. Its spec holds its teacher's stage fingerprint (the
benchmark teacher's, or the previous stage's spec), the SHA-256 of its teacher's config and weight files, and its
start (`student_init/`'s fingerprint, or `num_layers`), so a changed earlier stage makes every later one refuse to
be reused (delete it to retrain it from the new teacher) instead of mixing two runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

from .benchmark_config import check_transfer_recipes, is_folder_name
from .benchmark_stages import fingerprint, recipe_training_args, run_trainer_stage
from .chain import model_files_digest
from .chain_config import _with_hint
from .config import DistillationConfig
from .data import row_counts
from .student import make_student
from .trainer import DistillationTrainer

CHAIN_STAGE_KEYS = ("recipe", "num_layers")
EXAMPLE_RECIPE = "recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml"
EXAMPLE = f"{{ta_chain: [{{recipe: {EXAMPLE_RECIPE}, num_layers: 4}}, {{recipe: {EXAMPLE_RECIPE}}}]}}"


# ---------------------------------------------------------------------------------------------------- configuration
def check_chain_rows(config) -> None:
    """Static checks of `config.chain_rows` (a `BenchmarkConfig`), which is normalised in place to row name -> list
    of `{"recipe": str, "num_layers": int | None}`. The checks against files and models are `ChainStages`'."""
    rows = config.chain_rows
    if not isinstance(rows, dict):
        raise ValueError(
            f"chain_rows must map row names to lists of stages, got {rows!r}. E.g. chain_rows: {EXAMPLE}."
        )
    checked = {}
    for name, stages in rows.items():
        if not is_folder_name(name):
            raise ValueError(
                f"chain row name {name!r} must be a plain folder name like 'ta_chain' (letters, digits, _, -)."
            )
        taken = {"teacher": "the teacher's row", config.baseline_name: "the baseline"}
        taken |= dict.fromkeys(config.rows, "a row of rows")
        if name in taken:
            raise ValueError(
                f"chain row name {name!r} is taken ({taken[name]}): every row has its own folder and table line. "
                f"Rename the chain row, e.g. {name}_chain."
            )
        if not isinstance(stages, list) or not stages:
            raise ValueError(
                f"chain_rows.{name} must list its stages in order, at least one, got {stages!r}. E.g. {name}: "
                f"[{{recipe: {EXAMPLE_RECIPE}, num_layers: 4}}, {{recipe: {EXAMPLE_RECIPE}}}]."
            )
        checked[name] = [
            _check_stage(s, f"chain_rows.{name}[{k}]", k == len(stages) - 1) for k, s in enumerate(stages)
        ]
    config.chain_rows = checked


def _check_stage(stage: Any, where: str, last: bool) -> dict[str, Any]:
    stage = {"recipe": stage} if isinstance(stage, str) else stage
    if not isinstance(stage, dict):
        raise ValueError(f"{where} must be a recipe file or a mapping of {list(CHAIN_STAGE_KEYS)}, got {stage!r}.")
    unknown = [k for k in stage if k not in CHAIN_STAGE_KEYS]
    if unknown:
        hints = ", ".join(_with_hint(k, list(CHAIN_STAGE_KEYS)) for k in unknown)
        raise ValueError(
            f"unknown key(s) in {where}: {hints}. Valid keys: {list(CHAIN_STAGE_KEYS)}; the teacher is the "
            "benchmark's for stage 1 and the previous stage's model after it, the student the benchmark's "
            "(student_init) unless num_layers is set."
        )
    recipe, num_layers = stage.get("recipe"), stage.get("num_layers")
    if not isinstance(recipe, str) or not recipe:
        raise ValueError(
            f"{where}.recipe is required: the stage's recipe YAML, got {recipe!r}. E.g. {EXAMPLE_RECIPE}."
        )
    if num_layers is not None:
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(
                f"{where}.num_layers must be an integer >= 1 (the depth of its student), got {num_layers!r}. E.g. 4."
            )
        if last:
            raise ValueError(
                f"{where}.num_layers={num_layers}, but the last stage's student is the row's model, which has the "
                "benchmark's student shape (student_init) like every other row. Drop num_layers from the last "
                "stage, or add a stage after it."
            )
    return {"recipe": recipe, "num_layers": num_layers}


def _layers(n: int) -> str:
    return f"{n} layer" + ("s" if n != 1 else "")


# ---------------------------------------------------------------------------------------------------- the stages
class ChainStages:
    """Mixed into `hf_distill.benchmark.Benchmark`: needs its `config`, `out`, `_path`, `base_teacher`, `teacher`,
    `teacher_dir`, `tokenizer`, `collator`, `train_rows`, `transfer_spec`, `row_steps`, `cache_args`,
    `_common_spec`, `_training_args` and `stages`."""

    def student_depth(self, teacher_depth: int) -> int:
        """The depth of the benchmark's student (`student_init/`) for a teacher of `teacher_depth` layers."""
        c = self.config
        if c.student_layers:
            return len(c.student_layers.split(","))
        return c.student_num_layers or max(1, teacher_depth // 2)  # make_student's default: half the teacher

    def check_chain_rows(self) -> None:
        """Every stage of every chain row checked before anything trains: its recipe exists and builds a valid
        `DistillationConfig` as the stage would (cache arguments included), it has a teacher term on a transfer set,
        and its student is no deeper than its teacher."""
        c = self.config
        if not c.chain_rows:
            return
        for name, stages in c.chain_rows.items():
            for k, stage in enumerate(stages):
                path = self._path(stage["recipe"])
                if not path.is_file():
                    raise FileNotFoundError(
                        f"chain_rows.{name}[{k}].recipe={stage['recipe']!r} does not exist (looked in {path}). Fix "
                        "the path; relative paths are resolved against the repository root."
                    )
        check_transfer_recipes(c, self._path, rows=self.chain_recipes(exclude=c.labelled_only_rows))
        teacher_depth = AutoConfig.from_pretrained(self.base_teacher).num_hidden_layers
        student = self.student_depth(teacher_depth)
        for name, stages in c.chain_rows.items():
            depth, teacher = teacher_depth, "the benchmark's teacher"
            for k, stage in enumerate(stages):
                where = f"chain_rows.{name}[{k}]"
                layers = stage["num_layers"] or student
                if layers > depth and stage["num_layers"]:
                    raise ValueError(
                        f"{where}.num_layers={layers}, but its teacher, {teacher}, has {_layers(depth)}: a student "
                        f"cannot be deeper than its teacher. Use num_layers <= {depth}."
                    )
                if layers > depth and k == 0:
                    raise ValueError(
                        f"the benchmark's student ({student} layers) is deeper than its teacher ({depth}). Set "
                        f"student_num_layers <= {depth}."
                    )
                if layers > depth:
                    raise ValueError(
                        f"{where} distils the benchmark's {student}-layer student (student_init) from {teacher}, "
                        f"which has {_layers(depth)}: a student cannot be deeper than its teacher. Give "
                        f"chain_rows.{name}[{k - 1}] num_layers >= {student} (an assistant sits between the teacher "
                        "and the student)."
                    )
                training = recipe_training_args(self._path(stage["recipe"]))
                other = [k for k in ("teacher_weights", "ema_teacher") if training.get(k)]
                if other:
                    raise ValueError(
                        f"{where} ({stage['recipe']}) sets {other[0]}={training[other[0]]!r}, but a chain stage is "
                        f"taught by one teacher, {teacher}. Use a single-teacher recipe (e.g. {EXAMPLE_RECIPE})."
                    )
                try:
                    cache = self.cache_args(training)
                    self._training_args(DistillationConfig, str(self.out / "unused"), max_steps=1, **training, **cache)
                except ValueError as e:
                    raise ValueError(f"{where} ({stage['recipe']}): {e}") from None
                depth, teacher = layers, f"the student of {where}"

    def twin_row(self, recipe: str, transfer: bool) -> str | None:
        """The plain row (of `rows`) that trains what a chain's first stage of `recipe`, without `num_layers`, would:
        that recipe alone, from `student_init/`, taught by the benchmark's teacher, on the same rows (the transfer set
        or not), for a whole row's steps, under the same seed. None when there is none."""
        c = self.config
        for name, recipes in c.rows.items():
            same_recipe = len(recipes) == 1 and self._path(recipes[0]) == self._path(recipe)
            same_rows = (name not in c.labelled_only_rows) == transfer
            if same_recipe and same_rows and name not in c.general_rows and name not in c.chain_rows:
                return name
        return None

    @staticmethod
    def student_depth_of(model_dir) -> int:
        return AutoConfig.from_pretrained(model_dir).num_hidden_layers

    def chain_recipes(self, exclude=()) -> dict[str, list[str]]:
        """Chain row name -> its stages' recipe files (rows in `exclude` left out)."""
        return {n: [s["recipe"] for s in stages] for n, stages in self.config.chain_rows.items() if n not in exclude}

    def chain_row_stages(
        self, name: str, stages: list[dict[str, Any]], init_spec: dict[str, Any], transfer: bool, seed: int | None
    ) -> tuple[Path, dict, list]:
        """Train a chain row's stages in order, each taught by the previous stage's final model (stage 1: the
        benchmark's teacher); return the last stage's folder and spec and the stages' infos, as `row_stages` does."""
        c = self.config
        seed = c.seed if seed is None else seed
        transfer_spec = self.transfer_spec() if transfer else {}
        steps = self.row_steps(transfer)  # every stage: a whole row's budget
        row_dir = self.out / "rows" / name / ("" if seed == c.seed else f"seed{seed}")
        # The teacher of the next stage: its folder, the fingerprint of the stage that made it (the benchmark teacher
        # stage's, as student_init's spec records it), and its name in the stage infos.
        teacher_dir, teacher_fingerprint, teacher_name = self.teacher_dir, init_spec["teacher"], "teacher"
        stage_infos = []
        for k, stage in enumerate(stages, start=1):
            twin = self.twin_row(stage["recipe"], transfer) if k == 1 and not stage["num_layers"] else None
            if twin:  # that row's stage is this one: trained once (or reused), never twice
                twin_dir, twin_spec, twin_infos = self.row_stages(twin, [stage["recipe"]], init_spec, transfer, seed)
                depth = self.student_depth_of(twin_dir)
                stage_infos.append({**twin_infos[0], "teacher": "teacher", "num_layers": depth, "shared_with": twin})
                teacher_dir, teacher_fingerprint, teacher_name = str(twin_dir), fingerprint(twin_spec), twin
                continue
            training = recipe_training_args(self._path(stage["recipe"]))
            cache = self.cache_args(training)  # keyed by the teacher's weights: this stage's teacher, its own cache
            stage_name = f"{k}-{Path(stage['recipe']).stem}"
            num_layers = stage["num_layers"]
            spec = {
                "stage": f"{name}/{stage_name}",
                "teacher": teacher_fingerprint,
                "teacher_files": model_files_digest(teacher_dir) if Path(teacher_dir).is_dir() else teacher_dir,
                "start": {"num_layers": num_layers} if num_layers else fingerprint(init_spec),
                "recipe": training,
                "stage_index": k,
                "num_stages": len(stages),
                "steps": steps,
                **self._common_spec(),
                **transfer_spec,
                **({"train_seed": seed} if seed != c.seed else {}),
                **({"teacher_cache": True} if cache else {}),
            }
            stage_dir = row_dir / stage_name

            def make_trainer(
                output_dir: str, training=training, cache=cache, teacher_dir=teacher_dir, num_layers=num_layers
            ) -> DistillationTrainer:
                if teacher_dir == self.teacher_dir:
                    teacher = self.teacher
                else:
                    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
                    teacher = teacher.eval().requires_grad_(False)
                set_seed(seed)
                if num_layers:  # a new student (an assistant): its teacher's evenly spaced layers
                    student = make_student(teacher, num_layers=num_layers)
                else:
                    student = AutoModelForSequenceClassification.from_pretrained(self.out / "student_init")
                args = self._training_args(
                    DistillationConfig, output_dir, max_steps=steps, seed=seed, **{**training, **cache}
                )
                return DistillationTrainer(
                    model=student,
                    teacher_model=teacher,
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
                    "recipe": stage["recipe"],
                    "path": str(stage_dir),
                    "teacher": teacher_name,
                    "num_layers": self.student_depth_of(stage_dir),
                    "steps": result.info.get("global_step"),
                    "seconds": result.seconds,
                }
            )
            teacher_dir, teacher_fingerprint, teacher_name = str(stage_dir), fingerprint(spec), stage_name
        return stage_dir, spec, stage_infos
