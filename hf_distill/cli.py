"""Command line of `scripts/distill.py`: a `--config` recipe, then `--field value` overrides, checked before any load.

- A misspelt flag is refused with the closest valid one (abbreviations are off: `--learning_rat` is an error, not
  `--learning_rate`).
- Values on the command line override the recipe's. Where a command-line value overrides a *different* recipe field
  that says the same thing (the recipe's `student_num_layers: 3` against `--student_layers 0,5`), the recipe's field
  is dropped and a warning says so; two such fields given together in one place are refused by the dataclasses.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

from transformers import HfArgumentParser

from .arguments import DataArguments, ModelArguments, RunArguments
from .config import DistillationConfig
from .recipes import load_recipe

logger = logging.getLogger(__name__)

# Fields that describe one thing between them: a command-line value of one of a group replaces the recipe's values of
# the others (the student is either loaded, or built with a depth given by `student_layers` or `student_num_layers`).
OVERLAPPING_FIELDS = (("student_model_name_or_path", "student_num_layers", "student_layers"),)


@dataclass
class DistillArgs:
    """Everything `scripts/distill.py` runs with."""

    model: ModelArguments
    data: DataArguments
    run: RunArguments
    training: DistillationConfig
    recipe_path: str | None = None


def make_parser() -> HfArgumentParser:
    # allow_abbrev=False: argparse would otherwise take any unique prefix (`--temp`) as the full flag, silently.
    return HfArgumentParser((ModelArguments, DataArguments, RunArguments, DistillationConfig), allow_abbrev=False)


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a recipe path, e.g. --config recipes/<teacher>_to_<student>/x.yaml.")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def check_unknown_flags(parser: HfArgumentParser, argv: list[str]) -> None:
    """Raise a ValueError naming each argument no dataclass takes, with the closest valid flag."""
    _, unknown = parser.parse_known_args(args=argv)
    if not unknown:
        return
    valid = sorted(
        s for s in parser._option_string_actions if s.startswith("--") and "-" not in s[2:] and s != "--help"
    )
    hints = []
    after_flag = False
    for arg in unknown:
        if not arg.startswith("-"):
            if not after_flag:  # the value of an unknown flag is not reported again
                hints.append(f"{arg!r} (a value without a flag)")
            after_flag = False
            continue
        flag = arg.split("=", 1)[0]
        after_flag = "=" not in arg
        wanted = "--" + flag.lstrip("-").replace("-", "_")
        close = [s for s in valid if s.startswith(wanted)][:1] or difflib.get_close_matches(wanted, valid, n=1)
        hints.append(f"{flag!r} (did you mean {close[0]!r}?)" if close else repr(flag))
    raise ValueError(
        f"unknown command-line argument(s): {', '.join(hints)}. Flags are the fields of ModelArguments, "
        "DataArguments, RunArguments and DistillationConfig, e.g. --learning_rate 5e-5; see --help."
    )


def command_line_fields(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """Names of the fields given on the command line (`--x v`, `--x=v`, `--x-y v`, `--no_x`)."""
    actions = parser._option_string_actions
    return {actions[arg.split("=", 1)[0]].dest for arg in argv if arg.split("=", 1)[0] in actions}


def parse_distill_args(argv: list[str]) -> DistillArgs:
    """Parse `scripts/distill.py`'s arguments: `--config recipe.yaml` gives defaults, flags override them.

    Raises:
        ValueError: unknown flag (with the closest valid one), unknown recipe key, or an invalid field value, all
            before any data or model is loaded.
    """
    parser = make_parser()
    recipe_path, argv = _split_config(list(argv))
    check_unknown_flags(parser, argv)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        given = command_line_fields(parser, argv)
        for group in OVERLAPPING_FIELDS:
            if not given.intersection(group):
                continue
            for name in set(group) - given:
                if recipe.get(name) is not None:
                    logger.warning(
                        "%s given on the command line replaces the recipe's %s=%r (recipe %s).",
                        " and ".join(f"--{n}" for n in group if n in given),
                        name,
                        recipe.pop(name),
                        recipe_path,
                    )
        parser.set_defaults(**recipe)
    model, data, run, training = parser.parse_args_into_dataclasses(args=argv)
    return DistillArgs(model=model, data=data, run=run, training=training, recipe_path=recipe_path)


# ---------------------------------------------------------------------- --set KEY=VALUE (the YAML-config scripts)
def add_set_argument(parser) -> None:
    """`--set KEY=VALUE` (repeatable) on an argparse parser: a config key overridden, VALUE read as YAML."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config key, VALUE read as YAML (repeatable), e.g. --set max_train_samples=500.",
    )


def parse_set_overrides(pairs: list[str]) -> dict:
    """The `--set KEY=VALUE` pairs as `{key: yaml value}`; a pair without `=` exits with a one-line error."""
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}.")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides
