"""Build, open and attach a teacher cache (see `hf_distill.cache` for what is stored and how it is keyed)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from torch import nn

from ..features import Features as ModelFeatures
from ..features import forward_with_features
from ..losses.sparse import sparse_teacher_distribution
from .collators import check_rows_in_place, labels_reach_teacher, probe_collator, teacher_view
from .fingerprint import data_digest, resolve_padding_side, teacher_cache_fingerprint, teacher_input_columns
from .formatting import FORMAT_TYPE
from .spec import (
    ARROW_NAME,
    ATTENTION,
    ATTENTION_COLUMN,
    CACHE_FORMAT_VERSION,
    CACHE_PREFIX,
    EMBEDDINGS_COLUMN,
    HIDDEN_COLUMN,
    LABEL_COLUMNS,
    LOGITS_COLUMN,
    METADATA_NAME,
    ROW,
    TOKEN,
    TOPK_INDICES_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    TOPK_TAIL_COLUMN,
    TOPK_VALUES_COLUMN,
    TeacherCache,
    TeacherCacheSpec,
    row_positions,
)

logger = logging.getLogger(__name__)

PROBE_ROWS = 8  # rows collated twice to check that the collator is a pure function of its rows


def _column_features(layouts: dict[str, tuple[str, int]], dtype: str) -> Features:
    def value(name: str) -> Value:
        if name == TOPK_INDICES_COLUMN:
            return Value("int32")
        logit_columns = (LOGITS_COLUMN, TOPK_VALUES_COLUMN, TOPK_LOGPROBS_COLUMN, TOPK_TAIL_COLUMN)
        return Value("float32" if name in logit_columns else dtype)

    return Features({name: List(value(name)) for name in layouts})


def _teacher_inputs(teacher: nn.Module) -> set[str]:
    return set(inspect.signature(teacher.forward).parameters) - {"labels"}


def _rows(data: Dataset, start: int, stop: int) -> list[dict[str, Any]]:
    columns = data[start:stop]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def collated_columns(teacher: nn.Module, dataset: Dataset) -> list[str]:
    """The columns a collator gets by default: the teacher's input columns and the label columns present."""
    inputs = teacher_input_columns(teacher, dataset)
    return inputs + [c for c in dataset.column_names if c in LABEL_COLUMNS]


def build_teacher_cache(
    teacher: nn.Module,
    dataset: Dataset,
    collator,
    *,
    cache_dir: str | os.PathLike,
    spec: TeacherCacheSpec | None = None,
    tokenizer=None,
    max_length: int | None = None,
    batch_size: int = 32,
    padding_side: str | None = None,
    columns: list[str] | None = None,
) -> TeacherCache:
    """Open the teacher cache of `dataset`, building it first if no valid one exists under `cache_dir`.

    The teacher gets exactly what the live path would give it: every key of `collator(rows)` its forward takes
    (labels excluded), including those the collator creates (an `attention_mask` the dataset lacks, `position_ids`,
    ...). Before anything is written, a collator that is not a pure function of its rows (random masking) is refused
    (see `hf_distill.cache.collators`), and every batch is checked to hold each row's tokens where the cache will put
    its outputs back.

    Args:
        teacher: the frozen teacher (any device; it is run in eval mode under `torch.inference_mode()`).
        dataset: the tokenized training set (`input_ids`, ...), in the row order the cache will be used with.
        collator: the collator training uses, e.g. `DataCollatorWithPadding(tokenizer)`; part of the fingerprint.
        cache_dir: parent directory; the cache lives in `<cache_dir>/<fingerprint[:32]>`.
        spec: what to cache (default: logits only).
        tokenizer: the tokenizer that produced `dataset` (part of the fingerprint).
        max_length: the length rows were truncated to; part of the fingerprint, and rows longer than it are refused.
        batch_size: rows per teacher forward pass while building.
        padding_side: where `collator` pads, `"right"` or `"left"` (default: its tokenizer's, else `tokenizer`'s,
            else right); part of the fingerprint.
        columns: the dataset columns the collator receives at train time (`DistillationTrainer` passes those
            `remove_unused_columns` keeps); default: the teacher's input columns and the label columns.

    Returns:
        `TeacherCache` with `built=True` when this call built it.
    """
    spec = spec or TeacherCacheSpec()
    if getattr(getattr(teacher, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"the teacher cache stores the teacher's outputs at the positions of each row's input_ids, but "
            f"{type(teacher).__name__} is an encoder-decoder model (its logits follow the decoder's positions). Set "
            "use_teacher_cache=False."
        )
    default_columns = collated_columns(teacher, dataset)  # refuses untokenized data (no input_ids)
    columns = list(columns) if columns is not None else default_columns
    missing = [c for c in columns if c not in dataset.column_names]
    if missing or "input_ids" not in columns:
        raise ValueError(
            f"columns must be dataset columns and include input_ids, got {columns} (missing: "
            f"{missing or ['input_ids']}; the dataset has {dataset.column_names}). Pass the columns the collator "
            "receives at train time."
        )
    if len(dataset) == 0:
        raise ValueError("cannot build a teacher cache of an empty dataset.")
    padding_side = resolve_padding_side(collator, tokenizer, padding_side)
    fed = dataset.select_columns([c for c in columns if not c.startswith(CACHE_PREFIX)])
    teacher_inputs = _teacher_inputs(teacher)
    probe = _rows(fed, 0, min(PROBE_ROWS, len(fed)))
    reference = probe_collator(collator, probe, teacher_inputs)  # raises for a random collator
    # Labels pass through the collator but are hashed only if the teacher's inputs are made from them.
    reads_labels = labels_reach_teacher(collator, probe, teacher_inputs, reference)
    hashed = [c for c in fed.column_names if reads_labels or c not in LABEL_COLUMNS]
    fingerprint, components = teacher_cache_fingerprint(
        teacher, tokenizer, dataset, spec, max_length, collator=collator, padding_side=padding_side, columns=hashed
    )
    path = os.path.join(os.fspath(cache_dir), fingerprint[:32])
    if os.path.isfile(os.path.join(path, METADATA_NAME)):
        cache = load_teacher_cache(path)
        if cache.fingerprint != fingerprint:  # a 128-bit prefix collision, or a hand-edited cache
            raise ValueError(
                f"the teacher cache at {path} has fingerprint {cache.fingerprint}, expected {fingerprint}. Delete it."
            )
        logger.info(f"Using the teacher cache at {path}")
        return cache

    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{fingerprint[:32]}.tmp-", dir=cache_dir)
    start = time.perf_counter()
    try:
        layouts = _write_teacher_outputs(
            teacher, fed, collator, teacher_inputs, spec, os.path.join(tmp, ARROW_NAME),
            max_length=max_length, batch_size=batch_size, padding_side=padding_side,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        metadata = {
            "fingerprint": fingerprint,
            "components": components,
            "layouts": layouts,
            "teacher": type(teacher).__name__,
            "teacher_name_or_path": getattr(getattr(teacher, "config", None), "_name_or_path", None),
            "build_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        rename_into_place(tmp, path, METADATA_NAME, metadata)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Built the teacher cache at {path} ({len(dataset)} rows, {seconds:.1f}s)")
    cache = load_teacher_cache(path)
    cache.built, cache.build_seconds = True, seconds
    return cache


def rename_into_place(tmp: str, path: str, marker: str, metadata: dict) -> None:
    """Write `metadata` as the JSON file `marker` into the finished directory `tmp`, then rename `tmp` to the
    content-addressed `path`, made readable to other users.

    If another process finished the same entry first (`path` holds its `marker` file), theirs is kept and `tmp` is
    removed: the contents are identical, since the directory name is their fingerprint.
    """
    with open(os.path.join(tmp, marker), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache_dir must stay readable by other users
    try:
        os.rename(tmp, path)
    except OSError:
        if not os.path.isfile(os.path.join(path, marker)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _write_teacher_outputs(
    teacher: nn.Module,
    fed: Dataset,
    collator,
    teacher_inputs: set[str],
    spec: TeacherCacheSpec,
    path: str,
    *,
    max_length: int | None,
    batch_size: int,
    padding_side: str,
) -> dict[str, tuple[str, int]]:
    """Run the teacher over `fed` (the columns the collator receives) batch by batch and write its outputs."""
    device = next(teacher.parameters()).device
    store_dtype = getattr(torch, spec.dtype)
    was_training = teacher.training
    teacher.eval()
    writer, layouts = None, {}
    try:
        for start in range(0, len(fed), batch_size):
            rows = _rows(fed, start, start + batch_size)
            row_ids = [row["input_ids"] for row in rows]  # before collating: a collator may edit its rows
            lengths = [len(ids) for ids in row_ids]
            if max_length is not None and max(lengths) > max_length:
                raise ValueError(
                    f"row {start + int(np.argmax(lengths))} has {max(lengths)} tokens, more than max_length="
                    f"{max_length}. Pass the max_length the data was tokenized with."
                )
            batch = collator(rows)
            check_rows_in_place(batch, row_ids, padding_side, collator)
            # What the live path passes: every collated key the teacher's forward takes, labels excluded.
            inputs = {
                k: v.to(device) if torch.is_tensor(v) else v for k, v in teacher_view(batch, teacher_inputs).items()
            }
            with torch.inference_mode():
                features = forward_with_features(
                    teacher,
                    inputs,
                    hidden_layers=spec.hidden_layers,
                    attention_layers=spec.attention_layers,
                    embeddings=spec.embeddings,
                )
            padded = batch["input_ids"].shape[1]
            columns, batch_layouts = _rows_of(features, spec, lengths, padded, padding_side, store_dtype)
            if writer is None:
                layouts = batch_layouts
                writer = ArrowWriter(features=_column_features(layouts, spec.dtype), path=path)
            writer.write_batch(columns)
        writer.finalize()
    finally:
        if writer is not None:
            writer.close()
        teacher.train(was_training)
    return layouts


def _rows_of(
    features: ModelFeatures,
    spec: TeacherCacheSpec,
    lengths: list[int],
    padded: int,
    padding_side: str,
    store_dtype: torch.dtype,
) -> tuple[dict[str, list[np.ndarray]], dict[str, tuple[str, int]]]:
    """Split one batch of teacher features into unpadded, flattened per-row arrays, and say how to reshape them."""
    columns: dict[str, list[np.ndarray]] = {}
    layouts: dict[str, tuple[str, int]] = {}
    spans = [row_positions(n, padded, padding_side) for n in lengths]

    def add(name: str, layout: str, width: int, per_row: list[torch.Tensor]) -> None:
        layouts[name] = (layout, width)
        columns[name] = [t.reshape(-1).cpu().numpy() for t in per_row]

    def stored(name: str, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(store_dtype)
        if not torch.isfinite(out).all() and torch.isfinite(tensor).all():
            raise ValueError(
                f"{name} overflows {spec.dtype} (largest magnitude {tensor.abs().max().item():.3g}). Cache it in "
                "float32: set teacher_cache_dtype='float32' (TeacherCacheSpec(dtype='float32'))."
            )
        return out

    if spec.logits:
        logits = features.outputs.logits.float()
        token_level = logits.dim() == 3
        if token_level and logits.shape[1] != padded:
            raise ValueError(
                f"the teacher's logits have {logits.shape[1]} positions for input_ids of {padded}: the cache stores "
                "outputs at the input positions and cannot hold these. Set use_teacher_cache=False."
            )
        per_row = [logits[b, s] if token_level else logits[b] for b, s in enumerate(spans)]
        num_classes = logits.shape[-1]
        if spec.top_k is not None and spec.top_k < num_classes and spec.top_k_tail:
            layout = TOKEN if token_level else ROW
            sparse = [sparse_teacher_distribution(row, spec.top_k, temperature=spec.temperature) for row in per_row]
            add(TOPK_INDICES_COLUMN, layout, spec.top_k, [ids for ids, _, _ in sparse])
            add(TOPK_LOGPROBS_COLUMN, layout, spec.top_k, [logprobs for _, logprobs, _ in sparse])
            add(TOPK_TAIL_COLUMN, layout, 1, [tail for _, _, tail in sparse])
        elif spec.top_k is not None and spec.top_k < num_classes:
            top = [row.topk(spec.top_k, dim=-1) for row in per_row]
            add(TOPK_VALUES_COLUMN, TOKEN if token_level else ROW, spec.top_k, [t.values for t in top])
            add(TOPK_INDICES_COLUMN, TOKEN if token_level else ROW, spec.top_k, [t.indices.int() for t in top])
        else:
            add(LOGITS_COLUMN, TOKEN if token_level else ROW, num_classes, per_row)
    if spec.embeddings:
        embeddings = stored(EMBEDDINGS_COLUMN, features.embeddings)
        add(EMBEDDINGS_COLUMN, TOKEN, embeddings.shape[-1], [embeddings[b, s] for b, s in enumerate(spans)])
    for i in spec.hidden_layers:
        hidden = stored(HIDDEN_COLUMN.format(i), features.hidden_states[i])
        add(HIDDEN_COLUMN.format(i), TOKEN, hidden.shape[-1], [hidden[b, s] for b, s in enumerate(spans)])
    for i in spec.attention_layers:
        maps = stored(ATTENTION_COLUMN.format(i), features.attentions[i])
        add(ATTENTION_COLUMN.format(i), ATTENTION, maps.shape[1], [maps[b, :, s, s] for b, s in enumerate(spans)])
    return columns, layouts


def load_teacher_cache(path: str | os.PathLike) -> TeacherCache:
    """Open a cache directory written by `build_teacher_cache` (memory-mapped; nothing is read into memory)."""
    path = os.fspath(path)
    metadata_path = os.path.join(path, METADATA_NAME)
    if not os.path.isfile(metadata_path):
        raise FileNotFoundError(f"{path} is not a teacher cache: it has no {METADATA_NAME}.")
    with open(metadata_path, encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata["components"].get("format") != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"the teacher cache at {path} has format {metadata['components'].get('format')}, this hf_distill reads "
            f"format {CACHE_FORMAT_VERSION}. Delete it; it is rebuilt on the next run."
        )
    dataset = Dataset.from_file(os.path.join(path, ARROW_NAME))
    if len(dataset) != metadata["components"]["num_rows"]:
        raise ValueError(
            f"the teacher cache at {path} has {len(dataset)} rows but was built for "
            f"{metadata['components']['num_rows']}: it is damaged. Delete it; it is rebuilt on the next run."
        )
    return TeacherCache(
        path=path,
        fingerprint=metadata["fingerprint"],
        dataset=dataset,
        layouts={k: tuple(v) for k, v in metadata["layouts"].items()},
        components=metadata["components"],
        input_columns=list(metadata["components"]["data_columns"]),
        padding_side=metadata["components"]["padding_side"],
        build_seconds=metadata.get("build_seconds", 0.0),
    )


def attach_teacher_cache(dataset: Dataset, cache: TeacherCache, verify: bool = True) -> Dataset:
    """`dataset` with the cache's columns added, row by row; the cache columns are formatted as torch tensors.

    The formatting is `datasets`' torch formatting, read a batch at a time (`hf_distill.cache.formatting`, format type
    `"hf_distill_torch"`): the same tensors, converted once per column instead of once per row.

    Args:
        dataset: the dataset the cache was built for.
        cache: from `build_teacher_cache` / `load_teacher_cache`.
        verify: re-hash the dataset's hashed columns (`cache.input_columns`) and refuse a cache built for other
            data. Skip only when the cache was just built or looked up for this very dataset object.
    """
    if len(dataset) != len(cache.dataset):
        raise ValueError(
            f"the teacher cache at {cache.path} has {len(cache.dataset)} rows but the dataset has {len(dataset)}: it "
            "was built for another dataset. Build one for this dataset with build_teacher_cache."
        )
    missing = [c for c in cache.input_columns if c not in dataset.column_names]
    if missing or (verify and data_digest(dataset, cache.input_columns) != cache.components["data"]):
        raise ValueError(
            f"the teacher cache at {cache.path} was built for another dataset: the contents of "
            f"{cache.input_columns} differ{f' ({missing} are missing)' if missing else ''}. Build one for this "
            "dataset with build_teacher_cache."
        )
    clash = [c for c in cache.dataset.column_names if c in dataset.column_names]
    if clash:
        raise ValueError(f"the dataset already has teacher cache columns {clash}; attach a cache once.")
    data_format = dataset.format
    if data_format["type"] not in (None, "torch", FORMAT_TYPE):
        raise ValueError(
            f"the dataset is formatted as {data_format['type']!r}; the teacher cache needs python or torch "
            "formatting. Call dataset.reset_format() first."
        )
    if dataset._indices is not None:  # column-wise concatenation needs both sides in physical row order
        dataset = dataset.flatten_indices()
    combined = concatenate_datasets([dataset.with_format(None), cache.dataset.with_format(None)], axis=1)
    if data_format["type"] in ("torch", FORMAT_TYPE) and data_format["columns"] is None:
        return combined.with_format(FORMAT_TYPE)
    return combined.with_format(FORMAT_TYPE, columns=list(cache.layouts), output_all_columns=True)
