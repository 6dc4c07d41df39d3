"""Teacher to deployable student in one run: `scripts/distill.py ... --deploy_variants onnx onnx-int8`.

After the student is saved, `deploy_student` exports it to ONNX and quantises it (`hf_distill.export`), measures each
variant on the eval split beside the fp32 PyTorch teacher and student (accuracy, size on disk, latency at batch 1 and
32 timed round-robin, CPU time; the deployment table of `hf_distill.benchmark_deploy`), and `add_deployment_to_card`
adds that table to the student's model card. The ONNX files go to `<student>/onnx/` (`model.onnx`,
`model_int8.onnx`, `model_int8_static.onnx`), which `push_to_hub` uploads with the student (`hf_distill.hub`).

Only the ONNX variants are offered here: PyTorch's int8 (`torch-int8`) is a `.pt` state dict that a published
student folder does not carry (use `scripts/export.py --quantize torch-int8`, or the benchmark's `deploy_variants`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from .benchmark_deploy import FP32_RUNTIME, deploy_rows_of, format_deploy_table
from .evaluation import measure_latencies, predict_logits
from .files import replace_folder

ONNX_SUBFOLDER = "onnx"
CARD_VARIANTS = ("onnx", "onnx-int8", "onnx-int8-static")
CHECK_ROWS, CALIBRATION_ROWS = 64, 128
CARD_HEADING = "## Deployment"


def check_deploy_variants(
    variants: list[str] | None, *, has_eval: bool, text_pairs: bool = False, adapter_only: bool = False
) -> list[str]:
    """The variants to deploy (empty: none), refusing unknown or non-ONNX ones, and runs they cannot measure: no eval
    rows, sentence-pair data (the export's check rows are single texts), a LoRA student saved as an adapter."""
    variants = list(variants or [])
    bad = [v for v in variants if v not in CARD_VARIANTS]
    if bad or len(set(variants)) != len(variants):
        hint = (
            " torch-int8 is a .pt state dict that a student folder does not carry: use scripts/export.py "
            "--quantize torch-int8."
            if "torch-int8" in bad
            else ""
        )
        raise ValueError(
            f"deploy_variants must be distinct variants from {list(CARD_VARIANTS)}, got {variants!r}.{hint} "
            "E.g. --deploy_variants onnx onnx-int8."
        )
    if variants and not has_eval:
        raise ValueError(
            f"deploy_variants={variants!r} measures every variant on the eval split, but this run has none. Set "
            "validation_file (or dataset_name with eval_split), or drop deploy_variants."
        )
    if variants and text_pairs:
        raise ValueError(
            f"deploy_variants={variants!r} with text_pair_column set: the export is checked and calibrated on single "
            "texts, so sentence-pair students are not deployed here yet. Drop deploy_variants and export with "
            "hf_distill.export.export_student."
        )
    if variants and adapter_only:
        raise ValueError(
            f"deploy_variants={variants!r} exports a plain model, but this LoRA student is saved as an adapter. Set "
            "save_merged: true (the student is then saved merged into its base), or drop deploy_variants."
        )
    if variants:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"deploy_variants={variants!r} needs the export extra ({e.name} is missing): "
                'pip install -e ".[export]".'
            ) from None
    return variants


def texts_for_deployment(raw, text_column: str) -> tuple[list[str], list[str]]:
    """(check rows: the first eval rows, calibration rows: the first labelled training rows) of a raw task dataset."""
    from .data import labelled_rows

    check = list(raw["eval"][text_column][:CHECK_ROWS])
    calibration = list(labelled_rows(raw["train"])[text_column][:CALIBRATION_ROWS])
    return check, calibration


def _state_dict_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def deploy_student(
    student_dir: str | os.PathLike,
    teacher,
    eval_dataset,
    collator,
    variants: list[str],
    *,
    check_texts: list[str],
    calibration_texts: list[str] | None = None,
    runs: int = 20,
    warmup: int = 3,
) -> list[dict[str, Any]]:
    """Export the saved student of `student_dir` for `variants` into `<student_dir>/onnx/` and measure them.

    Returns the deployment table's rows (`hf_distill.benchmark_deploy.deploy_rows_of`): the fp32 PyTorch teacher
    (size: its fp32 state dict), the fp32 PyTorch student (size: its safetensors file), then each variant."""
    from .benchmark_stages import _dir_size_mb
    from .deploy import load_variant, variant_size_mb
    from .export import export_student

    student_dir = Path(student_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{student_dir.name}-onnx.tmp-", dir=student_dir.parent))
    try:
        exported = staging / "export"
        result = export_student(student_dir, exported, check_texts=check_texts,
                                quantize=[v for v in variants if v != "onnx"],
                                calibration_texts=calibration_texts)  # fmt: skip
        models = {
            "teacher": teacher.eval(),
            "student": AutoModelForSequenceClassification.from_pretrained(student_dir).to("cpu").eval(),
            **{f"student-{v}": load_variant(exported, v) for v in variants},
        }
        predictions, accuracy = {}, {}
        labels = None
        for name, model in models.items():
            logits, labels = predict_logits(model, eval_dataset, collator)
            predictions[name] = logits.argmax(-1)
            accuracy[name] = float(np.mean(predictions[name] == labels))
        latencies, _ = measure_latencies(models, eval_dataset, collator, runs=runs, warmup=warmup, cpu_time=True)
        rows = deploy_rows_of(
            ["student"],
            variants,
            evaluations={
                "teacher": {"accuracy": accuracy["teacher"], "size_mb": _state_dict_mb(models["teacher"])},
                "student": {"accuracy": accuracy["student"], "size_mb": _dir_size_mb(student_dir)},
            },
            variant_evals={
                ("student", v): {"accuracy": accuracy[f"student-{v}"], "size_mb": variant_size_mb(exported, v)}
                for v in variants
            },
            exports={("student", v): (exported, {}, {"max_abs_diff_vs_fp32": _diff(result, v)}) for v in variants},
            latency={"latencies": latencies},
            predictions={"student": predictions["student"]}
            | {("student", v): predictions[f"student-{v}"] for v in variants},
        )
        # Only the ONNX files go into the student folder (its config and tokenizer are already there).
        onnx_tmp = staging / ONNX_SUBFOLDER
        onnx_tmp.mkdir()
        for path in sorted(exported.glob("*.onnx")):
            shutil.move(str(path), onnx_tmp / path.name)
        replace_folder(onnx_tmp, student_dir / ONNX_SUBFOLDER)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for row in rows:
        row["eval_rows"] = len(labels)
    return rows


def _diff(result, variant: str) -> float:
    return result.max_abs_diff if variant == "onnx" else result.quantized[variant]["max_abs_diff_vs_fp32"]


def deployment_section(rows: list[dict[str, Any]]) -> str:
    """The model card's deployment section: the measured table and how it was measured."""
    eval_rows = rows[0].get("eval_rows")
    return "\n".join(
        [
            CARD_HEADING,
            "",
            f"Measured after training on {eval_rows} eval rows, on this machine's CPU ({torch.get_num_threads()} "
            "threads; ONNX Runtime on as many), every model timed in turn on the same real batches (median of the "
            "rounds). CPU seconds per 1,000 predictions are process CPU time at batch 32: a proxy for energy, not a "
            f"measurement of it. `{FP32_RUNTIME}` rows load with `transformers`; the ONNX files are in `onnx/` "
            "(inputs `input_ids`, `attention_mask`, ...; output `logits`), to run with ONNX Runtime.",
            "",
            format_deploy_table(rows),
            "",
        ]
    )


def add_deployment_to_card(student_dir: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append (or replace) the deployment section of `<student_dir>/README.md`, written atomically."""
    from .files import write_text_atomic

    card_path = Path(student_dir) / "README.md"
    card = card_path.read_text(encoding="utf-8")
    if CARD_HEADING in card:
        card = card[: card.index(CARD_HEADING)].rstrip("\n") + "\n"
    write_text_atomic(card_path, card.rstrip("\n") + "\n\n" + deployment_section(rows))
