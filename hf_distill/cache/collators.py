"""Which collators a teacher cache can be built under, and what of their rows the cached outputs depend on.

A cache stores the teacher's outputs for the batch the collator made of each row at build time; it is valid only if
the collator makes the same teacher inputs from the same rows every time it is called, as `DataCollatorWithPadding`,
`default_data_collator`, `DataCollatorForTokenClassification`, `DataCollatorForSeq2Seq` or
`DataCollatorForLanguageModeling(mlm=False)` do. Collators that mask or permute tokens at random on every call are
refused by name; any other collator is probed: the same rows are collated under two seeds of torch's, numpy's and
Python's global generators, and a difference in what reaches the teacher refuses it.

Caching the teacher on the unmasked input instead is not offered: at a masked position the live teacher predicts the
hidden token from its context (the soft targets masked-LM distillation learns from), while on the unmasked input it
sees the token and mostly copies it, a different and nearly one-hot target; hidden-state terms would compare a
student reading masks with a teacher reading none. The valid way to cache masked-LM distillation is to mask once,
in the data (a seeded `dataset.map`, "static masking"), and collate with a deterministic collator.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import transformers

from .spec import LABEL_COLUMNS, row_positions

PROBE_SEEDS = (0, 1)


def collator_name(collator) -> str:
    return getattr(collator, "__qualname__", None) or type(collator).__name__


def _refusal(what: str, why: str) -> ValueError:
    return ValueError(
        f"the teacher cache cannot be used with {what}: {why}, so a cache would hold the teacher's outputs for one "
        "masking while the student trains on others (wrong teacher targets wherever they differ). Set "
        "use_teacher_cache=False to run the teacher on every batch, or mask once in the data (a seeded "
        "dataset.map) and collate with a deterministic collator such as DataCollatorWithPadding."
    )


def check_known_random_collator(collator) -> None:
    """Refuse the transformers collators that draw a new random masking or permutation on every call."""
    if isinstance(collator, transformers.DataCollatorForLanguageModeling) and collator.mlm:
        extra = ", whole_word_mask=True" if getattr(collator, "whole_word_mask", False) else ""
        raise _refusal(
            f"{type(collator).__name__}(mlm=True{extra})",
            f"it masks a random {collator.mlm_probability:.0%} of the tokens on every call",
        )
    if isinstance(collator, transformers.DataCollatorForPermutationLanguageModeling):
        raise _refusal(type(collator).__name__, "it draws a random permutation and random masked spans on every call")
    for name in ("DataCollatorForWholeWordMask", "DataCollatorForSOP"):  # older transformers
        kind = getattr(transformers, name, None)
        if isinstance(kind, type) and isinstance(collator, kind):
            raise _refusal(name, "it masks tokens at random on every call")


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Run a block that reseeds the global generators, and put their states back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def teacher_view(batch: dict[str, Any], teacher_inputs: set[str]) -> dict[str, Any]:
    """What of a collated batch the teacher receives: what the live path passes (labels excluded)."""
    return {k: v for k, v in batch.items() if k in teacher_inputs and k != "labels"}


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        if torch.is_tensor(x) and torch.is_tensor(y):
            same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        elif torch.is_tensor(x) or torch.is_tensor(y):
            same = False
        else:
            try:
                same = bool(np.all(np.asarray(x) == np.asarray(y))) and np.shape(x) == np.shape(y)
            except (TypeError, ValueError):
                same = x == y
        if not same:
            out.append(key)
    return out


def probe_collator(collator, rows: list[dict[str, Any]], teacher_inputs: set[str]) -> dict[str, Any]:
    """Refuse a collator whose teacher inputs for the same rows change with the global random state.

    The rows are collated (deep copies: collators may edit them) under each of `PROBE_SEEDS` for torch, numpy and
    `random`, then the generators are put back as they were. A collator with its own generator changes between the
    two calls as well. A collator that draws rarely can pass by chance: the known random ones are refused by name
    first (`check_known_random_collator`).

    Returns:
        The teacher inputs of the first collation (to compare others with).
    """
    check_known_random_collator(collator)
    views = []
    with _preserved_rng():
        for seed in PROBE_SEEDS:
            _seed_all(seed)
            views.append(teacher_view(collator(copy.deepcopy(rows)), teacher_inputs))
    differing = _differing(*views)
    if differing:
        raise ValueError(
            f"the teacher cache needs a collator that is a pure function of its rows, but {collator_name(collator)} "
            f"returned different {', '.join(differing)} for the same {len(rows)} rows under two random seeds: a "
            "cache would hold the teacher's outputs for one draw while the student trains on others. Set "
            "use_teacher_cache=False to run the teacher on every batch, or use a deterministic collator (e.g. "
            "DataCollatorWithPadding)."
        )
    return views[0]


def labels_reach_teacher(
    collator, rows: list[dict[str, Any]], teacher_inputs: set[str], reference: dict[str, Any]
) -> bool:
    """Whether the collator makes teacher inputs from the label columns (e.g. `decoder_input_ids` from `labels`).

    Checked by collating the rows without their label columns: if the teacher's inputs change (or the collator
    fails), the labels are part of what the cached outputs depend on, and are hashed with the data.
    """
    present = [c for c in LABEL_COLUMNS if rows and c in rows[0]]
    if not present:
        return False
    unlabelled = [{k: v for k, v in row.items() if k not in present} for row in copy.deepcopy(rows)]
    try:
        with _preserved_rng():
            _seed_all(PROBE_SEEDS[0])
            view = teacher_view(collator(unlabelled), teacher_inputs)
    except Exception:  # a collator that needs its labels depends on them
        return True
    return bool(_differing(reference, view))


def check_rows_in_place(batch: dict[str, Any], row_ids: list[Any], padding_side: str, collator) -> None:
    """Refuse a batch whose row b does not hold `row_ids[b]` (its input_ids) unchanged at its `padding_side` positions.

    Cached outputs are stored per row without padding and put back where the collator puts the row's tokens, so a
    collator that pads on the other side, or crops, reorders or packs rows, would misplace them.
    """
    ids = batch.get("input_ids")
    name = collator_name(collator)
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] != len(row_ids):
        shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(
            f"the teacher cache needs one batch row per data row, but {name} returned input_ids of shape {shape} "
            f"for {len(row_ids)} rows (packed or flattened batches cannot be cached). Use a padding collator such as "
            "DataCollatorWithPadding, or use_teacher_cache=False."
        )
    padded = ids.shape[1]
    for b, row in enumerate(row_ids):
        own = torch.as_tensor(row, dtype=ids.dtype)
        here = ids[b, row_positions(len(own), padded, padding_side)].cpu()
        if len(own) > padded or not torch.equal(here, own):
            other = "left" if padding_side == "right" else "right"
            found = len(own) <= padded and torch.equal(ids[b, row_positions(len(own), padded, other)].cpu(), own)
            why = f"{name} pads on the {other}" if found else f"{name} changes or crops the tokens of row {b}"
            raise ValueError(
                f"the teacher cache places each row's outputs where its tokens are, assuming padding_side="
                f"{padding_side!r}, but {why}. Pass the padding_side the collator uses (its tokenizer's "
                "padding_side), or use a collator that keeps the rows' input_ids as they are."
            )
