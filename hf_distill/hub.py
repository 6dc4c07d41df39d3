"""Publishing: a model card for the distilled student and a push of the student folder alone."""

from __future__ import annotations

import os

from .trainer import PROJECTIONS_NAME

# Files that must never be published with a student: trainer-owned projections, optimizer state, the teacher.
FORBIDDEN_FILES = (PROJECTIONS_NAME, "optimizer.pt", "scheduler.pt", "teacher")


def model_card(
    *,
    teacher: str,
    recipe: str,
    dataset: str,
    student_params: int,
    teacher_params: int,
    metrics: dict[str, float] | None = None,
    base_model: str | None = None,
) -> str:
    """Markdown model card stating teacher, recipe, accuracy kept, size and measured speed-up.

    `metrics` may hold `teacher_accuracy`, `student_accuracy`, `speedup_batch32` (measured, never assumed); missing
    figures are written as "not measured".
    """
    metrics = metrics or {}

    def fmt(key: str, pattern: str) -> str:
        return pattern.format(metrics[key]) if metrics.get(key) is not None else "not measured"

    kept = None
    if metrics.get("teacher_accuracy") and metrics.get("student_accuracy") is not None:
        kept = 100.0 * metrics["student_accuracy"] / metrics["teacher_accuracy"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- hf-distill",
        "- distillation",
        f"base_model: {base_model or teacher}",
        "---",
        "",
        f"# Student distilled from `{teacher}`",
        "",
        f"Distilled with [hf-distill](https://github.com/hf-distill/hf-distill) using the recipe `{recipe}` on "
        f"`{dataset}`. It loads with plain `transformers` (`AutoModelForSequenceClassification.from_pretrained`).",
        "",
        "| | teacher | student |",
        "|---|---|---|",
        f"| parameters | {teacher_params / 1e6:.1f}M | {student_params / 1e6:.1f}M "
        f"({100.0 * student_params / teacher_params:.0f}% of the teacher) |",
        f"| accuracy | {fmt('teacher_accuracy', '{:.4f}')} | {fmt('student_accuracy', '{:.4f}')} |",
        "",
        f"- Accuracy kept: {f'{kept:.1f}%' if kept is not None else 'not measured'} of the teacher's.",
        f"- Measured CPU speed-up over the teacher at batch 32: {fmt('speedup_batch32', '{:.2f}x')}.",
        "",
    ]
    return "\n".join(lines)


def push_student(folder: str, repo_id: str, *, token: str | None = None, private: bool | None = None, api=None) -> str:
    """Upload the saved student folder (weights, config, tokenizer, model card) to the Hub; returns the commit URL.

    Refuses a folder holding training-only files (projections, optimizer state), so a checkpoint is never pushed.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} has no config.json: pass the folder written by save_model (…/student).")
    bad = [name for name in os.listdir(folder) if name in FORBIDDEN_FILES]
    if bad:
        raise ValueError(
            f"{folder!r} holds training-only files {bad}; push the saved student folder, not a checkpoint."
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=folder, repo_id=repo_id, commit_message="Upload distilled student (hf-distill)"
    )
