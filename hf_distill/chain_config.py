"""A chain's configuration ([`ChainConfig`], a list of [`ChainStage`]s, read by [`load_chain_config`]) and
[`plan_chain`], which checks every stage against its teacher before anything trains. `hf_distill.chain` runs it;
everything here is importable from there too."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from .benchmark_config import read_config_file
from .benchmark_stages import BENCHMARK_OWNED_KEYS, recipe_training_args, resolve_teacher
from .config import DistillationConfig
from .recipes import check_recipe_keys
from .student import _resolve_layers

INIT_CHOICES = ("teacher_layers", "scratch")
EXAMPLE_RECIPE = "recipes/mpnet-sst2_to_mpnet-6l/vanilla_kd.yaml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Chain fields holding local paths: the file's are relative to its repository, the command line's to the cwd.
CHAIN_PATH_FIELDS = ("output_dir", "train_file", "validation_file")


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass
class ChainStage:
    """One stage: the student built from the current teacher, and the recipe that distils it.

    Parameters:
        recipe (`str`): a recipe YAML (`recipes/*/*.yaml`); its distillation and optimizer keys are used.
        name (`str`, *optional*): the folder's name, `stage<k>-<name>` (default: the recipe's file name).
        num_layers (`int`, *optional*), layers (`list[int]` or `"0,2,4"`, *optional*): the student's depth, or the
            current teacher's layers it is built from (`make_student`); neither: the teacher's depth (born-again).
        init (`str`, defaults to `"teacher_layers"`): `teacher_layers` copies the chosen layers of the current teacher
            (`make_student`); `scratch` is a re-initialised model of that config (seeded by the chain's `seed`), as the
            born-again paper does.
        max_steps (`int`, *optional*): optimizer steps of this stage (default: the chain's `num_train_epochs`).
        overrides (`dict`, *optional*): `DistillationConfig` keys changed for this stage, e.g. `{learning_rate: 1e-4}`.
    """

    recipe: str | None = field(default=None, metadata={"help": "Recipe YAML of this stage's objective."})
    name: str | None = field(default=None, metadata={"help": "Folder name stage<k>-<name> (default: recipe stem)."})
    num_layers: int | None = field(default=None, metadata={"help": "Student depth (default: the teacher's)."})
    layers: list[int] | str | None = field(default=None, metadata={"help": "Teacher layers copied, e.g. [0, 2, 4]."})
    init: str = field(default="teacher_layers", metadata={"help": "'teacher_layers' or 'scratch' (re-initialised)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (default: num_train_epochs)."})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "DistillationConfig keys changed."})

    def check(self, where: str) -> None:
        """Static checks (`where` names the stage in messages, e.g. "stages[1]")."""
        if not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError(f"{where}.recipe is required: the recipe YAML of the stage, e.g. {EXAMPLE_RECIPE}.")
        if self.name is None:
            self.name = Path(self.recipe).stem
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ValueError(
                f"{where}.name={self.name!r} must be a folder name of letters, digits, '_', '.' or '-', e.g. 'ta6l'."
            )
        if self.num_layers is not None and (
            not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1
        ):
            raise ValueError(f"{where}.num_layers must be an integer >= 1, got {self.num_layers!r}. E.g. 6.")
        if isinstance(self.layers, str):
            try:
                self.layers = [int(i) for i in self.layers.split(",")]
            except ValueError:
                raise ValueError(
                    f"{where}.layers must list teacher layer indices like [0, 2, 4] or '0,2,4', got {self.layers!r}."
                ) from None
        if self.layers is not None and (
            not isinstance(self.layers, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise ValueError(f"{where}.layers must list teacher layer indices like [0, 2, 4], got {self.layers!r}.")
        if self.init not in INIT_CHOICES:
            raise ValueError(
                f"{where}.init must be one of {list(INIT_CHOICES)}, got {self.init!r}. 'teacher_layers' copies the "
                "current teacher's layers (make_student); 'scratch' re-initialises the student (born-again paper)."
            )
        if self.init == "scratch" and self.layers is not None:
            raise ValueError(
                f"{where}.layers={self.layers!r} picks teacher layers to copy, but init: scratch copies nothing. Set "
                "num_layers instead, or use init: teacher_layers."
            )
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or self.max_steps < 1
        ):
            raise ValueError(f"{where}.max_steps must be an integer >= 1 or unset, got {self.max_steps!r}.")
        if not isinstance(self.overrides, dict):
            raise ValueError(
                f"{where}.overrides must be a mapping of DistillationConfig keys, got {self.overrides!r}."
            )
        owned = sorted(set(self.overrides) & set(BENCHMARK_OWNED_KEYS))
        if owned:
            raise ValueError(
                f"{where}.overrides sets {owned}, which the chain sets for every stage (budget and bookkeeping). Use "
                f"{where}.max_steps for the steps, and the chain's seed / per_device_train_batch_size / save_steps."
            )
        check_recipe_keys(self.overrides, (DistillationConfig,), source=f"{where}.overrides")


@dataclass
class ChainConfig:
    r"""A chain of distillation stages, each stage's student the next stage's teacher (see the module docstring).

    Loaded from a flat YAML file by [`load_chain_config`] (see `recipes/*/chains/*.yaml`). Relative paths (data
    files, teacher folder, recipes, output_dir) are resolved against the repository holding the YAML file.

    Parameters:
        name (`str`): the chain's name; outputs go to `outputs/chains/<name>` unless `output_dir` is set.
        output_dir (`str`, *optional*): where every stage writes its folder.
        seed (`int`, defaults to `42`): seed of the training subset, data order, dropout and any scratch init.
        teacher_model_name_or_path (`str`): the fine-tuned classifier that teaches stage 1 (a folder or a Hub id).
        tokenizer_name_or_path (`str`, *optional*): the tokenizer shared by every model (default: the teacher's).
        train_file, validation_file, dataset_name, dataset_config, train_split, eval_split, text_column,
            text_pair_column, label_column, max_length, max_train_samples, max_eval_samples: the data, as in
            [`DataArguments`]; without `validation_file` (local files) nothing is evaluated.
        num_train_epochs (`float`, defaults to `1.0`), per_device_train_batch_size (`int`, defaults to `32`): the
            budget of a stage without `max_steps`: `ceil(rows / batch) * epochs` optimizer steps.
        logging_steps (`int`, defaults to `10`), save_steps (`int`, defaults to `50`): loss logging and checkpoint
            intervals (the resume granularity); they do not change what is trained.
        eval_batch_size (`int`, defaults to `64`): batch size of the accuracy passes.
        stages (`list[ChainStage]`): the stages in order, at least one (mappings of [`ChainStage`] fields).
    """

    name: str = field(default="chain", metadata={"help": "Chain name (the default output folder)."})
    output_dir: str | None = field(default=None, metadata={"help": "Output folder (default outputs/chains/<name>)."})
    seed: int = field(default=42, metadata={"help": "Seed of the subset, data order, dropout and scratch inits."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "Fine-tuned teacher of stage 1."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the teacher's)."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.tsv/.csv/.json[l])."})
    validation_file: str | None = field(default=None, metadata={"help": "Local eval file (unset: no evaluation)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset used without train_file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration, e.g. 'sst2'."})
    train_split: str = field(default="train", metadata={"help": "Hub split used for training."})
    eval_split: str = field(default="validation", metadata={"help": "Hub split used for evaluation."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Fixed shuffled training subset size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of a stage without max_steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size of every stage."})
    logging_steps: int = field(default=10, metadata={"help": "Logging interval of the loss terms."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint interval (resume granularity)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the accuracy passes."})
    stages: list[ChainStage] = field(default_factory=list, metadata={"help": "The stages, in order."})
    # Set by load_chain_config: the folder relative paths are resolved against (not a YAML key).
    source_root: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.teacher_model_name_or_path:
            raise ValueError(
                "teacher_model_name_or_path is required: the fine-tuned classifier that teaches stage 1, e.g. "
                "outputs/benchmarks/sst2_mpnet_l6/teacher."
            )
        if not (self.train_file or self.dataset_name):
            raise ValueError("no data: set train_file (and validation_file to evaluate), or dataset_name.")
        for name in ("per_device_train_batch_size", "logging_steps", "save_steps", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs!r}. E.g. 1.")
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError(
                f"stages must list at least one stage, got {self.stages!r}. E.g. stages: [{{num_layers: 6, recipe: "
                f"{EXAMPLE_RECIPE}}}]."
            )
        known = [f.name for f in dataclasses.fields(ChainStage)]
        stages = []
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if isinstance(stage, dict):
                unknown = [k for k in stage if k not in known]
                if unknown:
                    hints = [_with_hint(k, known) for k in unknown]
                    raise ValueError(f"unknown key(s) in {where}: {', '.join(hints)}. Valid keys: {known}.")
                stage = ChainStage(**stage)
            if not isinstance(stage, ChainStage):
                raise ValueError(f"{where} must be a mapping of {known}, got {stage!r}.")
            stage.check(where)
            stages.append(stage)
        self.stages = stages

    def stage_dir_name(self, k: int) -> str:
        """Folder of stage `k` (1-based): `stage<k>-<name>`."""
        return f"stage{k}-{self.stages[k - 1].name}"


def _with_hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def load_chain_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ChainConfig:
    """Read a chain YAML (flat keys = `ChainConfig` fields, `stages` a list of `ChainStage` mappings), apply
    `overrides` (command-line values: their relative paths are made absolute against the working directory) and
    validate it. The file's relative paths are resolved at run time against the repository holding it."""
    return read_config_file(path, overrides, ChainConfig, CHAIN_PATH_FIELDS, "chain config")


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class PlannedStage:
    """A stage checked against its teacher: the student's depth and layers, and its training arguments."""

    index: int
    folder: str
    teacher_depth: int
    num_layers: int
    layers: list[int] | None  # the current teacher's layers copied (None: init scratch)
    original_layers: list[int] | None  # the same, as layers of the chain's teacher (None once a stage was scratch)
    training: dict[str, Any]


def plan_chain(config: ChainConfig, root: str | os.PathLike, teacher_depth: int | None = None) -> list[PlannedStage]:
    """Check every stage before anything trains: its recipe and overrides, and its layers against the depth of its
    teacher (the chain's teacher for stage 1, read from its config, else the previous stage's student).

    `teacher_depth`: the chain teacher's depth, when known (otherwise read from its config.json / the Hub config).
    """
    root = Path(root)
    planned = []
    for k, stage in enumerate(config.stages, start=1):
        recipe = resolve_path(root, stage.recipe)
        if not recipe.is_file():
            raise FileNotFoundError(f"stages[{k - 1}].recipe={stage.recipe!r} does not exist (looked in {recipe}).")
        training = {**recipe_training_args(recipe), **stage.overrides}
        if training.get("use_teacher_cache"):
            raise ValueError(
                f"stages[{k - 1}] ({stage.recipe}) sets use_teacher_cache: a chain does not cache its teachers (each "
                "stage has another). Set use_teacher_cache: false in the stage's overrides."
            )
        try:  # the values themselves (temperature > 0, ...), before any training
            DistillationConfig(output_dir=str(root / "unused"), report_to="none", **training)
        except ValueError as e:
            raise ValueError(f"stages[{k - 1}] ({stage.recipe} + overrides): {e}") from None
        planned.append(training)
    if teacher_depth is None:
        teacher = resolve_teacher(config.teacher_model_name_or_path, root)
        teacher_depth = AutoConfig.from_pretrained(teacher).num_hidden_layers

    stages, depth, original = [], teacher_depth, list(range(teacher_depth))
    for k, (stage, training) in enumerate(zip(config.stages, planned), start=1):
        where = f"stages[{k - 1}] ({stage.name})"
        teacher = "the chain's teacher" if k == 1 else f"its teacher, stage {k - 1}'s student,"
        requested = stage.num_layers if stage.layers is None else len(stage.layers)
        if requested is not None and requested > depth:
            field_ = "num_layers" if stage.layers is None else "layers"
            raise ValueError(
                f"{where}: {field_}={getattr(stage, field_)!r} asks for {requested} layers but {teacher} has "
                f"{depth}: a student cannot be deeper than its teacher. Use at most {depth} layers."
            )
        if stage.init == "scratch":
            layers, num_layers, original = None, requested or depth, None
        else:
            try:
                # Neither num_layers nor layers: the teacher's own depth (a born-again generation).
                num_layers = stage.num_layers if stage.num_layers is not None or stage.layers is not None else depth
                layers = _resolve_layers(depth, num_layers, stage.layers)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            num_layers = len(layers)
            original = None if original is None else [original[i] for i in layers]
        stages.append(PlannedStage(k, config.stage_dir_name(k), depth, num_layers, layers, original, training))
        depth = num_layers
    return stages


def resolve_path(root: Path, value: str) -> Path:
    """`value` (`~` expanded) if absolute, else relative to `root`."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else root / path
