"""The command line of `scripts/tune.py`, and what it writes: the tuned recipe (YAML) and every trial (JSON).

`scripts/tune.py` takes `scripts/distill.py`'s command line (`--config recipe.yaml`, then `--field value` overrides)
plus the fields of [`TuneConfig`] (`--n_trials`, `--temperature_range`, ...; command line only, a recipe holds only
distillation fields). The tuned recipe is the base recipe's text, comments kept, with the tuned values and the
command-line overrides written in, under a header saying how the values were chosen; it runs as it is with
`scripts/distill.py --config <tuned.yaml>`.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shlex
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .arguments import DataArguments, ModelArguments, RunArguments
from .cli import DistillArgs, _split_config, command_line_fields, make_parser, parse_distill_args
from .files import write_text_atomic
from .recipes import (
    RECIPE_MODEL_FIELDS,
    RECIPE_PATH_FIELDS,
    display_path,
    load_recipe,
    recipe_root,
    resolve_recipe_paths,
)
from .tune import TuneResult
from .tune_config import TuneConfig

TRIALS_NAME = "trials.json"
TUNED_RECIPE_NAME = "tuned.yaml"
HEADER_WIDTH = 118
# Recipe section a key missing from the base recipe is added to, by the dataclass that owns it.
SECTIONS = (
    (ModelArguments, "# Model arguments"),
    (DataArguments, "# Data arguments"),
    (TrainingArguments, "# Training"),
    (RunArguments, "# Training"),
)
DISTILLATION_SECTION = "# Distillation"


@dataclass
class TuneArgs:
    """Everything `scripts/tune.py` runs with: the distillation arguments, the search, the command-line overrides."""

    distill: DistillArgs
    tune: TuneConfig
    overrides: dict[str, Any]


def parse_tune_args(argv: list[str]) -> TuneArgs:
    """Split `TuneConfig` flags off `argv` and parse the rest as `scripts/distill.py` does (`parse_distill_args`).

    The teacher cache is turned on (`use_teacher_cache=True`) unless the recipe or the command line sets
    `use_teacher_cache`: it is what lets the teacher run once for all trials.
    """
    # allow_abbrev=False: `--temperature 2` must stay the recipe's temperature, not become `--temperature_range 2`.
    tune, rest = HfArgumentParser(TuneConfig, allow_abbrev=False).parse_args_into_dataclasses(
        args=list(argv), return_remaining_strings=True, look_for_args_file=False
    )
    recipe_path, flags = _split_config(rest)
    given = command_line_fields(make_parser(), flags)
    recipe = load_recipe(recipe_path) if recipe_path else {}
    cache = [] if "use_teacher_cache" in given or "use_teacher_cache" in recipe else ["--use_teacher_cache", "true"]
    distill = parse_distill_args(rest + cache)
    parsed = (distill.model, distill.data, distill.run, distill.training)
    overrides = {}
    for name in sorted(given):
        value = next(getattr(obj, name) for obj in parsed if hasattr(obj, name))
        overrides[name] = value.value if isinstance(value, enum.Enum) else value
    return TuneArgs(distill=distill, tune=tune, overrides=overrides)


# ---------------------------------------------------------------------- the tuned recipe
def _section(name: str) -> str:
    for dataclass_type, header in SECTIONS:
        if name in {f.name for f in fields(dataclass_type)}:
            return header
    return DISTILLATION_SECTION  # DistillationConfig's own fields (not TrainingArguments')


def _yaml_line(key: str, value: Any) -> str:
    # The value alone in flow style ("2.0", "[a, b]", "'no'"), without the end-of-document marker of a scalar.
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
    return f"{key}: {dumped}"


def set_recipe_values(text: str, values: dict[str, Any]) -> str:
    """A flat recipe's text with `values` set: a key's line is replaced, a missing key is added to its section (the
    comment header of its dataclass, created at the end if missing). Other lines and comments are kept."""
    lines = text.rstrip("\n").splitlines() if text.strip() else []
    for key, value in values.items():
        line = _yaml_line(key, value)
        at = next((i for i, old in enumerate(lines) if re.match(rf"{re.escape(key)}\s*:", old)), None)
        if at is not None:
            lines[at] = line
            continue
        header = _section(key)
        if header not in lines:
            lines += ["", header] if lines else [header]
        end = lines.index(header) + 1
        while end < len(lines) and lines[end].strip():
            end += 1
        lines.insert(end, line)
    return "\n".join(lines) + "\n"


def _local_paths(values: dict[str, Any], root: str | os.PathLike, target_root: Path) -> dict[str, str]:
    """The local paths among `values` (relative to `root`), spelt as a recipe at `target_root` must spell them."""
    resolved = resolve_recipe_paths(values, root)
    return {
        name: display_path(resolved[name], target_root)
        for name in RECIPE_PATH_FIELDS + RECIPE_MODEL_FIELDS
        if isinstance(resolved.get(name), str) and os.path.isabs(resolved[name])
    }


def tuned_recipe_text(result: TuneResult, *, recipe_path: str | None, overrides: dict[str, Any], target: str,
                      command: str) -> str:  # fmt: skip
    """The base recipe with the command-line overrides and the best trial's values, under a header saying how they
    were chosen. Local paths are rewritten relative to the tuned recipe's own root, so it means the same files."""
    target_root = recipe_root(target)
    text, values = "", {}
    if recipe_path is not None:
        text = Path(recipe_path).read_text(encoding="utf-8")
        base = yaml.safe_load(text) or {}
        moved = _local_paths(base, recipe_root(recipe_path), target_root)
        values = {name: path for name, path in moved.items() if path != base[name]}
    values.update(overrides)
    values.update(_local_paths(overrides, os.getcwd(), target_root))  # command-line paths are cwd-relative
    values.update(result.best["values"])
    body = set_recipe_values(text, values)
    return _header(result, recipe_path, target_root, command) + "\n" + body


def _repeats(complete: list[dict]) -> str:
    """`"; N distinct points"` when some complete trials tried the same values as another (a study continued by an
    hf-distill before 2026-12-02 replayed its sampler's first draws), else `""`."""
    distinct = {tuple(sorted(t["params"].items())) for t in complete}
    return f"; {len(distinct)} distinct points" if len(distinct) < len(complete) else ""


def _header(result: TuneResult, recipe_path: str | None, target_root: Path, command: str) -> str:
    settings, best, validation = result.settings, result.best, result.validation
    run = settings["run"]
    complete = [t for t in result.trials if t["state"] == "COMPLETE"]
    own = next((t for t in complete if t["recipe_values"]), None)
    rows = validation["train_rows"]
    source = display_path(os.path.abspath(recipe_path), target_root) if recipe_path else "the command line"
    tuned = ", ".join(f"{k} {v:g} (recipe: {run.get(k)})" for k, v in best["values"].items())
    alpha = ""
    if "alpha" in best["params"]:
        alpha = "; alpha = logits_weight / (task_weight + logits_weight), their sum kept"
    paragraphs = [
        f"Tuned by scripts/tune.py from {source}. Search: {', '.join(settings['search_space'])}{alpha}.",
        f"{len(complete)} complete trials ({len(result.trials)} run{_repeats(complete)}), optuna sampler "
        f"{settings['sampler']}, selected "
        f"on {settings['metric']} ({settings['direction']}) of a validation slice of {validation['validation_rows']} "
        f"labelled training rows (validation_seed {validation['validation_seed']}), held out of the "
        f"{rows['labelled']} labelled + {rows['unlabelled']} unlabelled rows each trial trained on; the dev split "
        "(validation_file / eval_split) was not read.",
        f"Best: trial {best['number']}, {settings['metric']} {best['objective']:.4f}"
        + (f"; the recipe's own values (trial {own['number']}): {own['objective']:.4f}." if own else "."),
        f"Tuned values: {tuned}.",
        f"Command: {command}",
    ]
    lines = []
    for paragraph in paragraphs:
        lines += textwrap.wrap(paragraph, HEADER_WIDTH - 2, break_on_hyphens=False, break_long_words=False)
    return "\n".join(f"# {line}" for line in lines) + "\n"


# ---------------------------------------------------------------------- writing
def write_tuning_outputs(result: TuneResult, args: TuneArgs, argv: list[str]) -> tuple[str, str]:
    """Write `<tune_dir>/trials.json` and the tuned recipe (`tune.tuned_recipe` or `<tune_dir>/tuned.yaml`).

    Returns:
        `(tuned recipe path, trials path)`.
    """
    command = "python scripts/tune.py " + shlex.join(argv)
    target = args.tune.tuned_recipe or os.path.join(result.tune_dir, TUNED_RECIPE_NAME)
    text = tuned_recipe_text(
        result, recipe_path=args.distill.recipe_path, overrides=args.overrides, target=target, command=command
    )
    trials_path = os.path.join(result.tune_dir, TRIALS_NAME)
    record = {"command": command, "recipe": args.distill.recipe_path, "tuned_recipe": target, **result.to_dict()}
    write_text_atomic(trials_path, json.dumps(record, indent=2, default=str) + "\n")
    write_text_atomic(target, text)
    return target, trials_path
