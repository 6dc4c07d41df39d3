"""The arguments of `scripts/distill.py` besides `DistillationConfig`: `ModelArguments` (teacher and student),
`DataArguments` (data, tokenization, transfer set) and `RunArguments` (resuming)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import PROBLEM_TYPES
from .peft_setup import check_peft_settings
from .transfer import check_augment, check_unlabelled_source, transfer_source, unlabelled_source


@dataclass
class ModelArguments:
    """Which teacher to distill, into which student."""

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher: a Hub id or a local directory with a fine-tuned model."}
    )
    extra_teacher_model_names_or_paths: list[str] | None = field(
        default=None,
        metadata={
            "help": "Multi-teacher distillation: more teachers (Hub ids or local directories) of the teacher's "
            "tokenizer and classes, after teacher_model_name_or_path in the order of teacher_weights."
        },
    )
    student_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An existing student (Hub id or directory). None builds one from the teacher's layers."},
    )
    student_num_layers: int | None = field(
        default=None, metadata={"help": "Depth of the student built from the teacher (default: half the teacher)."}
    )
    student_layers: str | None = field(
        default=None,
        metadata={"help": "Teacher layers copied into the student, e.g. '0,2,4' (default: evenly spaced)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer shared by teacher and student (default: the teacher's)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modeling code shipped with a checkpoint (teacher, student, tokenizer)."},
    )
    peft: dict | str | None = field(
        default=None,
        metadata={
            "help": "Train the student with LoRA: peft.LoraConfig fields (r, lora_alpha, lora_dropout, "
            "target_modules, modules_to_save, ...), a mapping in a recipe, JSON on the command line "
            "(--peft '{\"r\": 8}'). task_type "
            "follows the student's head (SEQ_CLS, TOKEN_CLS, CAUSAL_LM); a classifier's head is trained in full."
        },
    )
    save_merged: bool = field(
        default=False,
        metadata={
            "help": "With peft: merge the adapter into the student and save a plain transformers model in "
            "<output_dir>/student. Otherwise the adapter is saved there and its base in <output_dir>/student_base."
        },
    )
    teacher_adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A PEFT adapter (folder or Hub id) of teacher_model_name_or_path: loaded on it, merged "
            "(merge_and_unload) and frozen. Its adapter_config.json must name teacher_model_name_or_path as its base."
        },
    )

    def __post_init__(self):
        if self.peft is not None:
            self.peft = check_peft_settings(self.peft)
        if self.save_merged and self.peft is None:
            raise ValueError(
                "save_merged=True merges a LoRA adapter into the student, but peft is unset (the student is trained "
                "in full and saved as a plain model anyway). Drop save_merged, or set peft to train with LoRA."
            )
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise ValueError(
                f"student_num_layers must be >= 1, got {self.student_num_layers}. Use e.g. half the teacher's depth."
            )
        layers = self.student_layer_list
        if self.student_model_name_or_path and (layers is not None or self.student_num_layers is not None):
            given = "student_layers" if layers is not None else "student_num_layers"
            raise ValueError(
                f"student_model_name_or_path={self.student_model_name_or_path!r} loads an existing student, but "
                f"{given}={getattr(self, given)!r} asks to build one from the teacher's layers. Drop {given}, or "
                "drop student_model_name_or_path to build the student from the teacher."
            )
        if layers is not None and self.student_num_layers is not None and len(layers) != self.student_num_layers:
            raise ValueError(
                f"student_layers={self.student_layers!r} picks {len(layers)} teacher layers but "
                f"student_num_layers={self.student_num_layers} asks for {self.student_num_layers}. Drop one of them "
                f"(student_layers alone sets the depth), or set student_num_layers={len(layers)}."
            )

    @property
    def student_layer_list(self) -> list[int] | None:
        """`student_layers` as a list of ints (`None` if unset); a ValueError names the field if it does not parse."""
        if self.student_layers is None or str(self.student_layers).strip() == "":
            return None
        try:
            return [int(x) for x in str(self.student_layers).split(",")]
        except ValueError as e:
            raise ValueError(
                f"student_layers must be comma-separated teacher layer indices like '0,2,4', got "
                f"{self.student_layers!r}."
            ) from e


RESUME_CHOICES = ("auto", "never")


@dataclass
class RunArguments:
    """What `scripts/distill.py` does with an `output_dir` that already holds checkpoints.

    The settings that define a run are written to `<output_dir>/run_config.json` (and into every checkpoint) when
    training starts; see `hf_distill.resume`.

    Parameters:
        resume (`str`, defaults to `"auto"`):
            `auto`: resume from the last complete checkpoint if its recorded settings equal this run's, and refuse
            (listing the differing fields) if they do not; `never`: never resume, and refuse to start if
            `output_dir` already holds checkpoints (unless `overwrite_output_dir`).
        overwrite_output_dir (`bool`, defaults to `False`):
            Delete the checkpoints, `run_config.json` and the saved student of a previous run in `output_dir`, then
            start from scratch.
        deploy_variants (`list[str]`, *optional*):
            Teacher to deployable student in one run: after training, the saved student is exported to ONNX
            (`<output_dir>/student/onnx/`) as these variants (`onnx`, `onnx-int8`, `onnx-int8-static`, the last
            calibrated on training rows), each measured on the eval split beside the fp32 teacher and student, and
            the table is added to the model card (`hf_distill.deploy_run`). Needs an eval split and the `export`
            extra.
    """

    resume: str = field(
        default="auto",
        metadata={
            "help": "auto: resume from the last checkpoint if its settings match this run's (else refuse); never: "
            "start from scratch (refused if output_dir holds checkpoints, unless overwrite_output_dir)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete a previous run's checkpoints, run_config.json and student in output_dir first."},
    )
    deploy_variants: list[str] | None = field(
        default=None,
        metadata={
            "help": "After training, export the student to ONNX into <student>/onnx/ and quantise it: any of onnx, "
            "onnx-int8, onnx-int8-static; each measured on the eval split beside the teacher (accuracy, size, "
            "latency) in the model card, and pushed with the student (hf_distill.deploy_run)."
        },
    )

    def __post_init__(self):
        if self.resume not in RESUME_CHOICES:
            raise ValueError(
                f"resume must be one of {RESUME_CHOICES}, got {self.resume!r}. Use 'auto' to continue an interrupted "
                "run, or 'never' (with overwrite_output_dir=true) to start over."
            )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to tokenize it."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset, e.g. 'glue'."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration, e.g. 'sst2'."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.csv, .tsv, .json, .jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(default="validation", metadata={"help": "Split used for evaluation."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(
        default="label",
        metadata={
            "help": "Column with the labels: integer ids, class names (mapped to ids in sorted order), floats "
            "(regression) or json lists (multi-label: 0/1 per class, or class names)."
        },
    )
    problem_type: str | None = field(
        default=None,
        metadata={"help": f"Force the task, one of {PROBLEM_TYPES} (e.g. regression on integer scores); None: infer."},
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (longer ones are cut)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use a fixed shuffled subset of this many training rows (seeded by `seed`)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    unlabelled_file: str | None = field(
        default=None,
        metadata={
            "help": "Transfer set: a local .txt (one text a line) / .csv / .tsv / .json / .jsonl file of unlabelled "
            "texts (the text column; labels, if any, are ignored). Its rows add only teacher terms to training."
        },
    )
    unlabelled_split: str | None = field(
        default=None,
        metadata={"help": "Transfer set: a split of the Hub dataset `dataset_name` whose texts are used unlabelled."},
    )
    unlabelled_from_train: bool = field(
        default=False,
        metadata={
            "help": "Transfer set: the training rows outside the `max_train_samples` subset, used without their "
            "labels (needs max_train_samples)."
        },
    )
    max_unlabelled_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded shuffled subset of this many unlabelled rows (unset: all)."}
    )
    augment_method: str | None = field(
        default=None,
        metadata={
            "help": "Transfer set: augmented copies of the labelled training rows, labelled by the teacher only "
            "(hf_distill.augment): 'eda' (one EDA edit each: swap, delete, insert or replace words; no model), one "
            "of 'swap', 'delete', 'insert', 'replace', or 'mlm' (TinyBERT's masked-LM word replacement)."
        },
    )
    augment_n_per_row: int = field(default=4, metadata={"help": "Augmented texts made per labelled row."})
    augment_p: float | None = field(
        default=None, metadata={"help": "Edit rate: EDA's alpha (default 0.1) or, for 'mlm', TinyBERT's 0.4."}
    )
    augment_top_k: int = field(default=15, metadata={"help": "'mlm': candidates per word (TinyBERT: 15)."})
    augment_mlm_model_name_or_path: str | None = field(
        default=None, metadata={"help": "'mlm': a model with a trained masked-LM head, and its tokenizer."}
    )
    augment_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Store the augmented rows (Arrow) here, made once and reused (unset: made in memory)."},
    )
    max_augmented_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded shuffled subset of this many augmented rows (unset: all)."}
    )

    @property
    def unlabelled_source(self) -> str | None:
        """The field naming the transfer set (`unlabelled_file`, `unlabelled_split`, `unlabelled_from_train`)."""
        return unlabelled_source(self)

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}. Use e.g. 128.")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"problem_type must be one of {PROBLEM_TYPES} or unset, got {self.problem_type!r}. Leave it unset to "
                "infer the task from the label column."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_unlabelled_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}. Leave it unset to use every row.")
        check_unlabelled_source(self)
        check_augment(self)

    @property
    def transfer_source(self) -> str | None:
        """The field that adds teacher-only rows (an unlabelled source, else `augment_method`), or None."""
        return transfer_source(self)
