"""Build a shallower student from a teacher checkpoint and save it (with the teacher's tokenizer) to a directory.

    python scripts/make_student.py --teacher bert-base-uncased --output_dir students/bert-6l --num_layers 6
    python scripts/make_student.py --teacher ./my-llama --output_dir students/llama-3l --layers 0,2,4 --task causal-lm

The logic lives in `hf_distill.student.make_student`; this script only loads, calls it and saves atomically.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import cached_file

from hf_distill.student import make_student

# --task overrides the class named in the teacher's config.architectures[0].
TASK_CLASSES = {
    "sequence-classification": transformers.AutoModelForSequenceClassification,
    "causal-lm": transformers.AutoModelForCausalLM,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "base": AutoModel,
}
# transformers 5 `AutoTokenizer` builds an empty tokenizer (special tokens only) from a checkpoint without any of
# these files instead of failing, so the script looks for them before deciding there is a tokenizer to copy.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def fail(message: str) -> NoReturn:
    """Exit with a one-line error (no traceback): the message already names the argument and the fix."""
    print(f"make_student.py: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Local checkpoint directory or Hugging Face Hub id.")
    parser.add_argument("--output_dir", required=True, help="Where to save the student (must be new or empty).")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--num_layers", type=int, help="Student depth; teacher layers spread evenly (default N // 2).")
    depth.add_argument(
        "--layers", help="Comma-separated teacher layers to copy, e.g. 0,2,4 (student layer i <- i-th)."
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASK_CLASSES),
        help="Load the teacher as this head instead of config.architectures[0]. A head the checkpoint lacks is "
        "randomly initialised in the teacher and copied as such.",
    )
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace a non-empty --output_dir.")
    args = parser.parse_args(argv)

    if args.layers is not None:
        try:
            args.layers = [int(part) for part in args.layers.split(",")]
        except ValueError:
            parser.error(f"--layers must be comma-separated integers such as 0,2,4, got {args.layers!r}.")
    if not Path(args.teacher).exists():
        # Anything that is not a local path must be a Hub id; "./typo/dir" or "/abs/path" can be neither.
        try:
            validate_repo_id(args.teacher)
        except HFValidationError:
            parser.error(
                f"--teacher {args.teacher!r} is neither an existing local directory nor a valid Hub id "
                "(e.g. 'bert-base-uncased' or 'org/name'). Check the path."
            )
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        parser.error(
            f"--output_dir {args.output_dir!r} exists and is not empty. Pick a new directory or pass "
            "--overwrite_output_dir."
        )
    return args


def load_teacher(name_or_path: str, task: str | None) -> transformers.PreTrainedModel:
    """The teacher with the class `--task` asks for, else the one its config names, else `AutoModel`."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        fail(f"--teacher {name_or_path!r}: could not load a config ({err}). Check the path or Hub id.")
    if task is not None:
        model_class = TASK_CLASSES[task]
    else:
        architecture = (config.architectures or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        model_class = model_class or AutoModel
    print(f"Loading teacher {name_or_path} as {model_class.__name__}")
    return model_class.from_pretrained(name_or_path, config=config)


def load_tokenizer(name_or_path: str):
    """The teacher's tokenizer, or None if the checkpoint ships none (the student shares the teacher's vocabulary)."""
    lookup = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    if not any(cached_file(name_or_path, name, **lookup) for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(name_or_path)


def main(argv: list[str] | None = None) -> None:
    # ---- Arguments ----
    args = parse_args(argv)

    # ---- Teacher ----
    teacher = load_teacher(args.teacher, args.task).eval()
    tokenizer = load_tokenizer(args.teacher)
    if tokenizer is None:
        print(f"No tokenizer files in {args.teacher}; saving the student without a tokenizer.")

    # ---- Student ----
    try:
        student = make_student(teacher, num_layers=args.num_layers, layers=args.layers)
    except ValueError as err:  # bad --num_layers / --layers for this teacher, or an unsupported family
        fail(str(err))

    # ---- Save ----
    # Write next to the target and rename at the end, so an interrupted run never leaves a half-written output_dir.
    output_dir = Path(args.output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        student.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if output_dir.exists() and any(output_dir.iterdir()):  # only reachable with --overwrite_output_dir
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)  # replaces an empty directory too
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"Saved student ({student.config.num_hidden_layers} layers) to {output_dir}")


if __name__ == "__main__":
    main()
