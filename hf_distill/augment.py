"""Augmented transfer sets for task distillation: text the teacher labels, made once and stored as Arrow.

Two families, both word-level (words are the whitespace-separated tokens of a text, rejoined with single spaces):

- EDA-style edits (Wei & Zou 2019, https://arxiv.org/abs/1901.11196) that need no extra model: random swap, random
  deletion, and random insertion / replacement of words drawn from the corpus' own vocabulary (EDA draws synonyms
  from WordNet; the corpus vocabulary needs nothing downloaded). `"eda"` picks one of the four edits per output.
- TinyBERT's word replacement (Jiao et al. 2020, https://arxiv.org/abs/1909.10351): each word that is a single
  wordpiece is masked in turn and a masked-LM proposes its top-k replacements; each output replaces every such word
  with probability `p` by one of its candidates. Words of several wordpieces are kept (TinyBERT uses GloVe
  neighbours for those; we have no word vectors).

`augment_dataset` turns every source row into up to `n_per_row` distinct augmented texts, none equal to the source,
with no label (the teacher labels them, e.g. through the teacher cache). Randomness comes from a generator seeded by
(seed, row index, method settings) alone, so the output is identical on a re-run and does not depend on
`batch_size` or `num_proc`. With `cache_dir`, the result is saved to `<cache_dir>/<fingerprint>/` (written to a temp
dir, then renamed) and loaded from there when the fingerprint (source texts, method, settings, seed, n, masked-LM
weights and tokenizer) matches.
"""

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from transformers.utils import logging

from .cache.build import rename_into_place
from .cache.fingerprint import teacher_weights_digest, tokenizer_digest

logger = logging.get_logger(__name__)

EDA_METHODS = ("swap", "delete", "insert", "replace")
AUGMENT_METHODS = (*EDA_METHODS, "eda", "mlm")
SOURCE_INDEX_COLUMN = "source_index"
METADATA_NAME = "augment.json"
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# EDA-style edits: pure functions of (words, settings, rng)
# ---------------------------------------------------------------------------------------------------------------------
def num_edits(num_words: int, p: float) -> int:
    """How many words an edit touches: EDA's `n = max(1, alpha * len(words))`."""
    return max(1, int(p * num_words))


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions `n` times (the multiset of words is kept). Fewer than two words: unchanged."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability `p`, keeping at least one word (a random one if all were drawn)."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept if kept else [words[rng.randrange(len(words))]]


def random_insertion(words: Sequence[str], n: int, vocabulary: Sequence[str], rng: random.Random) -> list[str]:
    """Insert `n` words drawn uniformly from `vocabulary` at random positions (ends included)."""
    out = list(words)
    if not vocabulary:
        return out
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), vocabulary[rng.randrange(len(vocabulary))])
    return out


def random_replacement(words: Sequence[str], n: int, vocabulary: Sequence[str], rng: random.Random) -> list[str]:
    """Replace `n` distinct random positions by a different word drawn uniformly from `vocabulary`."""
    out = list(words)
    if not out or len(vocabulary) < 2:
        return out
    for i in rng.sample(range(len(out)), min(n, len(out))):
        word = out[i]
        while word == out[i]:
            word = vocabulary[rng.randrange(len(vocabulary))]
        out[i] = word
    return out


def corpus_vocabulary(texts: Sequence[str]) -> list[str]:
    """The distinct words of `texts`, sorted (so draws from it are reproducible)."""
    return sorted({w for t in texts for w in t.split()})


def eda_edit(words: Sequence[str], method: str, p: float, vocabulary: Sequence[str], rng: random.Random) -> list[str]:
    """One EDA edit of `words`: `method` is one of `EDA_METHODS`, or `"eda"` to pick one of them at random."""
    if method == "eda":
        method = EDA_METHODS[rng.randrange(len(EDA_METHODS))]
    n = num_edits(len(words), p)
    if method == "swap":
        return random_swap(words, n, rng)
    if method == "delete":
        return random_deletion(words, p, rng)
    if method == "insert":
        return random_insertion(words, n, vocabulary, rng)
    return random_replacement(words, n, vocabulary, rng)


# ---------------------------------------------------------------------------------------------------------------------
# TinyBERT's masked-LM word replacement
# ---------------------------------------------------------------------------------------------------------------------
def check_mlm(model, tokenizer) -> None:
    """Raise a ValueError unless `model` has a masked-LM head and `tokenizer` a mask token."""
    if model is None or tokenizer is None:
        raise ValueError(
            f"method='mlm' needs mlm_model and mlm_tokenizer, got mlm_model={type(model).__name__} and "
            f"mlm_tokenizer={type(tokenizer).__name__}. Pass e.g. AutoModelForMaskedLM.from_pretrained(path) and "
            "AutoTokenizer.from_pretrained(path)."
        )
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        raise ValueError(
            f"mlm_model must have a masked-LM head, got {type(model).__name__} (get_output_embeddings() is None). "
            "Load it with AutoModelForMaskedLM.from_pretrained(path)."
        )
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(f"mlm_tokenizer has no mask token ({type(tokenizer).__name__}). Use the MLM's own tokenizer.")


def _blocked_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """A boolean mask over the vocabulary of ids never proposed as a word.

    Special tokens, `##` continuations, reserved slots such as BERT's `[unused7]`, blank tokens, and ids past the
    tokenizer's vocabulary (a model's embedding table may be padded).
    """
    blocked = torch.zeros(vocab_size, dtype=torch.bool)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    for i, token in enumerate(tokens):
        reserved = token is not None and len(token) > 2 and token[0] + token[-1] in ("[]", "<>")
        blocked[i] = token is None or token.startswith("##") or not token.strip() or reserved
    blocked[len(tokens) :] = True
    blocked[[i for i in tokenizer.all_special_ids if i < vocab_size]] = True
    return blocked


@torch.inference_mode()
def mlm_word_candidates(
    words: Sequence[str], model, tokenizer, top_k: int = 15, *, blocked: torch.Tensor | None = None
) -> list[list[str]]:
    """For each word, the masked-LM's `top_k` replacements when that word alone is masked (TinyBERT).

    A word gets candidates only if it is a single wordpiece within the model's length; others get `[]`. Candidates
    exclude the word itself, special tokens and `##` continuations, and are in the model's ranking order. All masked
    copies of one text go through the model as one unpadded batch, so the result depends on the text alone.

    Args:
        words: the words of one text.
        model: any model with a masked-LM head (e.g. `BertForMaskedLM`), returning `logits` `(batch, seq, vocab)`.
        tokenizer: its tokenizer.
        top_k: how many candidates per word.
        blocked: `(vocab,)` boolean mask of ids never proposed (default: computed from the tokenizer).

    Returns:
        `len(words)` lists of candidate words.
    """
    candidates: list[list[str]] = [[] for _ in words]
    if not words:
        return candidates
    enc = tokenizer(list(words), is_split_into_words=True)
    if not hasattr(enc, "word_ids"):
        raise ValueError(
            f"mlm_tokenizer must map tokens to words (word_ids()), {type(tokenizer).__name__} does not. Load the "
            "fast tokenizer: AutoTokenizer.from_pretrained(path)."
        )
    ids, word_of = list(enc["input_ids"]), enc.word_ids()
    # The model's length (RoBERTa's position table is 2 longer than its tokenizer's limit): cut the words, keep the
    # trailing special tokens.
    max_len = min(getattr(model.config, "max_position_embeddings", len(ids)), tokenizer.model_max_length, len(ids))
    trailing = next(i for i, w in enumerate(reversed(word_of)) if w is not None) if len(ids) > max_len else 0
    cut = max_len - trailing
    ids = ids[:cut] + ids[len(ids) - trailing :]
    spans: dict[int, list[int]] = {}
    for position, w in enumerate(word_of):
        if w is not None:
            spans.setdefault(w, []).append(position)
    # A word gets candidates only if it is one known wordpiece inside the model's length.
    positions = {
        w: s[0] for w, s in sorted(spans.items()) if len(s) == 1 and s[0] < cut and ids[s[0]] != tokenizer.unk_token_id
    }
    if not positions:
        return candidates
    batch = torch.tensor([ids] * len(positions), device=model.device)
    rows = torch.arange(len(positions), device=model.device)
    cols = torch.tensor(list(positions.values()), device=model.device)
    batch[rows, cols] = tokenizer.mask_token_id
    logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[rows, cols].float()
    if blocked is None:
        blocked = _blocked_ids(tokenizer, logits.shape[-1])
    logits = logits.masked_fill(blocked.to(logits.device), float("-inf"))
    original = torch.tensor([ids[i] for i in positions.values()], device=logits.device)
    logits[torch.arange(len(positions), device=logits.device), original] = float("-inf")
    k = min(top_k, int((~blocked).sum()) - 1)
    top = logits.topk(k, dim=-1).indices.tolist() if k > 0 else [[] for _ in positions]
    for w, row in zip(positions, top):
        candidates[w] = tokenizer.convert_ids_to_tokens(row)
    return candidates


def mlm_replace(words: Sequence[str], candidates: Sequence[Sequence[str]], p: float, rng: random.Random) -> list[str]:
    """Replace each word that has candidates, with probability `p`, by one of them drawn uniformly (TinyBERT)."""
    return [rng.choice(c) if c and rng.random() < p else w for w, c in zip(words, candidates)]


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------
def _check_settings(dataset: Dataset, text_column: str, method: str, n_per_row: int, p: float, top_k: int) -> None:
    if method not in AUGMENT_METHODS:
        raise ValueError(f"method must be one of {list(AUGMENT_METHODS)}, got {method!r}. Use e.g. 'eda'.")
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column {text_column!r} is not a column of the dataset (columns: {dataset.column_names}). "
            "Pass the column that holds the raw text, e.g. 'sentence'."
        )
    dtype = getattr(dataset.features[text_column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(
            f"text_column {text_column!r} must hold strings, got {dataset.features[text_column]}. Pass the raw text "
            "column, not a tokenized or label column."
        )
    if isinstance(n_per_row, bool) or not isinstance(n_per_row, int) or n_per_row < 1:
        raise ValueError(f"n_per_row must be an integer >= 1, got {n_per_row!r}. Use e.g. 4.")
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}. Use e.g. 0.1 (EDA) or 0.4 (mlm).")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}. Use e.g. 15 (TinyBERT).")


def augmentation_settings(method: str, n_per_row: int, seed: int, p: float, top_k: int, max_tries: int) -> dict:
    """The settings that, with the source texts, determine the output (the ones an MLM ignores are dropped)."""
    settings = {"method": method, "n_per_row": n_per_row, "seed": seed, "p": float(p), "max_tries": max_tries}
    if method == "mlm":
        settings["top_k"] = top_k
    return settings


def texts_digest(dataset: Dataset, text_column: str, chunk_rows: int = 10_000) -> str:
    """SHA-256 of the texts of `text_column` in dataset order (each text length-prefixed, `None` distinct from "")."""
    h = hashlib.sha256(f"rows={len(dataset)}|".encode())
    column = dataset.select_columns([text_column])
    for start in range(0, len(dataset), chunk_rows):
        for text in column[start : start + chunk_rows][text_column]:
            data = b"\xff" if text is None else str(text).encode("utf-8")
            h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def augmentation_fingerprint(
    dataset: Dataset, text_column: str, settings: dict[str, Any], mlm_model=None, mlm_tokenizer=None
) -> str:
    """SHA-256 over the format version, the source texts, the settings and (for `"mlm"`) the MLM and its tokenizer."""
    key = {
        "version": _FORMAT_VERSION,
        "texts": texts_digest(dataset, text_column),
        "text_column": text_column,
        **settings,
    }
    if settings["method"] == "mlm":
        key["mlm_weights"] = teacher_weights_digest(mlm_model)
        key["mlm_config"] = mlm_model.config.to_json_string(use_diff=False) if hasattr(mlm_model, "config") else None
        key["mlm_tokenizer"] = tokenizer_digest(mlm_tokenizer)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def row_rng(seed: int, index: int, settings: dict[str, Any]) -> random.Random:
    """The generator of source row `index`: a function of (seed, index, settings) alone."""
    material = json.dumps({"seed": seed, "index": index, **settings}, sort_keys=True)
    return random.Random(int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big"))


def augment_words(
    words: Sequence[str],
    edit,
    n_per_row: int,
    rng: random.Random,
    max_tries: int,
) -> list[str]:
    """Up to `n_per_row` distinct texts from `edit(words, rng)`, none equal to the source (`max_tries` per output)."""
    source = " ".join(words)
    out: list[str] = []
    for _ in range(n_per_row * max_tries):
        if len(out) == n_per_row:
            break
        text = " ".join(edit(words, rng))
        if text != source and text not in out:
            out.append(text)
    return out


def _augment_batch(batch, indices, *, text_column, settings, vocabulary, mlm_model, mlm_tokenizer, blocked):
    method, p, n, tries = settings["method"], settings["p"], settings["n_per_row"], settings["max_tries"]
    texts, sources = [], []
    for index, text in zip(indices, batch[text_column]):
        words = (text or "").split()
        rng = row_rng(settings["seed"], index, settings)
        if method == "mlm":
            cands = mlm_word_candidates(words, mlm_model, mlm_tokenizer, settings["top_k"], blocked=blocked)
            made = augment_words(words, lambda w, r, c=cands: mlm_replace(w, c, p, r), n, rng, tries)
        else:
            made = augment_words(words, lambda w, r: eda_edit(w, method, p, vocabulary, r), n, rng, tries)
        texts += made
        sources += [index] * len(made)
    return {text_column: texts, SOURCE_INDEX_COLUMN: sources}


def augment_dataset(
    dataset: Dataset,
    text_column: str,
    *,
    method: str,
    n_per_row: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    p: float = 0.1,
    mlm_model=None,
    mlm_tokenizer=None,
    top_k: int = 15,
    max_tries: int = 10,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> Dataset:
    """Augmented texts for the teacher to label: up to `n_per_row` per source row, with no label column.

    Args:
        dataset: the source rows.
        text_column: the column holding the raw text (e.g. `"sentence"`); words are its whitespace tokens.
        method: `"swap"`, `"delete"`, `"insert"`, `"replace"` (EDA edits), `"eda"` (one of those four per output,
            at random) or `"mlm"` (TinyBERT's masked-LM word replacement; needs `mlm_model` and `mlm_tokenizer`).
        n_per_row: how many augmented texts per source row (>= 1). A row yields fewer when no more distinct,
            changed texts turn up in `n_per_row * max_tries` attempts (e.g. a one-word text under `"swap"`).
        seed: the seed; each row's randomness comes from (seed, row index, settings) only.
        cache_dir: if given, the result is stored at `<cache_dir>/<fingerprint[:32]>/` and reused from there.
        p: the edit rate in [0, 1]: EDA's alpha (swap/insert/replace touch `max(1, int(p * len(words)))` words;
            delete drops each word with probability p), or TinyBERT's per-word replacement probability for `"mlm"`
            (0.4 in the paper).
        mlm_model: for `"mlm"`, any model with a masked-LM head, in eval mode.
        mlm_tokenizer: its tokenizer.
        top_k: for `"mlm"`, candidates per word (15 in the paper).
        max_tries: attempts per wanted output before a row gives up on it.
        batch_size, num_proc: passed to `Dataset.map`; they do not change the output. `"mlm"` runs in one process.

    Returns:
        A `Dataset` with `text_column` (the augmented text) and `source_index` (the source row it came from), in
        source order.
    """
    _check_settings(dataset, text_column, method, n_per_row, p, top_k)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}. Use e.g. 42.")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}. Use e.g. 10.")
    if method == "mlm":
        check_mlm(mlm_model, mlm_tokenizer)
        num_proc = None  # the model is not shared across processes
    settings = augmentation_settings(method, n_per_row, seed, p, top_k, max_tries)
    fingerprint = augmentation_fingerprint(dataset, text_column, settings, mlm_model, mlm_tokenizer)
    path = os.path.join(os.fspath(cache_dir), fingerprint[:32]) if cache_dir is not None else None
    if path is not None and os.path.isfile(os.path.join(path, METADATA_NAME)):
        with open(os.path.join(path, METADATA_NAME), encoding="utf-8") as f:
            stored = json.load(f).get("fingerprint")
        if stored != fingerprint:
            raise ValueError(
                f"the augmented set at {path} has fingerprint {stored}, expected {fingerprint}. Delete it."
            )
        logger.info(f"Using the augmented set at {path}")
        return load_from_disk(path)
    if path is not None and os.path.exists(path):
        raise ValueError(
            f"{path} exists but is not an augmented set (no {METADATA_NAME}); it is not ours to overwrite. Delete it "
            "or pass another cache_dir."
        )

    vocabulary = corpus_vocabulary(dataset[text_column]) if method in ("insert", "replace", "eda") else []
    blocked = None
    if method == "mlm":
        blocked = _blocked_ids(mlm_tokenizer, mlm_model.get_output_embeddings().weight.shape[0])
    # Dropout would make the MLM's candidates random: run it in eval mode, and hand it back as it came.
    was_training = method == "mlm" and mlm_model.training
    if was_training:
        mlm_model.eval()
    try:
        augmented = dataset.select_columns([text_column]).map(
            _augment_batch,
            batched=True,
            with_indices=True,
            batch_size=batch_size,
            num_proc=num_proc,
            remove_columns=[text_column],
            keep_in_memory=True,
            new_fingerprint=fingerprint[:32],  # the default would hash the function, MLM weights included
            fn_kwargs={
                "text_column": text_column,
                "settings": settings,
                "vocabulary": vocabulary,
                "mlm_model": mlm_model,
                "mlm_tokenizer": mlm_tokenizer,
                "blocked": blocked,
            },
            desc=f"Augmenting ({method})",
        )
    finally:
        if was_training:
            mlm_model.train()
    logger.info(f"Augmented {len(dataset)} rows into {len(augmented)} with method={method!r}")
    if path is None:
        return augmented
    return _save(augmented, path, fingerprint, settings, len(dataset))


def _save(augmented: Dataset, path: str, fingerprint: str, settings: dict, source_rows: int) -> Dataset:
    """Write `augmented` and its metadata to a temp dir next to `path`, then rename it into place."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        augmented.save_to_disk(tmp)
        metadata = {
            "fingerprint": fingerprint,
            "settings": settings,
            "source_rows": source_rows,
            "rows": len(augmented),
        }
        rename_into_place(tmp, path, METADATA_NAME, metadata)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Saved the augmented set to {path}")
    return load_from_disk(path)
