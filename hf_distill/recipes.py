"""Recipes: flat YAML mappings of the scripts' dataclass fields, checked (`check_recipe_keys`) and read with their
relative paths resolved against the repository holding them (`load_recipe`, `recipe_root`, `resolve_recipe_paths`);
`display_path` shows such paths in model cards."""

from __future__ import annotations

import difflib
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .arguments import DataArguments, ModelArguments, RunArguments
from .config import DistillationConfig

SCRIPT_DATACLASSES = (ModelArguments, DataArguments, RunArguments, DistillationConfig)


def check_recipe_keys(recipe: dict[str, Any], dataclass_types=SCRIPT_DATACLASSES, source: str = "recipe") -> None:
    """Raise a ValueError for keys no dataclass knows, suggesting the closest valid key."""
    valid = {f.name for dc in dataclass_types for f in fields(dc) if f.init}
    unknown = [k for k in recipe if k not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"unknown key(s) in {source}: {', '.join(hints)}. Valid keys are the fields of "
            f"{', '.join(dc.__name__ for dc in dataclass_types)}."
        )


# Recipe fields holding local paths, resolved against the recipe's root (see `load_recipe`).
RECIPE_PATH_FIELDS = (
    "train_file",
    "validation_file",
    "unlabelled_file",
    "augment_cache_dir",
    "output_dir",
    "logging_dir",
    "teacher_cache_dir",
    "resume_from_checkpoint",
)
# Recipe fields holding a local directory or a Hub id (`org/name`): resolved only when they are a local path.
RECIPE_MODEL_FIELDS = (
    "teacher_model_name_or_path",
    "student_model_name_or_path",
    "tokenizer_name_or_path",
    "augment_mlm_model_name_or_path",
    "teacher_adapter_name_or_path",
)
ROOT_MARKERS = ("pyproject.toml", ".git")


def recipe_root(path: str | os.PathLike) -> Path:
    """The root a recipe's relative paths are resolved against: the nearest folder above the recipe holding a
    `pyproject.toml` or `.git` (the repository the recipe belongs to), else the recipe's own folder."""
    folder = Path(path).resolve().parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in ROOT_MARKERS):
            return candidate
    return folder


def looks_local(value: str) -> bool:
    # Hub ids are `name` or `org/name`; anything with more slashes, or starting like a path, is a local path.
    return os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1


def resolve_recipe_paths(recipe: dict[str, Any], root: str | os.PathLike) -> dict[str, Any]:
    """A copy of `recipe` whose relative path-valued fields are made absolute against `root` (`~` expanded).

    `RECIPE_PATH_FIELDS` are always local paths. `RECIPE_MODEL_FIELDS` are resolved when they look like a local path
    (absolute, `./`, `../`, `~`, or more than one `/`) or name an existing folder under `root`; otherwise they are
    Hub ids and left alone.
    """
    root = Path(root)
    resolved = dict(recipe)
    for name in RECIPE_PATH_FIELDS + RECIPE_MODEL_FIELDS:
        value = resolved.get(name)
        if not isinstance(value, str) or not value:
            continue
        expanded = os.path.expanduser(value)
        candidate = expanded if os.path.isabs(expanded) else os.path.normpath(root / expanded)
        if name in RECIPE_PATH_FIELDS or looks_local(value) or os.path.exists(candidate):
            resolved[name] = candidate
    return resolved


def display_path(path: str | None, root: str | os.PathLike) -> str | None:
    """`path` as shown in a model card: relative to `root` when it lies under `root` or next to it (`../shared/x`),
    otherwise as given (an absolute path elsewhere, or a Hub id)."""
    if not path or not os.path.isabs(path):
        return path
    relative = os.path.relpath(path, root)
    parts = Path(relative).parts
    ups = next((i for i, part in enumerate(parts) if part != ".."), len(parts))  # relpath puts every ".." first
    return relative if ups <= 1 else path


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML (a flat mapping of dataclass fields), check its keys and resolve its relative paths.

    Relative paths in the recipe (data files, output and cache folders, local model folders: see
    `resolve_recipe_paths`) are resolved against [`recipe_root`], the repository holding the recipe (or the recipe's
    folder), so a recipe means the same files from any working directory. Values given on the command line are not
    recipe values: they stay as typed, relative to the working directory.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--config {path!r} does not exist. Recipes live under recipes/, e.g. "
            "recipes/minilm-sst2_to_minilm-l3/distilbert.yaml."
        )
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of field: value, got {type(recipe).__name__}.")
    check_recipe_keys(recipe, source=str(path))
    return resolve_recipe_paths(recipe, recipe_root(path))
