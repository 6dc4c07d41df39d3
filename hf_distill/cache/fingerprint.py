"""The key of a teacher cache: digests of everything the cached outputs depend on (see `hf_distill.cache`)."""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import types
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset
from torch import nn

from .spec import CACHE_FORMAT_VERSION, CACHE_PREFIX, LABEL_COLUMNS, TeacherCacheSpec

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
_MAX_DEPTH = 4  # how deep `describe` looks into the attributes of objects it does not know


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


def _is_tokenizer(value: Any) -> bool:
    return isinstance(value, transformers.PreTrainedTokenizerBase) or (
        hasattr(value, "get_vocab") and hasattr(value, "pad") and hasattr(value, "padding_side")
    )


def _qualname(value: Any) -> str:
    kind = value if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)) else type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able, address-free description of a collator or one of its settings, for the cache key.

    Plain values are kept; a tokenizer is described by what it does (`tokenizer_digest`, padding side, pad id,
    input names), never by its repr; a model by its config; a function by its qualified name, defaults and closure;
    any other object by its class and public attributes.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return describe(value.value, depth)
    if isinstance(value, (list, tuple)):
        return [describe(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((describe(v, depth + 1) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if _is_tokenizer(value):
        return {
            "tokenizer": tokenizer_digest(value),
            "padding_side": getattr(value, "padding_side", None),
            "pad_token_id": getattr(value, "pad_token_id", None),
            "model_input_names": list(getattr(value, "model_input_names", [])),
        }
    if isinstance(value, nn.Module):
        return {"model": teacher_config_digest(value)}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"array": _digest(np.ascontiguousarray(np.asarray(value.cpu() if torch.is_tensor(value) else value)))}
    if isinstance(value, functools.partial):
        return {
            "partial": describe(value.func, depth + 1),
            "args": describe(value.args, depth + 1),
            "keywords": describe(value.keywords, depth + 1),
        }
    if isinstance(value, types.FunctionType):
        closure = [cell.cell_contents for cell in value.__closure__ or ()]
        return {
            "function": _qualname(value),
            "defaults": describe(value.__defaults__, depth + 1),
            "kwdefaults": describe(value.__kwdefaults__, depth + 1),
            "closure": describe(closure, depth + 1),
        }
    if isinstance(value, (type, types.BuiltinFunctionType)):
        return {"class": _qualname(value)}
    if isinstance(value, types.MethodType):
        return {"method": _qualname(value.__func__), "of": describe(value.__self__, depth + 1)}
    settings = getattr(value, "__dict__", None)
    if depth >= _MAX_DEPTH or settings is None:
        return {"class": _qualname(value)}
    # Private attributes are bookkeeping (e.g. DataCollatorForLanguageModeling's `_generator_pid`).
    public = {k: v for k, v in settings.items() if not k.startswith("_")}
    return {"class": _qualname(value), "settings": describe(public, depth + 1)}


def collator_tokenizer(collator) -> Any:
    """The tokenizer a collator pads with, if it has one (`collator.tokenizer`, also through a `functools.partial`)."""
    while isinstance(collator, functools.partial):
        collator = collator.func
    tokenizer = getattr(collator, "tokenizer", None)
    return tokenizer if _is_tokenizer(tokenizer) else None


def resolve_padding_side(collator, tokenizer=None, padding_side: str | None = None) -> str:
    """Where `collator` pads: `padding_side` if given, else its tokenizer's, else `tokenizer`'s, else right."""
    side = padding_side
    for source in (collator_tokenizer(collator), tokenizer):
        side = side or getattr(source, "padding_side", None)
    side = side or "right"
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}.")
    return side


def teacher_input_columns(teacher: nn.Module, dataset: Dataset) -> list[str]:
    """The dataset columns the teacher's forward takes (its inputs), labels excluded: they never change its outputs."""
    accepted = set(inspect.signature(teacher.forward).parameters)
    columns = [
        c for c in dataset.column_names if c in accepted and c not in LABEL_COLUMNS and not c.startswith(CACHE_PREFIX)
    ]
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
            values = np.asarray(array)
            if values.dtype == object:  # strings / bytes: hash their contents, not the addresses of Python objects
                for value in array.to_pylist():
                    data = b"\xff" if value is None else value.encode() if isinstance(value, str) else bytes(value)
                    h.update(len(data).to_bytes(8, "little") + data)
            else:
                h.update(values.tobytes())
    return h.hexdigest()


def spec_key(spec: TeacherCacheSpec) -> dict:
    """The spec's part of the cache key. The sparse form's fields (`top_k_tail`, `temperature`) enter it only when the
    sparse form is asked for, so the caches of every other spec keep the keys they had before those fields existed."""
    key = asdict(spec)
    if not spec.top_k_tail:
        key.pop("top_k_tail")
        key.pop("temperature")
    return key


def teacher_cache_fingerprint(
    teacher: nn.Module,
    tokenizer,
    dataset: Dataset,
    spec: TeacherCacheSpec,
    max_length: int | None = None,
    *,
    collator=None,
    padding_side: str | None = None,
    columns: list[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The key of a teacher cache and the components it was computed from (see the module docstring).

    Args:
        teacher, tokenizer, dataset, spec, max_length: as for `build_teacher_cache`.
        collator: the collator the teacher's inputs come from: its class and settings are part of the key.
        padding_side: where it pads (default: as `build_teacher_cache` resolves it).
        columns: the data columns whose contents are hashed (default: the teacher's input columns,
            `teacher_input_columns`).

    Returns:
        `(fingerprint, components)`: a hex SHA-256 and a JSON-able dict of one digest or value per input.
    """
    columns = list(columns) if columns is not None else teacher_input_columns(teacher, dataset)
    components = {
        "format": CACHE_FORMAT_VERSION,
        "teacher_weights": teacher_weights_digest(teacher),
        "teacher_config": teacher_config_digest(teacher),
        "tokenizer": tokenizer_digest(tokenizer),
        "data": data_digest(dataset, columns),
        "data_columns": columns,
        "num_rows": len(dataset),
        "max_length": max_length,
        "spec": spec_key(spec),
        "collator": describe(collator) if collator is not None else None,
        "padding_side": resolve_padding_side(collator, tokenizer, padding_side),
    }
    return _digest(json.dumps(components, sort_keys=True)), components
