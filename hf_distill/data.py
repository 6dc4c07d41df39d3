"""Data: load a task's splits (Hub or local files), check their columns and labels, tokenize once for both models.

How the label column is read (integer ids, class names, floats for regression, json lists for multi-label) and checked
is described in `hf_distill.labels`.
"""

from __future__ import annotations

import os

from datasets import ClassLabel, DatasetDict, List, Value, load_dataset

from .config import DataArguments
from .labels import LabelInfo, apply_label_info, encode_labels, label_info, list_item_feature, num_labels_of

__all__ = [
    "LabelInfo",
    "apply_label_info",
    "encode_labels",
    "label_info",
    "load_task_dataset",
    "num_labels_of",
    "tokenize_dataset",
]

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


# ---------------------------------------------------------------------- loading
def _local_builder(path: str, field: str) -> tuple[str, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}={path!r} does not exist. Pass a local .csv/.tsv/.json/.jsonl file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise ValueError(f"{field}={path!r} has extension {ext!r}; supported: {sorted(LOCAL_FORMATS)}.")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for _, line in zip(range(2), (line for line in f if line.strip()))]
    header = 1 if LOCAL_FORMATS[ext] == "csv" else 0
    if len(lines) <= header:
        raise ValueError(
            f"{field}={path!r} has no data rows{' below its header' if header and lines else ''}. "
            "Pass a file with at least one labelled row."
        )
    # quoting=3 (csv.QUOTE_NONE): GLUE's TSVs contain bare quote characters that must stay part of the text.
    kwargs = {"delimiter": "\t", "quoting": 3} if ext == ".tsv" else {}
    return LOCAL_FORMATS[ext], kwargs


def load_task_dataset(data_args: DataArguments, seed: int = 42) -> DatasetDict:
    """Load `{"train", "eval"}` splits from local files or a Hub dataset, check columns and labels, subsample.

    Labels are checked and encoded as `hf_distill.labels` says (see [`encode_labels`]); the label mapping is
    decided on the whole train split, before `max_train_samples` takes its subset.
    """
    sources = {}
    if data_args.train_file or data_args.validation_file:
        splits = {}
        for split, path, field in (
            ("train", data_args.train_file, "train_file"),
            ("eval", data_args.validation_file, "validation_file"),
        ):
            if path:
                builder, kwargs = _local_builder(path, field)
                splits[split] = load_dataset(builder, data_files={split: path}, split=split, **kwargs)
                sources[split] = field
        ds = DatasetDict(splits)
    elif data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config)
        ds = DatasetDict()
        for split, name, field in (
            ("train", data_args.train_split, "train_split"),
            ("eval", data_args.eval_split, "eval_split"),
        ):
            if name not in raw:
                raise ValueError(f"{field}={name!r} is not a split of {data_args.dataset_name}; it has {list(raw)}.")
            ds[split] = raw[name]
            sources[split] = f"{field}={name!r}"
    else:
        raise ValueError("no data: set dataset_name (a Hub dataset) or train_file / validation_file (local files).")

    for split, d in ds.items():
        if len(d) == 0:
            raise ValueError(f"the {split} split ({sources[split]}) has no rows. Pass data with at least one row.")
        for field in ("text_column", "label_column", "text_pair_column"):
            column = getattr(data_args, field)
            if column is not None and column not in d.column_names:
                raise ValueError(
                    f"{field}={column!r} is not a column of the {split} split; its columns are {d.column_names}. "
                    f"Set {field} to one of them."
                )
    ds = encode_labels(ds, data_args.label_column, data_args.problem_type, sources=sources)
    if data_args.max_train_samples is not None and "train" in ds:
        n = min(data_args.max_train_samples, len(ds["train"]))
        ds["train"] = ds["train"].shuffle(seed=seed).select(range(n))
    if data_args.max_eval_samples is not None and "eval" in ds:
        ds["eval"] = ds["eval"].select(range(min(data_args.max_eval_samples, len(ds["eval"]))))
    return ds


# ---------------------------------------------------------------------- tokenization
def tokenize_dataset(ds: DatasetDict, tokenizer, data_args: DataArguments) -> DatasetDict:
    """Tokenize once (truncate to `max_length`, pad later in the collator); the result feeds teacher and student.

    The label column becomes `labels`: integer ids (`ClassLabel` kept, so the names travel along), float32 for
    regression, float32 multi-hot vectors for multi-label data (lists of class ids are expanded to multi-hot).
    """
    text, pair, label = data_args.text_column, data_args.text_pair_column, data_args.label_column

    def encode(batch, multi_hot_width: int | None):
        args = (batch[text], batch[pair]) if pair else (batch[text],)
        out = tokenizer(*args, truncation=True, max_length=data_args.max_length)
        labels = batch[label]
        if multi_hot_width is not None:
            labels = [[1.0 if k in set(row) else 0.0 for k in range(multi_hot_width)] for row in labels]
        out["labels"] = labels
        return out

    out = {}
    for split, d in ds.items():
        feature = d.features[label]
        width = list_item_feature(feature).num_classes if isinstance(list_item_feature(feature), ClassLabel) else None
        tokenized = d.map(
            encode,
            batched=True,
            remove_columns=d.column_names,
            fn_kwargs={"multi_hot_width": width},
            desc=f"Tokenizing {split}",
        )
        if width is not None or list_item_feature(feature) is not None:
            tokenized = tokenized.cast_column("labels", List(Value("float32")))
        elif isinstance(feature, ClassLabel) or (isinstance(feature, Value) and "float" in feature.dtype):
            # Keep the class names (ClassLabel) and float32 (Arrow would infer float64 from Python floats).
            tokenized = tokenized.cast_column("labels", feature)
        out[split] = tokenized
    return DatasetDict(out)
