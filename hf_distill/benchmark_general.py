"""General (task-agnostic) distillation inside the benchmark: a student from the pre-trained model's layers, distilled
from the pre-trained model on the training text before any task, then fine-tuned like every other row.

This is how DistilBERT and TinyBERT were made (Sanh et al. 2019, https://arxiv.org/abs/1910.01108; Jiao et al. 2020,
https://arxiv.org/abs/1909.10351, "general distillation"), here for teachers without a language-model head, such as
sentence-transformers checkpoints: the student's transformer body matches the pre-trained teacher's hidden states
and/or attention maps (TinyBERT's intermediate-layer loss; `hidden_weight`, `attention_weight`, `embeddings_weight`,
`layer_mapping`, `hidden_loss`, `attention_loss` of the `general_recipe`) on text alone. Neither model has a head in
this stage, so no task or logit term exists: a recipe that sets them is refused.

Two benchmark keys turn it on (see `BenchmarkConfig`):

    student_init_from: pretrained     # student_init/ = alternating layers of the pre-trained model, no task head
    general_recipe: recipes/.../general_hidden_attention.yaml
    general_steps: 2000
    general_rows: [general_no_kd]     # rows that start from general/ instead of student_init/

`general/` holds the generally distilled body; a row of `general_rows` loads it with a fresh classification head,
drawn from the same seed as the head of a row starting from `student_init/`, so the two differ by the general stage
alone. Its steps are its own budget: every row still trains for the same fine-tuning steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModel, set_seed

from .benchmark_config import INIT_SOURCES  # noqa: F401
from .benchmark_stages import fingerprint, recipe_training_args, run_stage, train_with_resume
from .config import DistillationConfig
from .student import make_student
from .trainer import DistillationTrainer

# Terms of a headless stage: no model has a head, so neither the task loss nor logit KD exists.
GENERAL_TERMS = ("hidden_weight", "attention_weight", "embeddings_weight")


def general_training_args(recipe: dict[str, Any], path: str) -> dict[str, Any]:
    """The DistillationConfig fields of a general-distillation recipe, with the task and logit terms off; refused
    (naming the recipe and the field) when it sets either, or sets no feature term."""
    fields_ = DistillationConfig.__dataclass_fields__
    for name in ("task_weight", "logits_weight"):
        if recipe.get(name, 0) not in (0, 0.0):
            raise ValueError(
                f"general_recipe {path} sets {name}={recipe[name]}, but general distillation trains the models' "
                f"bodies without a head, so there is no {name.split('_')[0]} term. Remove {name} from the recipe "
                f"and weight {', '.join(GENERAL_TERMS)} instead."
            )
    if not any(recipe.get(name, fields_[name].default) > 0 for name in GENERAL_TERMS):
        raise ValueError(
            f"general_recipe {path} has no term: set one of {', '.join(GENERAL_TERMS)} > 0 (e.g. hidden_weight: 1.0 "
            "and attention_weight: 1.0, TinyBERT's general distillation)."
        )
    return {**recipe, "task_weight": 0.0, "logits_weight": 0.0}


class GeneralStages:
    """The student-init and general-distillation stages of `Benchmark` for `student_init_from: pretrained`."""

    def pretrained_student_work(self, tmp: Path) -> dict[str, Any]:
        """`student_init/` from the pre-trained model's layers: its body alone (the rows add a fresh task head), with
        the task's label names so a row's classifier is made for the benchmark's classes."""
        c = self.config
        layers = [int(i) for i in c.student_layers.split(",")] if c.student_layers else None
        base = AutoModel.from_pretrained(self.base_teacher)
        student = make_student(base, num_layers=c.student_num_layers, layers=layers)
        labels = self.teacher.config  # the fine-tuned teacher: the benchmark's classes, in the data's order
        student.config.id2label, student.config.label2id = dict(labels.id2label), dict(labels.label2id)
        student.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        return {"teacher_layers": student.config.distillation_teacher_layers, "from": "pretrained"}

    def general_stage(self, init_spec: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """`general/`: `student_init/`'s body distilled from the pre-trained teacher's body on the text of every
        training row the distilled rows see (labelled rows and transfer set), without labels, for `general_steps`."""
        c = self.config
        training = general_training_args(recipe_training_args(self._path(c.general_recipe)), c.general_recipe)
        spec = {
            "stage": "general",
            "start": fingerprint(init_spec),
            "teacher": c.teacher_model_name_or_path,
            "recipe": training,
            "steps": c.general_steps,
            **self._common_spec(),
            **self.transfer_spec(),
        }
        stage_dir, checkpoints = self.out / "general", self.out / "general.checkpoints"
        text = self.train_rows(True).remove_columns(["labels"])

        def make_trainer(output_dir: str) -> DistillationTrainer:
            set_seed(c.seed)
            teacher = AutoModel.from_pretrained(self.base_teacher).eval().requires_grad_(False)
            student = AutoModel.from_pretrained(self.out / "student_init")
            args = self._training_args(DistillationConfig, output_dir, max_steps=c.general_steps, **training)
            return DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=text,
                processing_class=self.tokenizer,
                data_collator=self.collator,
            )

        def work(tmp: Path) -> dict[str, Any]:
            info = train_with_resume(make_trainer, tmp, checkpoints, spec)
            self.tokenizer.save_pretrained(tmp)
            return {**info, "rows": len(text)}

        result = run_stage(stage_dir, spec, work, cleanup=[checkpoints])
        self.stages.append(result)
        return stage_dir, spec
