"""`TeacherDataMixin`: what data reaches the teacher in `DistillationTrainer`.

`remove_unused_columns` keeps the columns the student's forward names; the teacher may read others (a BERT teacher's
`token_type_ids` for a DistilBERT student), and with `use_teacher_cache` the training rows carry the cached teacher
outputs instead of reaching the teacher at all. These methods keep those columns and build / attach the cache.
"""

from __future__ import annotations

import os

from datasets import Dataset

from .cache import TeacherCache, TeacherCacheCollator, TeacherCacheSpec, attach_teacher_cache, build_teacher_cache
from .config import LOSS_WEIGHT_FIELDS
from .preflight import forward_arg_names

__all__ = ["TeacherDataMixin"]


class TeacherDataMixin:
    """Mixed into `DistillationTrainer` before `transformers.Trainer`; needs `self.teacher`, `self.layer_matches`
    and, once built, `self.teacher_cache`."""

    def _attach_teacher_cache(self) -> TeacherCache | None:
        """Build or look up the teacher cache of train_dataset; train from it (see `hf_distill.cache`)."""
        args = self.args
        if not isinstance(self.train_dataset, Dataset):
            raise ValueError(
                f"use_teacher_cache=True needs train_dataset to be a datasets.Dataset, got "
                f"{type(self.train_dataset).__name__}. Pass a datasets.Dataset or set use_teacher_cache=False."
            )
        if not any(getattr(args, name) > 0 for name in LOSS_WEIGHT_FIELDS if name != "task_weight"):
            return None  # nothing of the teacher's is used
        spec = TeacherCacheSpec(
            logits=args.logits_weight > 0,
            top_k=args.teacher_cache_top_k,
            # The sparse form stores log-probabilities at one temperature, checked against the run's at every step.
            top_k_tail=args.teacher_cache_top_k_tail,
            temperature=args.temperature,
            # the hidden-matching pairs' teacher layers, and the relation term's (`hf_distill.relation_term`)
            hidden_layers=[m.teacher_layer for m in self.layer_matches if m.feature == "hidden"]
            + ([self.relation.teacher_layer] if getattr(self, "relation", None) is not None else []),
            attention_layers=[m.teacher_layer for m in self.layer_matches if m.feature == "attention"],
            embeddings=args.embeddings_weight > 0,
            dtype=args.teacher_cache_dtype,
        )
        # The collator gets, at train time, the columns `remove_unused_columns` keeps: the build collates the same,
        # so the cached teacher sees every input the collator makes of them (an attention_mask it adds, ...).
        columns = list(self.train_dataset.column_names)
        if args.remove_unused_columns:
            self._set_signature_columns_if_needed()
            columns = [c for c in columns if c in self._signature_columns]
            self._signature_columns = None  # recomputed with the cache's columns once the cache exists
        with args.main_process_first(desc="teacher cache"):
            cache = build_teacher_cache(
                self.teacher,
                self.train_dataset,
                self.data_collator,
                cache_dir=args.teacher_cache_dir or os.path.join(args.output_dir, "teacher_cache"),
                spec=spec,
                tokenizer=self.processing_class,
                batch_size=args.per_device_eval_batch_size,
                columns=columns,
            )
        # The cache was keyed by this very dataset's contents, so attaching it needs no second hash.
        self.train_dataset = attach_teacher_cache(self.train_dataset, cache, verify=False)
        self.data_collator = TeacherCacheCollator(self.data_collator, cache.layouts, cache.padding_side)
        return cache

    @property
    def teacher_cache_temperature(self) -> float | None:
        """The temperature of the attached cache's top-k + tail log-probabilities (None: no such cache)."""
        cache = getattr(self, "teacher_cache", None)
        spec = cache.components.get("spec", {}) if cache is not None else {}
        return spec.get("temperature") if spec.get("top_k_tail") else None

    def _set_signature_columns_if_needed(self):
        # Keep what either model consumes: `remove_unused_columns` would otherwise drop columns only the teacher
        # reads (e.g. token_type_ids for a BERT teacher of a DistilBERT student), and the teacher cache's columns.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            teacher_columns = forward_arg_names(self.teacher) if hasattr(self, "teacher") else set()
            cache = getattr(self, "teacher_cache", None)
            cache_columns = list(cache.layouts) if cache is not None else []
            self._signature_columns = list(
                dict.fromkeys([*self._signature_columns, *sorted(teacher_columns), *cache_columns])
            )
