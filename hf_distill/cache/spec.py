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
# The sparse form (`top_k_tail=True`): the top-k ids are `TOPK_INDICES_COLUMN`, with these two beside them.
TOPK_LOGPROBS_COLUMN = CACHE_PREFIX + "topk_logprobs"
TOPK_TAIL_COLUMN = CACHE_PREFIX + "topk_tail_logprob"
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
            about 3 significant digits) or `"float32"`. Logits (and log-probabilities) are always stored in
            float32.
        top_k_tail: with `top_k`, store the sparse form of the teacher's distribution instead of its top-k logits:
            per position the top-k ids, their log-probabilities `log_softmax(z / T)` at `temperature` and the log of
            the mass outside them, `log(1 - Σ_top-k p)`, so that a loss compares the student with the teacher's true
            distribution coarsened to k + 1 buckets (`hf_distill.losses.sparse.sparse_kl_loss`) rather than with
            its top-k renormalised (see the module docstring of `hf_distill.cache`).
        temperature: the temperature T of the stored log-probabilities, required with `top_k_tail` (ignored, and
            set to `None`, without it: stored logits serve every T). The log-probabilities and the tail mass depend on
            T, so it is part of the key: a cache built at T = 2 never serves a run at T = 1. Pass the temperature
            the loss uses.
    """

    logits: bool = True
    top_k: int | None = None
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()
    embeddings: bool = False
    dtype: str = "float16"
    top_k_tail: bool = False
    temperature: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", tuple(sorted(set(self.hidden_layers))))
        object.__setattr__(self, "attention_layers", tuple(sorted(set(self.attention_layers))))
        if not self.logits:  # top_k only shapes the logits: without them it must not split the cache key
            object.__setattr__(self, "top_k", None)
            object.__setattr__(self, "top_k_tail", False)
            object.__setattr__(self, "temperature", None)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}. Use e.g. 64, or None for all logits.")
        if self.top_k_tail:
            if self.top_k is None:
                raise ValueError(
                    "top_k_tail=True stores the top-k log-probabilities plus the tail mass, but top_k is None. Set "
                    "top_k, e.g. TeacherCacheSpec(top_k=32, top_k_tail=True, temperature=1.0)."
                )
            if self.temperature is None or not self.temperature > 0:
                raise ValueError(
                    f"top_k_tail=True needs the temperature the log-probabilities are taken at (> 0), got "
                    f"{self.temperature}. Pass the temperature the loss uses, e.g. temperature=1.0."
                )
            object.__setattr__(self, "temperature", float(self.temperature))
        else:  # stored logits serve every temperature: a temperature must not split their key
            object.__setattr__(self, "temperature", None)
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
