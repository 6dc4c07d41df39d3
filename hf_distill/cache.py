"""Teacher-output cache: run the frozen teacher over the training set once, store what the losses need, reuse it.

The teacher is frozen, so its outputs on a fixed training set never change: recomputing them every epoch (and every
run of a sweep) is wasted work, often more than the student's whole training step. `build_teacher_cache` runs the
teacher once over a tokenized `datasets.Dataset` and writes, per row, the logits (or only their top-k for large
vocabularies), the hidden states of the matched teacher layers, optionally the embeddings and the attention maps of
the matched layers, to one Arrow file. `DistillationTrainer` does this by itself with `use_teacher_cache=True` and
then trains without a single teacher forward pass.

A cache is keyed by a fingerprint of everything its contents depend on (`teacher_cache_fingerprint`):

- the teacher's weights: a SHA-256 of every state-dict tensor's name, dtype, shape and raw bytes (exact, so any
  change to any weight changes the key; 0.09 s for MiniLM-L6's 23M parameters on this CPU),
- the teacher's class and config (minus its local path and other `_`-prefixed bookkeeping) and the transformers
  version (modeling code changes between versions),
- the tokenizer: its class, its full backend definition (normalizer, pre-tokenizer, vocabulary, post-processor) or
  its sorted vocabulary, and its settings other than file locations,
- the data: a SHA-256 of the contents, in order, of every column the teacher reads (`input_ids`, `attention_mask`,
  `token_type_ids`, ...). The teacher's outputs are a function of exactly these columns, so this is stable across
  runs (unlike `Dataset._fingerprint`, which is random after a `map` of an unhashable function) and a cache is never
  used for a dataset whose teacher inputs differ in any row, in the row order, or in the number of rows,
- the maximum length the rows were tokenized to (when given), and what is cached (`TeacherCacheSpec`: logits, top-k,
  layers, embeddings, attention maps, storage dtype) plus the storage format version.

Storage: `<cache_dir>/<fingerprint[:32]>/teacher_outputs.arrow` (a `datasets` Arrow file, memory-mapped when read, one
row per dataset row, in dataset order) and `teacher_cache.json` (the fingerprint, its components, the layout of each
column). A cache is written into a temporary directory beside the final one and renamed into place only when
complete, so a crash or a concurrent builder never leaves a half-written cache where a reader would find it (a
killed build can leave a hidden `.<fingerprint>.tmp-*` directory behind; nothing reads it, delete it at will).

Each row stores its unpadded tensors (L = the row's own length) flattened to 1-D lists, which read several times
faster than nested lists (a batch of 32 hidden states: 1.3 ms against 9.9 ms); the layout recorded per column
reshapes them, and `TeacherCacheCollator` pads them to the batch with zeros, which every loss masks:

| column                                | one row holds                                          | stored as       |
|---------------------------------------|--------------------------------------------------------|-----------------|
| `teacher_cache_logits`                | `(C,)` (sequence classification) or `(L, V)` (tokens)  | float32         |
| `teacher_cache_topk_values / indices` | `(k,)` or `(L, k)`: the k largest logits and their ids | float32 / int32 |
| `teacher_cache_hidden_<i>`            | `(L, H)`: output of teacher block i                    | `dtype`         |
| `teacher_cache_embeddings`            | `(L, H)`: input of the first block                     | `dtype`         |
| `teacher_cache_attention_<i>`         | `(heads, L, L)`: attention probabilities of block i    | `dtype`         |

Each row holds what the teacher computed for it inside its build batch. For models whose outputs at real tokens do
not depend on the padding (right padding, the usual case) that equals any live run up to float rounding; with left
padding and absolute positions counted from the first slot (BERT), outputs depend on the batch, cached or live.

Top-k logits: for a vocabulary of V entries the full logits cost `4·L·V` bytes per row (6.4 MB for 32k x 50 tokens),
so `top_k` keeps the k largest. The logit loss then compares the student with the teacher's distribution
*renormalised over its top-k support*: `densify_top_k` scatters the k logits into a row of `-inf`, so
`softmax(z / T)` is the teacher's top-k distribution renormalised at whatever temperature T the run uses (a tail
bucket would fix T when the cache is built), and the existing losses apply unchanged: forward KL becomes
`T² · Σ_{c ∈ top-k} p̃_T(c) (log p̃_T(c) − log p_S(c))` with the student's full softmax, which is exactly the full KL
when the teacher puts no mass outside its top-k, and pushes the student's mass into the teacher's support otherwise.
JSD is also defined on such a support; reverse KL (infinite outside the support) and MSE (on `-inf`) are not, and
`DistillationConfig` refuses them with top-k.

Attention maps are not cached unless asked for: they cost `heads·L²` values per matched layer per row against `L·H`
for a hidden state, quadratic in the length: for MiniLM (12 heads, H = 384) as much as a hidden state at L = 32,
twice as much at L = 64 (96 KiB per layer per row in float16), 16 times at L = 512 (6 MiB per layer per row). With
`attention_weight > 0` and the cache on, `DistillationConfig` asks for `teacher_cache_attentions=True` (or
`attention_weight=0`) rather than silently running the teacher anyway, which would keep the full cost of a teacher
forward pass and defeat the cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset, Features, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from torch import nn

from .features import Features as ModelFeatures
from .features import forward_with_features

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_DTYPES = ("float16", "float32")
METADATA_NAME = "teacher_cache.json"
ARROW_NAME = "teacher_outputs.arrow"

# Column names. The prefix keeps them apart from any data column and tells `TeacherCacheCollator` what to pad.
CACHE_PREFIX = "teacher_cache_"
LOGITS_COLUMN = CACHE_PREFIX + "logits"
TOPK_VALUES_COLUMN = CACHE_PREFIX + "topk_values"
TOPK_INDICES_COLUMN = CACHE_PREFIX + "topk_indices"
EMBEDDINGS_COLUMN = CACHE_PREFIX + "embeddings"
HIDDEN_COLUMN = CACHE_PREFIX + "hidden_{}"
ATTENTION_COLUMN = CACHE_PREFIX + "attention_{}"

# Per-row layouts, with `width` the one fixed size: "row" = (width,), "token" = (L, width), "attention" =
# (width, L, L) with width = heads.
ROW, TOKEN, ATTENTION = "row", "token", "attention"

# Tokenizer settings that name files or say where a tokenizer was loaded from, not how it tokenizes.
_TOKENIZER_LOCATION_KEYS = (
    "name_or_path",
    "vocab_file",
    "merges_file",
    "tokenizer_file",
    "is_local",
    "local_files_only",
)
_HASH_CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class TeacherCacheSpec:
    """What a teacher cache holds. Part of the fingerprint: two specs never share a cache.

    Args:
        logits: cache the teacher's logits (needed by the logit term).
        top_k: keep only the k largest logits per position (for large vocabularies); `None`, or a k at least the
            number of classes, keeps them all.
        hidden_layers: 0-based teacher blocks whose output hidden states to cache.
        attention_layers: 0-based teacher blocks whose attention probabilities to cache (large: see the module
            docstring).
        embeddings: cache the input of the first block (for the embeddings term).
        dtype: storage dtype of hidden states, embeddings and attention maps: `"float16"` (half the disk and memory,
            about 3 significant digits) or `"float32"`. Logits are always stored in float32.
    """

    logits: bool = True
    top_k: int | None = None
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()
    embeddings: bool = False
    dtype: str = "float16"

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", tuple(sorted(set(self.hidden_layers))))
        object.__setattr__(self, "attention_layers", tuple(sorted(set(self.attention_layers))))
        if not self.logits:  # top_k only shapes the logits: without them it must not split the cache key
            object.__setattr__(self, "top_k", None)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}. Use e.g. 64, or None for all logits.")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {CACHE_DTYPES}, got {self.dtype!r}.")
        if not (self.logits or self.hidden_layers or self.attention_layers or self.embeddings):
            raise ValueError("a TeacherCacheSpec must cache something: logits, hidden/attention layers or embeddings.")


@dataclass
class TeacherCache:
    """A teacher cache on disk, opened.

    Args:
        path: its directory, `<cache_dir>/<fingerprint>`.
        fingerprint: hex SHA-256 key (the directory name is its first 32 characters).
        dataset: the memory-mapped Arrow dataset of `teacher_cache_*` columns, one row per data row.
        layouts: column -> `(layout, width)` with layout `"row"`, `"token"` or `"attention"` (see module docstring).
        components: what went into the fingerprint, one digest or value per input (to see why a cache was rebuilt).
        input_columns: the data columns the teacher read (and whose contents were hashed).
        built: whether this call built it (False: it was found on disk).
        build_seconds: time the build took (the one-off cost), whenever it was built.
    """

    path: str
    fingerprint: str
    dataset: Dataset
    layouts: dict[str, tuple[str, int]]
    components: dict[str, Any] = field(default_factory=dict)
    input_columns: list[str] = field(default_factory=list)
    built: bool = False
    build_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ fingerprint
def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def teacher_weights_digest(teacher: nn.Module) -> str:
    """SHA-256 of every state-dict entry's name, dtype, shape and bytes: changes when any weight changes at all."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Viewing the bytes as uint8 works for every dtype (numpy has no bfloat16).
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_config_digest(teacher: nn.Module) -> str:
    """Digest of the teacher's class, config (without its path and `_` bookkeeping) and the transformers version."""
    config = getattr(teacher, "config", None)
    values = config.to_dict() if config is not None else {}
    values = {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"}
    return _digest(type(teacher).__name__, transformers.__version__, json.dumps(values, sort_keys=True, default=str))


def tokenizer_digest(tokenizer) -> str:
    """Digest of how a tokenizer maps text to ids: class, backend definition or vocabulary, settings; no paths."""
    if tokenizer is None:
        return _digest("no tokenizer")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Truncation and padding are runtime state of the backend (each call with truncation=True sets them), not
        # part of how text becomes ids.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = {
        k: v
        for k, v in getattr(tokenizer, "init_kwargs", {}).items()
        if k not in _TOKENIZER_LOCATION_KEYS and not isinstance(v, dict)
    }
    return _digest(type(tokenizer).__name__, definition, json.dumps(settings, sort_keys=True, default=str))


def teacher_input_columns(teacher: nn.Module, dataset: Dataset) -> list[str]:
    """The dataset columns the teacher's forward takes (its inputs), labels excluded: they never change its outputs."""
    accepted = set(inspect.signature(teacher.forward).parameters)
    columns = [c for c in dataset.column_names if c in accepted and c != "labels" and not c.startswith(CACHE_PREFIX)]
    if "input_ids" not in columns:
        raise ValueError(
            f"the dataset has no input_ids column (columns: {dataset.column_names}); the teacher cache is built from "
            "tokenized data. Tokenize first, e.g. with hf_distill.tokenize_dataset."
        )
    return columns


def data_digest(dataset: Dataset, columns: list[str]) -> str:
    """SHA-256 of the contents of `columns`, row by row in dataset order (selections and shuffles included)."""
    h = hashlib.sha256(f"rows={len(dataset)}|".encode())
    arrow = dataset.select_columns(columns).with_format("arrow")
    for start in range(0, len(dataset), _HASH_CHUNK_ROWS):
        table = arrow[start : start + _HASH_CHUNK_ROWS]
        for name in columns:
            array = table.column(name).combine_chunks()
            h.update(f"{name}|{array.type}|".encode())
            while hasattr(array, "flatten") and hasattr(array, "value_lengths"):  # list columns: lengths, then values
                h.update(np.asarray(array.value_lengths().fill_null(0)).tobytes())
                array = array.flatten()
            h.update(np.asarray(array).tobytes())
    return h.hexdigest()


def teacher_cache_fingerprint(
    teacher: nn.Module,
    tokenizer,
    dataset: Dataset,
    spec: TeacherCacheSpec,
    max_length: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """The key of a teacher cache and the components it was computed from (see the module docstring).

    Returns:
        `(fingerprint, components)`: a hex SHA-256 and a JSON-able dict of one digest or value per input.
    """
    columns = teacher_input_columns(teacher, dataset)
    components = {
        "format": CACHE_FORMAT_VERSION,
        "teacher_weights": teacher_weights_digest(teacher),
        "teacher_config": teacher_config_digest(teacher),
        "tokenizer": tokenizer_digest(tokenizer),
        "data": data_digest(dataset, columns),
        "data_columns": columns,
        "num_rows": len(dataset),
        "max_length": max_length,
        "spec": asdict(spec),
    }
    return _digest(json.dumps(components, sort_keys=True)), components


# ------------------------------------------------------------------------------------------------ build / load
def _column_features(layouts: dict[str, tuple[str, int]], dtype: str) -> Features:
    def value(name: str) -> Value:
        if name == TOPK_INDICES_COLUMN:
            return Value("int32")
        return Value("float32" if name in (LOGITS_COLUMN, TOPK_VALUES_COLUMN) else dtype)

    return Features({name: List(value(name)) for name in layouts})


def _row_positions(length: int, padded: int, padding_side: str) -> slice:
    return slice(padded - length, padded) if padding_side == "left" else slice(0, length)


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
) -> TeacherCache:
    """Open the teacher cache of `dataset`, building it first if no valid one exists under `cache_dir`.

    Args:
        teacher: the frozen teacher (any device; it is run in eval mode under `torch.inference_mode()`).
        dataset: the tokenized training set (`input_ids`, ...), in the row order the cache will be used with.
        collator: pads a list of rows into a batch, e.g. `DataCollatorWithPadding(tokenizer)`.
        cache_dir: parent directory; the cache lives in `<cache_dir>/<fingerprint[:32]>`.
        spec: what to cache (default: logits only).
        tokenizer: the tokenizer that produced `dataset` (part of the fingerprint).
        max_length: the length rows were truncated to; part of the fingerprint, and rows longer than it are refused.
        batch_size: rows per teacher forward pass while building.
        padding_side: where `collator` pads, `"right"` or `"left"` (default: the tokenizer's, else right).

    Returns:
        `TeacherCache` with `built=True` when this call built it.
    """
    spec = spec or TeacherCacheSpec()
    padding_side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    fingerprint, components = teacher_cache_fingerprint(teacher, tokenizer, dataset, spec, max_length)
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
            teacher, dataset, collator, components["data_columns"], spec, os.path.join(tmp, ARROW_NAME),
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
        with open(os.path.join(tmp, METADATA_NAME), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache_dir must stay readable by other users
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process finished the same cache first: keep theirs (the contents are identical).
            if not os.path.isfile(os.path.join(path, METADATA_NAME)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Built the teacher cache at {path} ({len(dataset)} rows, {seconds:.1f}s)")
    cache = load_teacher_cache(path)
    cache.built, cache.build_seconds = True, seconds
    return cache


def _write_teacher_outputs(
    teacher: nn.Module,
    dataset: Dataset,
    collator,
    input_columns: list[str],
    spec: TeacherCacheSpec,
    path: str,
    *,
    max_length: int | None,
    batch_size: int,
    padding_side: str,
) -> dict[str, tuple[str, int]]:
    device = next(teacher.parameters()).device
    store_dtype = getattr(torch, spec.dtype)
    was_training = teacher.training
    teacher.eval()
    inputs_only = dataset.select_columns(input_columns)
    writer, layouts = None, {}
    try:
        for start in range(0, len(dataset), batch_size):
            columns = inputs_only[start : start + batch_size]
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            lengths = [len(row["input_ids"]) for row in rows]
            if max_length is not None and max(lengths) > max_length:
                raise ValueError(
                    f"row {start + int(np.argmax(lengths))} has {max(lengths)} tokens, more than max_length="
                    f"{max_length}. Pass the max_length the data was tokenized with."
                )
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(rows).items()}
            batch = {k: v for k, v in batch.items() if k in input_columns}
            with torch.inference_mode():
                features = forward_with_features(
                    teacher,
                    batch,
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
        if writer is None:
            raise ValueError("cannot build a teacher cache of an empty dataset.")
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
    spans = [_row_positions(n, padded, padding_side) for n in lengths]

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
        per_row = [logits[b, s] if token_level else logits[b] for b, s in enumerate(spans)]
        num_classes = logits.shape[-1]
        if spec.top_k is not None and spec.top_k < num_classes:
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
        build_seconds=metadata.get("build_seconds", 0.0),
    )


def attach_teacher_cache(dataset: Dataset, cache: TeacherCache, verify: bool = True) -> Dataset:
    """`dataset` with the cache's columns added, row by row; the cache columns are formatted as torch tensors.

    Args:
        dataset: the dataset the cache was built for.
        cache: from `build_teacher_cache` / `load_teacher_cache`.
        verify: re-hash the dataset's teacher-input columns and refuse a cache built for other data. Skip only when
            the cache was just built or looked up for this very dataset object.
    """
    if len(dataset) != len(cache.dataset):
        raise ValueError(
            f"the teacher cache at {cache.path} has {len(cache.dataset)} rows but the dataset has {len(dataset)}: it "
            "was built for another dataset. Build one for this dataset with build_teacher_cache."
        )
    if verify and data_digest(dataset, cache.input_columns) != cache.components["data"]:
        raise ValueError(
            f"the teacher cache at {cache.path} was built for another dataset: the contents of "
            f"{cache.input_columns} differ. Build one for this dataset with build_teacher_cache."
        )
    clash = [c for c in cache.dataset.column_names if c in dataset.column_names]
    if clash:
        raise ValueError(f"the dataset already has teacher cache columns {clash}; attach a cache once.")
    data_format = dataset.format
    if data_format["type"] not in (None, "torch"):
        raise ValueError(
            f"the dataset is formatted as {data_format['type']!r}; the teacher cache needs python or torch "
            "formatting. Call dataset.reset_format() first."
        )
    if dataset._indices is not None:  # column-wise concatenation needs both sides in physical row order
        dataset = dataset.flatten_indices()
    combined = concatenate_datasets([dataset.with_format(None), cache.dataset.with_format(None)], axis=1)
    if data_format["type"] == "torch" and data_format["columns"] is None:
        return combined.with_format("torch")
    return combined.with_format("torch", columns=list(cache.layouts), output_all_columns=True)


# ------------------------------------------------------------------------------------------------ training side
class TeacherCacheCollator:
    """Wraps a collator: the data columns go through it, the `teacher_cache_*` columns are padded here.

    Rows without cache columns (an evaluation set) are passed through untouched. Cached tensors are placed where the
    wrapped collator put the row's tokens (`padding_side`) and padded with zeros, which every loss masks.

    Args:
        collator: the wrapped collator (e.g. `DataCollatorWithPadding`).
        layouts: column -> `(layout, width)`, `TeacherCache.layouts`.
        padding_side: where `collator` pads, `"right"` or `"left"`.
    """

    def __init__(self, collator, layouts: dict[str, tuple[str, int]], padding_side: str = "right"):
        self.collator = collator
        self.layouts = dict(layouts)
        self.padding_side = padding_side

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or not any(name in features[0] for name in self.layouts):
            return self.collator(features)
        rows = [{k: v for k, v in f.items() if k not in self.layouts} for f in features]
        lengths = [len(row["input_ids"]) for row in rows]
        batch = self.collator(rows)
        padded = batch["input_ids"].shape[1]
        for name, (layout, width) in self.layouts.items():
            values = [torch.as_tensor(f[name]) for f in features]
            batch[name] = pad_cached_rows(values, layout, width, lengths, padded, self.padding_side)
        return batch


def pad_cached_rows(
    values: list[torch.Tensor], layout: str, width: int, lengths: list[int], padded: int, padding_side: str = "right"
) -> torch.Tensor:
    """Stack flat per-row cached tensors into a batch, zero-padded to `padded` positions.

    Shapes: `"row"` -> `(B, width)`; `"token"` -> `(B, padded, width)`; `"attention"` -> `(B, width, padded, padded)`.
    """
    if layout == ROW:
        return torch.stack(values)
    dtype = values[0].dtype
    if layout == TOKEN:
        out = torch.zeros(len(values), padded, width, dtype=dtype)
        for b, (row, n) in enumerate(zip(values, lengths)):
            out[b, _row_positions(n, padded, padding_side)] = row.view(n, width)
        return out
    if layout == ATTENTION:
        out = torch.zeros(len(values), width, padded, padded, dtype=dtype)
        for b, (row, n) in enumerate(zip(values, lengths)):
            s = _row_positions(n, padded, padding_side)
            out[b, :, s, s] = row.view(width, n, n)
        return out
    raise ValueError(f"unknown cached layout {layout!r}; expected {ROW!r}, {TOKEN!r} or {ATTENTION!r}.")


def densify_top_k(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Teacher logits over all `num_classes` from its top-k: the k values at their ids, `-inf` everywhere else.

    `softmax(densify_top_k(...) / T)` is the teacher's top-k distribution renormalised at temperature T, so any
    logit loss defined on a restricted support (forward KL, JSD) can be applied unchanged.

    Args:
        indices: `(..., k)` integer class ids.
        values: `(..., k)` logits at those ids.
        num_classes: size C of the class / vocabulary dim.

    Returns:
        `(..., C)` float32 logits.
    """
    dense = torch.full((*values.shape[:-1], num_classes), float("-inf"), dtype=torch.float32, device=values.device)
    return dense.scatter_(-1, indices.long(), values.float())


def has_cached_teacher(inputs: dict[str, Any]) -> bool:
    """Whether a batch carries teacher outputs from a cache."""
    return any(key.startswith(CACHE_PREFIX) for key in inputs)


def cached_teacher_features(
    inputs: dict[str, Any],
    *,
    num_classes: int,
    logits: bool = True,
    hidden_layers: list[int] | tuple[int, ...] = (),
    attention_layers: list[int] | tuple[int, ...] = (),
    embeddings: bool = False,
) -> ModelFeatures:
    """The teacher's `Features` for a batch, read from its `teacher_cache_*` columns instead of a forward pass.

    Args:
        inputs: a collated batch with cache columns (from `TeacherCacheCollator`).
        num_classes: size of the student's class / vocabulary dim (to densify top-k logits).
        logits, hidden_layers, attention_layers, embeddings: what the losses need; a missing column raises.

    Returns:
        `Features` whose `outputs.logits` are the cached (or densified top-k) logits.
    """
    wanted = [HIDDEN_COLUMN.format(i) for i in hidden_layers] + [ATTENTION_COLUMN.format(i) for i in attention_layers]
    wanted += [EMBEDDINGS_COLUMN] if embeddings else []
    missing = [c for c in wanted if c not in inputs]
    if logits and LOGITS_COLUMN not in inputs and TOPK_VALUES_COLUMN not in inputs:
        missing.append(LOGITS_COLUMN)
    if missing:
        present = sorted(k for k in inputs if k.startswith(CACHE_PREFIX))
        raise ValueError(
            f"the batch's teacher cache has no {missing} (it has {present}): it was built for other layers or "
            "terms. Rebuild it for this configuration."
        )
    teacher_logits = None
    if logits:
        if TOPK_VALUES_COLUMN in inputs:
            teacher_logits = densify_top_k(inputs[TOPK_INDICES_COLUMN], inputs[TOPK_VALUES_COLUMN], num_classes)
        else:
            teacher_logits = inputs[LOGITS_COLUMN]
    return ModelFeatures(
        outputs=SimpleNamespace(logits=teacher_logits),
        hidden_states={i: inputs[HIDDEN_COLUMN.format(i)] for i in hidden_layers},
        embeddings=inputs[EMBEDDINGS_COLUMN] if embeddings else None,
        attentions={i: inputs[ATTENTION_COLUMN.format(i)] for i in attention_layers},
    )
