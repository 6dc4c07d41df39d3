"""Export a saved student to ONNX (tokenizer and config beside it), check it against PyTorch, optionally quantise.

    python scripts/export.py --model_dir students/mpnet-6l --output_dir deploy/mpnet-6l --quantize onnx-int8 \
        --check_file data/sst2_dev.tsv
    python scripts/export.py ... --quantize onnx-int8-static --calibration_file data/sst2_train.tsv

Prints the max |ONNX Runtime - PyTorch| over the check rows' logits and each file's size. The folder is written into
a temporary sibling and renamed at the end: a failed run leaves nothing half-written. The logic lives in
`hf_distill.export.export_student`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import NoReturn

from hf_distill.export import DEFAULT_OPSET, QUANTIZE_CHOICES, export_student

TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "premise")


def fail(message: str) -> NoReturn:
    """Exit with a one-line error (no traceback): the message already names the argument and the fix."""
    print(f"export.py: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="Saved student folder (with its tokenizer).")
    parser.add_argument("--output_dir", required=True, help="Folder to create for the ONNX model (must be new).")
    parser.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, default="none", help="Also write an int8 variant (default: none)."
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}).")
    parser.add_argument(
        "--check_file",
        help="TSV/CSV with a header whose text column (sentence, text, ...; else the first) gives the rows to compare "
        "ONNX Runtime with PyTorch on. Default: a few built-in sentences.",
    )
    parser.add_argument("--num_check_rows", type=int, default=64, help="Rows of --check_file to use (default 64).")
    parser.add_argument(
        "--calibration_file",
        help="TSV/CSV of training rows (same format as --check_file) to calibrate --quantize onnx-int8-static on; "
        "not the rows you evaluate on.",
    )
    parser.add_argument(
        "--num_calibration_rows", type=int, default=128, help="Rows of --calibration_file to use (default 128)."
    )
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace a non-empty --output_dir.")
    return parser.parse_args(argv)


def read_check_rows(
    path: str, limit: int, flag: str = "--check_file", count_flag: str = "--num_check_rows"
) -> list[str]:
    """The first `limit` texts of a TSV/CSV file with a header."""
    if not Path(path).is_file():
        fail(f"{flag} {path!r} is not a file. Pass a TSV/CSV with a header, e.g. a dev split.")
    if limit < 1:
        fail(f"{count_flag} must be >= 1, got {limit}. Use e.g. 64.")
    with open(path, newline="", encoding="utf-8") as f:
        delimiter = "\t" if path.endswith(".tsv") else ","
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else 0)
        columns = reader.fieldnames or []
        column = next((c for c in TEXT_COLUMNS if c in columns), columns[0] if columns else None)
        texts = [row[column] for _, row in zip(range(limit), reader) if column and row.get(column)]
    if not texts:
        fail(f"{flag} {path!r} has no text rows (columns: {columns}). Use a file with a header and rows.")
    return texts


def main(argv: list[str] | None = None) -> None:
    # ---- Arguments ----
    args = parse_args(argv)
    check_texts = read_check_rows(args.check_file, args.num_check_rows) if args.check_file else None
    calibration_texts = None
    if args.calibration_file:
        calibration_texts = read_check_rows(
            args.calibration_file, args.num_calibration_rows, "--calibration_file", "--num_calibration_rows"
        )

    # ---- Export, check, quantise ----
    try:
        result = export_student(
            args.model_dir,
            args.output_dir,
            opset=args.opset,
            check_texts=check_texts,
            quantize=args.quantize,
            calibration_texts=calibration_texts,
            overwrite=args.overwrite_output_dir,
        )
    except ValueError as err:  # bad folder, family, head, opset or output_dir: the message names the fix
        fail(str(err))

    # ---- Report ----
    print(f"Exported {result.task} student to {result.output_dir} (opset {result.opset}, inputs {result.input_names})")
    print(f"max |ONNX Runtime - PyTorch| over {result.num_check_rows} check rows: {result.max_abs_diff:.3g}")
    for variant, info in result.quantized.items():
        print(f"{variant}: {info['file']}, max |int8 - fp32 PyTorch|: {info['max_abs_diff_vs_fp32']:.3g}")
    student_bytes = sum(p.stat().st_size for p in Path(args.model_dir).glob("*.safetensors"))
    print(f"Sizes on disk (fp32 student weights in --model_dir: {student_bytes / 2**20:.2f} MiB):")
    for name, size in result.sizes.items():
        print(f"  {name}: {size / 2**20:.2f} MiB ({100 * size / max(student_bytes, 1):.0f}% of the student)")


if __name__ == "__main__":
    main()
