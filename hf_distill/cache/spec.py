"""What a teacher cache holds: its column names and layouts, `TeacherCacheSpec`, and `TeacherCache` (one opened)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

# 2: the key covers the collator and the padding side, and the teacher is fed every input the collator produces (a
# format-1 cache may hold outputs computed without the attention mask the collator adds at train time).
CACHE_FORMAT_VERSION = 2
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

# Columns the `Trainer` treats as labels: they go through the collator but never into the teacher.
LABEL_COLUMNS = ("label", "label_ids", "labels")


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
        input_columns: the data columns whose contents were hashed (those the collator's teacher inputs depend on).
        padding_side: where the collator put each row's tokens, `"right"` or `"left"`; cached rows are placed alike.
        built: whether this call built it (False: it was found on disk).
        build_seconds: time the build took (the one-off cost), whenever it was built.
    """

    path: str
    fingerprint: str
    dataset: Dataset
    layouts: dict[str, tuple[str, int]]
    components: dict[str, Any] = field(default_factory=dict)
    input_columns: list[str] = field(default_factory=list)
    padding_side: str = "right"
    built: bool = False
    build_seconds: float = 0.0


def row_positions(length: int, padded: int, padding_side: str) -> slice:
    """The positions of a row of `length` tokens in a batch padded to `padded` on `padding_side`."""
    return slice(padded - length, padded) if padding_side == "left" else slice(0, length)
