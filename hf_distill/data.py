"""Data: load a task's splits (Hub or local files), check their columns, tokenize once for teacher and student."""

from __future__ import annotations

import os

from datasets import DatasetDict, load_dataset

from .config import DataArguments

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


def _local_builder(path: str, field: str) -> tuple[str, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}={path!r} does not exist. Pass a local .csv/.tsv/.json/.jsonl file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise ValueError(f"{field}={path!r} has extension {ext!r}; supported: {sorted(LOCAL_FORMATS)}.")
    # quoting=3 (csv.QUOTE_NONE): GLUE's TSVs contain bare quote characters that must stay part of the text.
    kwargs = {"delimiter": "\t", "quoting": 3} if ext == ".tsv" else {}
    return LOCAL_FORMATS[ext], kwargs


def load_task_dataset(data_args: DataArguments, seed: int = 42) -> DatasetDict:
    """Load `{"train", "eval"}` splits from local files or a Hub dataset, check columns and subsample."""
    if data_args.train_file or data_args.validation_file:
        splits = {}
        builder, kwargs = None, {}
        for split, path, field in (
            ("train", data_args.train_file, "train_file"),
            ("eval", data_args.validation_file, "validation_file"),
        ):
            if path:
                builder, kwargs = _local_builder(path, field)
                splits[split] = load_dataset(builder, data_files={split: path}, split=split, **kwargs)
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
    else:
        raise ValueError("no data: set dataset_name (a Hub dataset) or train_file / validation_file (local files).")

    for split, d in ds.items():
        for field in ("text_column", "label_column", "text_pair_column"):
            column = getattr(data_args, field)
            if column is not None and column not in d.column_names:
                raise ValueError(
                    f"{field}={column!r} is not a column of the {split} split; its columns are {d.column_names}. "
                    f"Set {field} to one of them."
                )
    if data_args.max_train_samples is not None and "train" in ds:
        n = min(data_args.max_train_samples, len(ds["train"]))
        ds["train"] = ds["train"].shuffle(seed=seed).select(range(n))
    if data_args.max_eval_samples is not None and "eval" in ds:
        ds["eval"] = ds["eval"].select(range(min(data_args.max_eval_samples, len(ds["eval"]))))
    return ds


def tokenize_dataset(ds: DatasetDict, tokenizer, data_args: DataArguments) -> DatasetDict:
    """Tokenize once (truncate to `max_length`, pad later in the collator); the result feeds teacher and student."""
    text, pair, label = data_args.text_column, data_args.text_pair_column, data_args.label_column

    def encode(batch):
        args = (batch[text], batch[pair]) if pair else (batch[text],)
        out = tokenizer(*args, truncation=True, max_length=data_args.max_length)
        out["labels"] = batch[label]
        return out

    return DatasetDict(
        {
            split: d.map(encode, batched=True, remove_columns=d.column_names, desc=f"Tokenizing {split}")
            for split, d in ds.items()
        }
    )


def num_labels_of(ds: DatasetDict, label_column: str = "labels") -> int:
    """Number of classes: max label + 1 over the splits (labels are 0..K-1)."""
    return max(int(max(d[label_column])) for d in ds.values()) + 1
