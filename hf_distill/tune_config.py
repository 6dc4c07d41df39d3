"""What `tune_distillation` searches: `TuneConfig` (the search settings) and its `SearchDimension`s for a recipe.

Kept apart from `hf_distill.tune` (the search itself) so the settings can be parsed and checked, with errors naming
the field, before any data or model is loaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from .config import DistillationConfig

logger = logging.getLogger(__name__)

INTERMEDIATE_WEIGHTS = ("hidden_weight", "attention_weight", "embeddings_weight")
# Search dimension -> (bounds rule, whether it is searched on a log scale, an example range).
DIMENSIONS = {
    "temperature": ("> 0", False, "1,8"),
    "alpha": (">= 0 and high <= 1", False, "0.1,0.9"),
    "learning_rate": ("> 0", True, "2e-5,5e-4"),
    **{name: ("> 0", True, "0.25,4") for name in INTERMEDIATE_WEIGHTS},
}
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")
LOWER_IS_BETTER = ("loss", "mse")
OFF = ("", "none", "off")
AUTO = "auto"
AUTO_SPAN = 4.0  # "auto" searches an intermediate weight w over [w / 4, w * 4]
SIGNIFICANT_DIGITS = 3  # suggested values are rounded before a trial trains with them (and written as such)
DEFAULT_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class SearchDimension:
    """One searched value: `name` (a `DistillationConfig` field, or `alpha`) over `[low, high]`."""

    name: str
    low: float
    high: float
    log: bool

    def describe(self) -> str:
        return f"{self.name} [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


@dataclass
class TuneConfig:
    r"""How `tune_distillation` / `scripts/tune.py` search a recipe's values.

    Parameters:
        n_trials (`int`, defaults to `20`):
            Complete trials wanted in the study; a rerun runs only the missing ones.
        sampler (`str`, defaults to `"tpe"`):
            optuna sampler: `tpe` (TPESampler) or `random` (RandomSampler).
        sampler_seed (`int`, defaults to `0`):
            Seed of the sampler: the same seed gives the same trials.
        metric (`str`, defaults to `"accuracy"`):
            Validation metric to select on: a key of `classification_metrics` (`accuracy`; `label_accuracy` for
            multi-label; `mse` for regression) or `loss` (only when the temperature and the weights are not searched:
            the distillation loss depends on them, so trials would not be comparable).
        direction (`str`, *optional*):
            `maximize` or `minimize`; default: minimize `loss` and `mse`, maximize the others.
        validation_samples (`int`, *optional*):
            Labelled training rows held out as the validation slice.
        validation_fraction (`float`, *optional*):
            Or the fraction of the labelled training rows held out (default 0.1 when neither is set).
        validation_seed (`int`, defaults to `0`):
            Seed of the choice of the validation rows.
        temperature_range, alpha_range, learning_rate_range (`str`, *optional*):
            `"low,high"`, or `none` to keep the recipe's value. `alpha` is the logits' share of the task + logits
            weight. The learning rate is searched on a log scale. The temperature cannot be searched with a top-k +
            tail teacher cache (`teacher_cache_top_k_tail` and `use_teacher_cache`): the cache holds one temperature.
        hidden_weight_range, attention_weight_range, embeddings_weight_range (`str`, defaults to `"auto"`):
            `"low,high"` (log scale, low > 0), `auto` (`[w/4, 4w]` around the recipe's weight w if the recipe turns
            the term on, else not searched) or `none`. A term the recipe turns off cannot be searched: it needs
            layer matches, projections and teacher outputs the trainer would not have.
        enqueue_base (`bool`, defaults to `True`):
            Make the recipe's own values the first trial (when they lie in the search space), to compare against.
        tune_dir (`str`, *optional*):
            Folder of the study (`study.db`), the trials' runs, the teacher cache (unless `teacher_cache_dir` is set),
            `trials.json` and `tuned.yaml`. Default: `<output_dir>-tune`.
        tuned_recipe (`str`, *optional*):
            Where `scripts/tune.py` writes the tuned recipe. Default: `<tune_dir>/tuned.yaml`.
        study_name (`str`, defaults to `"hf-distill"`):
            Name of the optuna study in `study.db`.
    """

    n_trials: int = field(default=20, metadata={"help": "Complete trials wanted (a rerun runs the missing ones)."})
    sampler: str = field(default="tpe", metadata={"help": f"optuna sampler, one of {SAMPLERS}."})
    sampler_seed: int = field(default=0, metadata={"help": "Seed of the sampler (same seed, same trials)."})
    metric: str = field(
        default="accuracy", metadata={"help": "Validation metric to select on (accuracy, mse, ..., or loss)."}
    )
    direction: str | None = field(
        default=None, metadata={"help": f"One of {DIRECTIONS}; default: minimize loss/mse, else maximize."}
    )
    validation_samples: int | None = field(
        default=None, metadata={"help": "Labelled training rows held out to select on."}
    )
    validation_fraction: float | None = field(
        default=None, metadata={"help": "Or the fraction of labelled training rows held out (default 0.1)."}
    )
    validation_seed: int = field(default=0, metadata={"help": "Seed of the choice of the validation rows."})
    temperature_range: str | None = field(default="1,8", metadata={"help": "'low,high' or 'none'."})
    alpha_range: str | None = field(
        default="0.1,0.9", metadata={"help": "Logits' share of task+logits weight: 'low,high' in [0, 1], or 'none'."}
    )
    learning_rate_range: str | None = field(default="2e-5,5e-4", metadata={"help": "'low,high' (log) or 'none'."})
    hidden_weight_range: str | None = field(default=AUTO, metadata={"help": "'low,high' (log), 'auto' or 'none'."})
    attention_weight_range: str | None = field(default=AUTO, metadata={"help": "'low,high' (log), 'auto' or 'none'."})
    embeddings_weight_range: str | None = field(default=AUTO, metadata={"help": "'low,high' (log), 'auto' or 'none'."})
    enqueue_base: bool = field(default=True, metadata={"help": "Run the recipe's own values as the first trial."})
    tune_dir: str | None = field(default=None, metadata={"help": "Folder of the study (default <output_dir>-tune)."})
    tuned_recipe: str | None = field(
        default=None, metadata={"help": "Path of the tuned recipe (default <tune_dir>/tuned.yaml)."}
    )
    study_name: str = field(default="hf-distill", metadata={"help": "Name of the optuna study in study.db."})

    def __post_init__(self):
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}. Use e.g. 20.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}. Use 'tpe'.")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS} or unset, got {self.direction!r}.")
        self.metric = self.metric.removeprefix("eval_")
        if self.validation_samples is not None and self.validation_fraction is not None:
            raise ValueError(
                f"set validation_samples={self.validation_samples} or validation_fraction={self.validation_fraction}, "
                "not both. Keep one of them."
            )
        if self.validation_samples is not None and self.validation_samples < 1:
            raise ValueError(f"validation_samples must be >= 1, got {self.validation_samples}. Use e.g. 500.")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}. Use e.g. 0.1.")
        self.ranges = {name: _parse_range(name, getattr(self, f"{name}_range")) for name in DIMENSIONS}

    def validation_size(self, labelled: int) -> int:
        if self.validation_samples is not None:
            return self.validation_samples
        return max(1, round((self.validation_fraction or DEFAULT_VALIDATION_FRACTION) * labelled))

    def objective_direction(self) -> str:
        return self.direction or ("minimize" if self.metric in LOWER_IS_BETTER else "maximize")


def _parse_range(name: str, value: str | None) -> tuple[float, float] | str | None:
    """`"low,high"` -> `(low, high)`; `none`/empty -> None; `auto` (intermediate weights only) -> "auto"."""
    field_name = f"{name}_range"
    if value is None or str(value).strip().lower() in OFF:
        return None
    if str(value).strip().lower() == AUTO:
        if name in INTERMEDIATE_WEIGHTS:
            return AUTO
        raise ValueError(f"{field_name}='auto' is only for the intermediate weights. Use 'low,high' or 'none'.")
    rule, _, example = DIMENSIONS[name]
    try:
        low, high = (float(x) for x in str(value).split(","))
    except ValueError:
        low = high = math.nan
    valid = low < high and (low >= 0 and high <= 1 if name == "alpha" else low > 0)
    if not valid:
        raise ValueError(
            f"{field_name} must be 'low,high' with low < high and low {rule}, got {value!r}. Use e.g. {example!r}, "
            "or 'none' to keep the recipe's value."
        )
    return low, high


def search_dimensions(tune: TuneConfig, args: DistillationConfig, transfer_set: bool = False) -> list[SearchDimension]:
    """The `SearchDimension`s of `tune` for the base recipe `args`; refuses dimensions the recipe cannot vary.

    Args:
        tune: the search settings.
        args: the base recipe's `DistillationConfig`.
        transfer_set: whether the training rows include a transfer set (unlabelled rows need a teacher term).
    """
    dims = []
    for name, (_, log, _) in DIMENSIONS.items():
        rng = tune.ranges[name]
        if name in INTERMEDIATE_WEIGHTS:
            base = getattr(args, name)
            if rng == AUTO:
                rng = (base / AUTO_SPAN, base * AUTO_SPAN) if base > 0 else None
            elif rng is not None and base == 0:
                raise ValueError(
                    f"{name}_range={getattr(tune, f'{name}_range')!r} searches {name}, but the recipe has {name}=0: "
                    "a trial cannot switch a term on (it needs layer matches, projections and teacher outputs the "
                    f"trainer builds only for terms that are on). Set {name} > 0 in the recipe (e.g. 1.0) to search "
                    f"it, or {name}_range=none."
                )
        elif name in ("temperature", "alpha") and rng is not None and args.logits_weight == 0:
            raise ValueError(
                f"{name}_range={getattr(tune, f'{name}_range')!r} searches {name}, but the recipe has logits_weight=0 "
                "(the logit term is off, so the teacher's logits are neither checked nor cached). Set logits_weight "
                f"> 0 in the recipe to search it, or {name}_range=none."
            )
        if name == "temperature" and rng is not None and args.use_teacher_cache and args.teacher_cache_top_k_tail:
            raise ValueError(
                f"temperature_range={tune.temperature_range!r} searches temperature, but the recipe has "
                "teacher_cache_top_k_tail=True with use_teacher_cache=True: the cache holds the teacher's "
                f"log-probabilities at temperature={args.temperature} only, so no trial could train at another. Fix "
                "the temperature (temperature_range=none), or turn the tail off (teacher_cache_top_k_tail=False: "
                "stored top-k logits serve every temperature), or use_teacher_cache=False."
            )
        if rng is not None:
            dims.append(SearchDimension(name, float(rng[0]), float(rng[1]), log))
    names = [d.name for d in dims]
    if not dims:
        raise ValueError("the search space is empty: every *_range is none or off in this recipe. Set e.g. "
                         "learning_rate_range='2e-5,5e-4'.")  # fmt: skip
    if tune.metric == "loss" and names != ["learning_rate"]:
        raise ValueError(
            f"metric='loss' selects on the distillation loss, which depends on the searched {names[0]} (its weights "
            "and temperature define it), so trials would not be comparable. Use metric='accuracy' (or 'mse'), or "
            "search learning_rate alone."
        )
    alpha = next((d for d in dims if d.name == "alpha"), None)
    others_on = any(getattr(args, n) > 0 for n in INTERMEDIATE_WEIGHTS)
    if transfer_set and alpha is not None and alpha.low == 0 and not others_on:
        raise ValueError(
            f"alpha_range={tune.alpha_range!r} lets a trial set logits_weight=0, which leaves the transfer set's "
            "unlabelled rows without any term (every other teacher term is off). Use an alpha_range with low > 0, "
            "e.g. '0.1,0.9'."
        )
    return dims


def suggest_params(trial, dims: list[SearchDimension]) -> dict[str, float]:
    """A trial's parameters, rounded to `SIGNIFICANT_DIGITS` (the trial trains with, and a recipe shows, these)."""
    params = {}
    for d in dims:
        value = float(f"{trial.suggest_float(d.name, d.low, d.high, log=d.log):.{SIGNIFICANT_DIGITS}g}")
        params[d.name] = min(max(value, d.low), d.high)
    return params


def trial_values(params: dict[str, float], args: DistillationConfig) -> dict[str, float]:
    """The `DistillationConfig` values of a trial's parameters (alpha becomes task_weight and logits_weight)."""
    values = {name: value for name, value in params.items() if name != "alpha"}
    if "alpha" in params:
        scale = args.task_weight + args.logits_weight
        values["logits_weight"] = float(f"{params['alpha'] * scale:.6g}")
        values["task_weight"] = float(f"{(1 - params['alpha']) * scale:.6g}")
    return values


def base_params(dims: list[SearchDimension], args: DistillationConfig) -> dict[str, float] | None:
    """The recipe's own values as trial parameters, or None when one lies outside the search space."""
    params = {}
    for d in dims:
        if d.name == "alpha":
            value = args.logits_weight / (args.task_weight + args.logits_weight)
        else:
            value = getattr(args, d.name)
        if not d.low <= value <= d.high:
            logger.warning("the recipe's %s=%g is outside the search space %s: not enqueued", d.name, value,
                           d.describe())  # fmt: skip
            return None
        params[d.name] = value
    return params
