"""Data: load a task's splits (Hub or local files), check their columns and labels, tokenize once for both models.

How the label column is read (integer ids, class names, floats for regression, json lists for multi-label) and checked
is described in `hf_distill.labels`.
"""

from __future__ import annotations

import logging
import math
import os

from datasets import ClassLabel, Dataset, DatasetDict, List, Value, concatenate_datasets, load_dataset

from .arguments import DataArguments
from .labels import LabelInfo, apply_label_info, encode_labels, label_info, list_item_feature, num_labels_of
from .transfer import augment_p, transfer_source

__all__ = [
    "UNLABELLED_COLUMN",
    "LabelInfo",
    "apply_label_info",
    "check_transfer_weights",
    "encode_labels",
    "label_info",
    "labelled_rows",
    "load_task_dataset",
    "num_labels_of",
    "row_counts",
    "tokenize_dataset",
]

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
# A transfer set may also be plain text, one example a line.
UNLABELLED_FORMATS = {**LOCAL_FORMATS, ".txt": "text"}
# Bool column of the train split after `load_task_dataset`: True for transfer-set rows (no label). `tokenize_dataset`
# turns it into labels of -100 (integer ids) or NaN (float labels), which the task loss and its window count skip.
UNLABELLED_COLUMN = "unlabelled"


# ---------------------------------------------------------------------- loading
def _local_builder(path: str, field: str, formats: dict[str, str] = LOCAL_FORMATS) -> tuple[str, dict]:
    kinds = "/".join(sorted(formats))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}={path!r} does not exist. Pass a local {kinds} file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in formats:
        raise ValueError(f"{field}={path!r} has extension {ext!r}; supported: {sorted(formats)}.")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for _, line in zip(range(2), (line for line in f if line.strip()))]
    header = 1 if formats[ext] == "csv" else 0
    if len(lines) <= header:
        raise ValueError(
            f"{field}={path!r} has no data rows{' below its header' if header and lines else ''}. "
            f"Pass a file with at least one {'labelled ' if formats is LOCAL_FORMATS else ''}row."
        )
    # quoting=3 (csv.QUOTE_NONE): GLUE's TSVs contain bare quote characters that must stay part of the text.
    kwargs = {"delimiter": "\t", "quoting": 3} if ext == ".tsv" else {}
    return formats[ext], kwargs


def load_task_dataset(data_args: DataArguments, seed: int = 42) -> DatasetDict:
    """Load `{"train", "eval"}` splits from local files or a Hub dataset, check columns and labels, subsample.

    Labels are checked and encoded as `hf_distill.labels` says (see [`encode_labels`]); the label mapping is
    decided on the whole train split, before `max_train_samples` takes its subset.

    With a transfer set (`unlabelled_file`, `unlabelled_split` or `unlabelled_from_train`, see [`DataArguments`]) its
    rows are appended to the train split after the labelled rows, in a seeded order, flagged in the bool column
    `UNLABELLED_COLUMN` (their label column holds a placeholder: -1, NaN or an empty list, never used). Transfer rows
    whose text equals an eval text are dropped (and counted in a warning), so the eval split stays unseen.
    """
    raw = None
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
        if data_args.unlabelled_split is not None and data_args.unlabelled_split not in raw:
            raise ValueError(
                f"unlabelled_split={data_args.unlabelled_split!r} is not a split of {data_args.dataset_name}; it has "
                f"{list(raw)}."
            )
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
    unlabelled = None
    if data_args.max_train_samples is not None and "train" in ds:
        n = min(data_args.max_train_samples, len(ds["train"]))
        shuffled = ds["train"].shuffle(seed=seed)
        ds["train"] = shuffled.select(range(n))
        if data_args.unlabelled_from_train:
            # The same seeded permutation: its first n rows are labelled, the rest can only be disjoint from them.
            unlabelled = shuffled.select(range(n, len(shuffled)))
    if data_args.max_eval_samples is not None and "eval" in ds:
        ds["eval"] = ds["eval"].select(range(min(data_args.max_eval_samples, len(ds["eval"]))))
    if data_args.unlabelled_source is not None:
        if "train" not in ds:
            raise ValueError(
                f"{data_args.unlabelled_source} adds unlabelled rows to a train split, but there is none. Set "
                "train_file or dataset_name."
            )
        if data_args.unlabelled_file:
            builder, kwargs = _local_builder(data_args.unlabelled_file, "unlabelled_file", UNLABELLED_FORMATS)
            unlabelled = load_dataset(
                builder, data_files={"train": data_args.unlabelled_file}, split="train", **kwargs
            )
            if builder == "text" and data_args.text_column != "text":
                unlabelled = unlabelled.rename_column("text", data_args.text_column)
        elif data_args.unlabelled_split:
            unlabelled = raw[data_args.unlabelled_split]  # checked to exist above
        ds["train"] = _append_unlabelled(ds, unlabelled, data_args, seed)
    if data_args.augment_method is not None:
        if "train" not in ds:
            raise ValueError(
                f"augment_method={data_args.augment_method!r} augments the labelled training rows, but there is no "
                "train split. Set train_file or dataset_name."
            )
        ds["train"] = _append_unlabelled(
            ds, augmented_rows(labelled_rows(ds["train"]), data_args, seed), data_args, seed, source="augment_method"
        )
    return ds


def augmented_rows(labelled: Dataset, data_args: DataArguments, seed: int) -> Dataset:
    """`augment_n_per_row` augmented texts per labelled row (`hf_distill.augment.augment_dataset`, seeded by `seed`),
    stored in `augment_cache_dir` when set. With `augment_method='mlm'` the masked-LM is loaded from
    `augment_mlm_model_name_or_path`, and refused when its masked-LM head would be freshly initialised."""
    from .augment import augment_dataset

    mlm_model = mlm_tokenizer = None
    if data_args.augment_method == "mlm":
        mlm_model, mlm_tokenizer = load_masked_lm(data_args.augment_mlm_model_name_or_path)
    augmented = augment_dataset(
        labelled.select_columns([data_args.text_column]),
        data_args.text_column,
        method=data_args.augment_method,
        n_per_row=data_args.augment_n_per_row,
        seed=seed,
        cache_dir=data_args.augment_cache_dir,
        p=augment_p(data_args),
        mlm_model=mlm_model,
        mlm_tokenizer=mlm_tokenizer,
        top_k=data_args.augment_top_k,
    )
    return augmented.select_columns([data_args.text_column])


def load_masked_lm(path: str):
    """A masked-LM and its tokenizer from `path`, refused when the checkpoint holds no masked-LM head (a sentence
    encoder such as all-MiniLM-L6-v2: `from_pretrained` would initialise the head at random, and its word
    candidates would be noise)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    head = model.get_output_embeddings()
    head_names = {name for name, p in model.named_parameters() if any(p is q for q in head.parameters())}
    missing = sorted(k for k in info["missing_keys"] if k in head_names or "lm_head" in k or k.startswith("cls."))
    if missing:
        raise ValueError(
            f"augment_mlm_model_name_or_path={path!r} has no trained masked-LM head (missing from the checkpoint: "
            f"{', '.join(missing[:4])}): its word candidates would be random. Use a checkpoint with its MLM head "
            "(e.g. bert-base-uncased), or augment_method='eda'."
        )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _texts(d: Dataset, data_args: DataArguments) -> list[tuple]:
    columns = [d[c] for c in (data_args.text_column, data_args.text_pair_column) if c is not None]
    return [tuple(str(v).strip() for v in row) for row in zip(*columns)]


def _placeholder_label(feature, width: int):
    """A label value of `feature`'s type standing for "no label" (never read: the flag column decides)."""
    if isinstance(feature, Value) and "float" in feature.dtype:
        return math.nan
    if list_item_feature(feature) is not None:
        return [] if isinstance(list_item_feature(feature), ClassLabel) else [math.nan] * width
    return -1  # integer ids and ClassLabel (-1 is datasets' "no label")


def _append_unlabelled(
    ds: DatasetDict, unlabelled: Dataset, data_args: DataArguments, seed: int, source: str | None = None
) -> Dataset:
    """`ds["train"]` followed by the rows of `unlabelled` that are neither empty nor a copy of an eval text, in a
    seeded order, at most `max_unlabelled_samples` (`max_augmented_samples` for `source="augment_method"`) of them,
    flagged in `UNLABELLED_COLUMN`; rows already appended keep their flag."""
    source = source or data_args.unlabelled_source
    limit = data_args.max_augmented_samples if source == "augment_method" else data_args.max_unlabelled_samples
    train = ds["train"]
    flagged = UNLABELLED_COLUMN in train.column_names
    for column in (data_args.text_column, data_args.text_pair_column):
        if column is not None and column not in unlabelled.column_names:
            raise ValueError(
                f"the unlabelled rows ({source}) have no column {column!r} (the text column); their columns are "
                f"{unlabelled.column_names}. Rename the column, or set text_column to match."
            )
    # Drop exact copies of eval texts: training the student on the teacher's view of an eval sentence would leak it.
    eval_texts = set(_texts(ds["eval"], data_args)) if "eval" in ds else set()
    candidates = _texts(unlabelled, data_args)
    empty = sum(not any(t) for t in candidates)
    keep = [i for i, t in enumerate(candidates) if any(t) and t not in eval_texts]
    in_eval = len(candidates) - empty - len(keep)
    if in_eval or empty:
        logger.warning(
            "%s: dropped %d of %d unlabelled rows that repeat an eval text exactly (surrounding whitespace aside) and "
            "%d empty rows.",
            source,
            in_eval,
            len(candidates),
            empty,
        )
    if not keep:
        raise ValueError(
            f"{source} gives no unlabelled rows once copies of eval texts ({in_eval}) and empty texts ({empty}) are "
            "dropped. Pass texts that are not in the eval split."
        )
    unlabelled = unlabelled.select(keep).shuffle(seed=seed)
    if limit is not None:
        unlabelled = unlabelled.select(range(min(limit, len(unlabelled))))
    label = data_args.label_column
    width = len(train[0][label]) if list_item_feature(train.features[label]) is not None else 0
    n = len(unlabelled)
    rows = {c: [None] * n for c in train.column_names if c != UNLABELLED_COLUMN}
    for column in (data_args.text_column, data_args.text_pair_column):
        if column is not None:
            rows[column] = [str(v) for v in unlabelled[column]]
    rows[label] = [_placeholder_label(train.features[label], width)] * n
    rows[UNLABELLED_COLUMN] = [True] * n
    features = train.features.copy()
    features[UNLABELLED_COLUMN] = Value("bool")
    extra = Dataset.from_dict(rows, features=features)
    before = train if flagged else train.add_column(UNLABELLED_COLUMN, [False] * len(train), feature=Value("bool"))
    logger.info("train rows: %d + %d unlabelled (%s)", len(train), n, source)
    return concatenate_datasets([before, extra])


TEACHER_WEIGHTS = ("logits_weight", "hidden_weight", "embeddings_weight", "attention_weight")


def check_transfer_weights(data_args: DataArguments, args) -> None:
    """Refuse a transfer set when only the task loss is on: its unlabelled rows would contribute nothing.

    Args:
        data_args: the data settings (the transfer set's source): a `DataArguments` or a `BenchmarkConfig`.
        args: a `DistillationConfig` (or anything with its `*_weight` fields).
    """
    source = transfer_source(data_args)
    if source is None or any(getattr(args, name, 0) > 0 for name in TEACHER_WEIGHTS):
        return
    raise ValueError(
        f"{source}={getattr(data_args, source)!r} adds unlabelled rows, but every teacher term is off "
        f"({', '.join(f'{n}={getattr(args, n, 0)}' for n in TEACHER_WEIGHTS)}): only the task loss would train, and "
        "it skips unlabelled rows. Set e.g. logits_weight=0.5, or drop the unlabelled source."
    )


def _is_unlabelled(label) -> bool:
    if isinstance(label, list):
        return bool(label) and all(isinstance(v, float) and math.isnan(v) for v in label)
    return label == -100 or (isinstance(label, float) and math.isnan(label))


def row_counts(train: Dataset) -> dict[str, int]:
    """`{"labelled": ..., "unlabelled": ...}` rows of a train split from [`load_task_dataset`] (the flag column) or
    [`tokenize_dataset`] (labels of -100 or NaN)."""
    if UNLABELLED_COLUMN in train.column_names:
        unlabelled = int(sum(train[UNLABELLED_COLUMN]))
    elif "labels" in train.column_names:
        unlabelled = sum(_is_unlabelled(v) for v in train["labels"])
    else:
        unlabelled = 0
    return {"labelled": len(train) - unlabelled, "unlabelled": unlabelled}


def labelled_rows(train: Dataset) -> Dataset:
    """The labelled rows of a train split, raw or tokenized (all of them without a transfer set), e.g. for the no-KD
    baseline, which cannot learn from unlabelled rows."""
    n = row_counts(train)["labelled"]
    # `load_task_dataset` puts the labelled rows first.
    kept = train if n == len(train) else train.select(range(n))
    return kept.remove_columns(UNLABELLED_COLUMN) if UNLABELLED_COLUMN in kept.column_names else kept


# ---------------------------------------------------------------------- tokenization
def tokenize_dataset(ds: DatasetDict, tokenizer, data_args: DataArguments) -> DatasetDict:
    """Tokenize once (truncate to `max_length`, pad later in the collator); the result feeds teacher and student.

    The label column becomes `labels`: integer ids (`ClassLabel` kept, so the names travel along), float32 for
    regression, float32 multi-hot vectors for multi-label data (lists of class ids are expanded to multi-hot).
    Transfer-set rows (`UNLABELLED_COLUMN`) get `-100` (integer ids) or NaN (every float entry): the task loss and
    its gradient-accumulation count skip both, the teacher terms use the rows like any other.
    """
    text, pair, label = data_args.text_column, data_args.text_pair_column, data_args.label_column

    def encode(batch, multi_hot_width: int | None, float_labels: bool):
        args = (batch[text], batch[pair]) if pair else (batch[text],)
        out = tokenizer(*args, truncation=True, max_length=data_args.max_length)
        labels = batch[label]
        if multi_hot_width is not None:
            labels = [[1.0 if k in set(row) else 0.0 for k in range(multi_hot_width)] for row in labels]
        if UNLABELLED_COLUMN in batch:
            width = multi_hot_width or (len(labels[0]) if isinstance(labels[0], list) else None)
            missing = -100 if not float_labels else (math.nan if width is None else [math.nan] * width)
            labels = [missing if flag else value for value, flag in zip(labels, batch[UNLABELLED_COLUMN])]
        out["labels"] = labels
        return out

    out = {}
    for split, d in ds.items():
        feature = d.features[label]
        width = list_item_feature(feature).num_classes if isinstance(list_item_feature(feature), ClassLabel) else None
        float_labels = list_item_feature(feature) is not None or (
            isinstance(feature, Value) and "float" in feature.dtype
        )
        tokenized = d.map(
            encode,
            batched=True,
            remove_columns=d.column_names,
            fn_kwargs={"multi_hot_width": width, "float_labels": float_labels},
            desc=f"Tokenizing {split}",
        )
        if width is not None or list_item_feature(feature) is not None:
            tokenized = tokenized.cast_column("labels", List(Value("float32")))
        elif isinstance(feature, ClassLabel) and UNLABELLED_COLUMN in d.column_names:
            # -100 is no class id of a ClassLabel: keep plain int64 labels (the names stay in the raw splits).
            tokenized = tokenized.cast_column("labels", Value("int64"))
        elif isinstance(feature, ClassLabel) or (isinstance(feature, Value) and "float" in feature.dtype):
            # Keep the class names (ClassLabel) and float32 (Arrow would infer float64 from Python floats).
            tokenized = tokenized.cast_column("labels", feature)
        out[split] = tokenized
    return DatasetDict(out)
