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
- the data: a SHA-256 of the contents, in order, of every column the collator receives (`input_ids`,
  `attention_mask`, `token_type_ids`, ...), label columns excluded unless the collator makes teacher inputs from
  them (`DataCollatorForSeq2Seq(model=...)` makes `decoder_input_ids`). The teacher's outputs are a function of
  exactly these columns, so this is stable across runs (unlike `Dataset._fingerprint`, which is random after a `map`
  of an unhashable function) and a cache is never used for a dataset whose teacher inputs differ in any row, in the
  row order, or in the number of rows,
- the collator: its class and settings (`padding`, `pad_to_multiple_of`, `max_length`, `mlm`, `label_pad_token_id`,
  `return_tensors`, ...; a tokenizer inside it by what it does, never by its repr), and the padding side,
- the maximum length the rows were tokenized to (when given), and what is cached (`TeacherCacheSpec`: logits, top-k,
  layers, embeddings, attention maps, storage dtype, top-k tail and its temperature) plus the storage format version.

What is cached is what the live teacher would compute: the build collates the rows with the training collator and
feeds the teacher every collated key its forward takes, labels excluded, exactly as `DistillationTrainer` does
live, so inputs the collator creates (an `attention_mask` the dataset lacks, `position_ids`) are included. This
needs a collator that is a pure function of its rows: random masking (`DataCollatorForLanguageModeling(mlm=True)`)
is refused before anything is written, and other collators are probed (`hf_distill.cache.collators`, which also
says why caching the teacher on the unmasked input is not offered).

Storage: `<cache_dir>/<fingerprint[:32]>/teacher_outputs.arrow` (a `datasets` Arrow file, memory-mapped when read, one
row per dataset row, in dataset order) and `teacher_cache.json` (the fingerprint, its components, the layout of each
column). A cache is written into a temporary directory beside the final one and renamed into place only when
complete, so a crash or a concurrent builder never leaves a half-written cache where a reader would find it (a
killed build can leave a hidden `.<fingerprint>.tmp-*` directory behind; nothing reads it, delete it at will).

Each row stores its unpadded tensors (L = the row's own length) flattened to 1-D lists, which read several times
faster than nested lists (a batch of 32 hidden states: 1.3 ms against 9.9 ms) and are converted to tensors once
per column for the whole batch (`formatting.py`: `datasets`' torch formatting, without its per-row conversions);
the layout recorded per column reshapes them, and `TeacherCacheCollator` pads them to the batch with zeros, which
every loss masks:

| column                                | one row holds                                          | stored as       |
|---------------------------------------|--------------------------------------------------------|-----------------|
| `teacher_cache_logits`                | `(C,)` (sequence classification) or `(L, V)` (tokens)  | float32         |
| `teacher_cache_topk_values / indices` | `(k,)` or `(L, k)`: the k largest logits and their ids | float32 / int32 |
| `teacher_cache_topk_logprobs`         | `(k,)` or `(L, k)`: log-probabilities at T of those ids | float32        |
| `teacher_cache_topk_tail_logprob`     | `(1,)` or `(L, 1)`: log of the mass outside them at T  | float32         |
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

Top-k plus tail (`TeacherCacheSpec(top_k=k, top_k_tail=True, temperature=T)`): the sparse form of the teacher's true
distribution instead of its renormalised top-k. Per position the cache stores the top-k ids (`..._topk_indices`,
int32), their log-probabilities `log_softmax(z / T)` (`..._topk_logprobs`, float32) and the log of the remaining mass
(`..._topk_tail_logprob`: the log-sum-exp of the logits outside the top-k minus the full one, exact even where the
tail is below float rounding of 1 - Σ p): `8k + 4` bytes per token against `4·V` for the logits (SmolLM2, V = 49,152:
68 bytes at k = 8, 1,028 at k = 128, against 196,608). `cached_teacher_features` returns them as a
`SparseTeacherLogits` (`outputs.sparse_logits`; `outputs.logits` is None) and `hf_distill.losses.sparse.sparse_kl_loss`
compares the student with this (k + 1)-bucket distribution directly, no `(tokens, V)` teacher tensor made: a lower
bound of the full KL, equal to it when the teacher has no mass outside its top-k. Log-probabilities depend on T, so
T is part of the spec and of the key: a cache built at T = 2 never serves T = 1 (build one per temperature). Specs
without `top_k_tail` store what they always did (the format version is unchanged), and a k at least the number of
classes still stores the full logits.

Attention maps are not cached unless asked for: they cost `heads·L²` values per matched layer per row against `L·H`
for a hidden state, quadratic in the length: for MiniLM (12 heads, H = 384) as much as a hidden state at L = 32,
twice as much at L = 64 (96 KiB per layer per row in float16), 16 times at L = 512 (6 MiB per layer per row). With
`attention_weight > 0` and the cache on, `DistillationConfig` asks for `teacher_cache_attentions=True` (or
`attention_weight=0`) rather than silently running the teacher anyway, which would keep the full cost of a teacher
forward pass and defeat the cache.
"""

from .build import attach_teacher_cache, build_teacher_cache, collated_columns, load_teacher_cache
from .collators import check_known_random_collator, check_rows_in_place, probe_collator
from .fingerprint import (
    data_digest,
    describe,
    resolve_padding_side,
    teacher_cache_fingerprint,
    teacher_config_digest,
    teacher_input_columns,
    teacher_weights_digest,
    tokenizer_digest,
)
from .spec import (
    ARROW_NAME,
    ATTENTION,
    ATTENTION_COLUMN,
    CACHE_DTYPES,
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
)
from .training import (
    SparseTeacherLogits,
    TeacherCacheCollator,
    cached_teacher_features,
    densify_top_k,
    has_cached_teacher,
    pad_cached_rows,
)

__all__ = [
    "ARROW_NAME",
    "ATTENTION",
    "ATTENTION_COLUMN",
    "CACHE_DTYPES",
    "CACHE_FORMAT_VERSION",
    "CACHE_PREFIX",
    "EMBEDDINGS_COLUMN",
    "HIDDEN_COLUMN",
    "LABEL_COLUMNS",
    "LOGITS_COLUMN",
    "METADATA_NAME",
    "ROW",
    "TOKEN",
    "TOPK_INDICES_COLUMN",
    "TOPK_LOGPROBS_COLUMN",
    "TOPK_TAIL_COLUMN",
    "TOPK_VALUES_COLUMN",
    "SparseTeacherLogits",
    "TeacherCache",
    "TeacherCacheCollator",
    "TeacherCacheSpec",
    "attach_teacher_cache",
    "build_teacher_cache",
    "cached_teacher_features",
    "check_known_random_collator",
    "check_rows_in_place",
    "collated_columns",
    "data_digest",
    "densify_top_k",
    "describe",
    "has_cached_teacher",
    "load_teacher_cache",
    "pad_cached_rows",
    "probe_collator",
    "resolve_padding_side",
    "teacher_cache_fingerprint",
    "teacher_config_digest",
    "teacher_input_columns",
    "teacher_weights_digest",
    "tokenizer_digest",
]
