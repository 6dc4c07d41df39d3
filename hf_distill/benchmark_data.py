"""What a benchmark trains and evaluates on: its data, tokenizer, collator, teacher and budget, loaded on first use.

[`BenchmarkInputs`] is the base of `hf_distill.benchmark.Benchmark`, which runs the stages; a rerun over finished
stage folders loads none of this.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .arguments import DataArguments
from .benchmark_config import BenchmarkConfig
from .benchmark_stages import StageResult, resolve_teacher, total_train_steps
from .data import labelled_rows, load_task_dataset, num_labels_of, row_counts, tokenize_dataset
from .transfer import AUGMENT_FIELDS, unlabelled_source

# BenchmarkConfig fields of the transfer set: in the spec of every distilled stage when one is set.
TRANSFER_KEYS = ("unlabelled_file", "unlabelled_split", "unlabelled_from_train", "max_unlabelled_samples")


class BenchmarkInputs:
    """The data, models and budget of one benchmark, resolved against `root` and loaded when first needed."""

    def __init__(self, config: BenchmarkConfig, root: str | os.PathLike):
        self.config = config
        self.root = Path(root).resolve()
        out = config.output_dir or os.path.join("outputs", "benchmarks", config.name)
        self.out = self._path(out)
        self.stages: list[StageResult] = []

    def _path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.root / path

    # ------------------------------------------------------------------ data and models, loaded on first use
    @cached_property
    def data_args(self) -> DataArguments:
        c = self.config
        files = {}
        if c.train_file and self._path(c.train_file).is_file() and self._path(c.validation_file).is_file():
            files = {
                "train_file": str(self._path(c.train_file)),
                "validation_file": str(self._path(c.validation_file)),
            }
        elif c.dataset_name:
            print(f"[data] {c.train_file} not found: loading {c.dataset_name}/{c.dataset_config} from the Hub")
            files = {"dataset_name": c.dataset_name, "dataset_config": c.dataset_config}
        else:
            raise FileNotFoundError(f"train_file={c.train_file!r} / validation_file={c.validation_file!r} not found.")
        augment = {k: getattr(c, k) for k in AUGMENT_FIELDS}
        mlm = c.augment_mlm_model_name_or_path
        if mlm and self._path(mlm).exists():  # a local folder (relative: to the root), else a Hub id
            augment["augment_mlm_model_name_or_path"] = str(self._path(mlm))
        return DataArguments(
            **files,
            train_split=c.train_split,
            eval_split=c.eval_split,
            text_column=c.text_column,
            label_column=c.label_column,
            max_length=c.max_length,
            max_train_samples=c.max_train_samples,
            max_eval_samples=c.max_eval_samples,
            unlabelled_file=str(self._path(c.unlabelled_file)) if c.unlabelled_file else None,
            unlabelled_split=c.unlabelled_split,
            unlabelled_from_train=c.unlabelled_from_train,
            max_unlabelled_samples=c.max_unlabelled_samples,
            **augment,
            augment_cache_dir=str(self.out / "augmented") if c.augment_method else None,
        )

    @cached_property
    def raw(self):
        raw = load_task_dataset(self.data_args, seed=self.config.seed)
        print(
            f"[data] {', '.join(f'{split}: {len(d):,} rows' for split, d in raw.items())} {row_counts(raw['train'])}"
        )
        return raw

    @cached_property
    def base_teacher(self) -> str:
        c = self.config
        return resolve_teacher(c.teacher_model_name_or_path, self.root, c.teacher_hub_fallback)

    @cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.base_teacher)

    @cached_property
    def dataset(self):
        return tokenize_dataset(self.raw, self.tokenizer, self.data_args)

    @cached_property
    def labelled_train(self):
        """The labelled training rows: what the teacher and the no-KD row train on."""
        return labelled_rows(self.dataset["train"])

    def train_rows(self, transfer: bool):
        """The training rows of a row: labelled + unlabelled for a distilled row (`transfer`), else labelled only."""
        return self.dataset["train"] if transfer and self.transfer_spec() else self.labelled_train

    def transfer_spec(self) -> dict[str, Any]:
        """The transfer-set settings (unlabelled source, augmentation), or {} without one (benchmarks without one, or
        without augmentation, keep their stages' fingerprints)."""
        c = self.config
        spec = {k: getattr(c, k) for k in TRANSFER_KEYS} if unlabelled_source(c) else {}
        return spec | ({k: getattr(c, k) for k in AUGMENT_FIELDS} if c.augment_method else {})

    @cached_property
    def collator(self):
        return DataCollatorWithPadding(self.tokenizer)

    @cached_property
    def num_labels(self) -> int:
        return num_labels_of(self.raw, self.config.label_column)

    @cached_property
    def teacher(self):
        """The (fine-tuned) teacher, frozen, shared by every distillation stage."""
        model = AutoModelForSequenceClassification.from_pretrained(self.teacher_dir)
        return model.eval().requires_grad_(False)

    @property
    def teacher_dir(self) -> str:
        return str(self.out / "teacher") if self.config.finetune_teacher else self.base_teacher

    def steps(self, transfer: bool) -> int:
        """`num_train_epochs` over a row's own training rows, in optimizer steps."""
        c = self.config
        return total_train_steps(len(self.train_rows(transfer)), c.per_device_train_batch_size, c.num_train_epochs)

    def row_steps(self, transfer: bool) -> int:
        """The optimizer steps a student row trains for. With `match_steps` (the default) every student row gets the
        steps of `num_train_epochs` over the distilled rows' training rows, so rows on the labelled rows alone (the
        baseline) cycle over them more often on the same budget; otherwise each row's own `steps`."""
        return self.steps(True) if self.config.match_steps else self.steps(transfer)
