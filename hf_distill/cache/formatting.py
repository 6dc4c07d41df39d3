"""Reading cached rows fast: `datasets`' torch formatting, with one conversion per column for flat number lists.

A cache row holds its tensors as flat 1-D lists (`hf_distill.cache`), and `datasets`' torch formatter turns a batch of
them into tensors one row at a time (`torch.tensor` on each row's numpy view, with its dtype checks): for a batch of
32 rows and 7 cached columns that is 224 conversions, about 5 ms a step on this CPU, a few percent of a small
student's training step, paid on every step of a run that is meant to cost no more than the student alone.

`FlatListTorchFormatter` is the torch formatter with one change: a column of flat lists of integers or floats (no
nulls, no nesting) is converted for the whole batch at once (the Arrow values buffer -> one numpy array -> one
tensor) and handed out as per-row views of it. What it returns is what the torch formatter returns, value for value
and dtype for dtype (floats as float32, integers as int64; a column whose rows all have one length stacked into one
tensor, a ragged one as a list of 1-D tensors); every other column, and rows read one at a time, go through the torch
formatter itself. `tests/test_cache_formatting.py` compares the two on every kind of column and selection.

It is registered with `datasets` under the format type `"hf_distill_torch"` when this module is imported (which
importing `hf_distill` does); `attach_teacher_cache` formats the cache columns with it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import torch
from datasets.formatting import _register_formatter
from datasets.formatting.torch_formatter import TorchFormatter

FORMAT_TYPE = "hf_distill_torch"


def _flat_number_list(column: pa.ChunkedArray) -> bool:
    """A list (or large list) column of integers or floats, with no null rows and no null values."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return False
    value = kind.value_type
    numeric = pa.types.is_floating(value) or (pa.types.is_integer(value) and not pa.types.is_uint64(value))
    if not numeric or column.null_count:
        return False
    return all(chunk.values.null_count == 0 for chunk in column.chunks)


def _batch_tensors(column: pa.ChunkedArray) -> torch.Tensor | list[torch.Tensor]:
    """The torch formatter's output for one flat number-list column, from one conversion of its values."""
    array = column.combine_chunks()
    lengths = array.value_lengths().to_numpy()
    values = np.asarray(array.flatten())  # respects the array's slice; read-only when memory-mapped
    target = np.float32 if pa.types.is_floating(column.type.value_type) else np.int64
    flat = torch.from_numpy(values.astype(target))  # astype copies: the tensor owns writable memory
    if len(lengths) and (lengths == lengths[0]).all():  # the torch formatter stacks rows of one shape
        return flat.view(len(lengths), int(lengths[0]))
    return list(torch.split(flat, lengths.tolist()))


class FlatListTorchFormatter(TorchFormatter):
    """`datasets`' `TorchFormatter`, converting flat number-list columns once per batch instead of once per row."""

    def format_batch(self, pa_table: pa.Table) -> Mapping:
        if self.torch_tensor_kwargs or pa_table.num_rows == 0:  # a dtype or device asked for: the torch formatter's
            return super().format_batch(pa_table)
        fast = [name for name in pa_table.column_names if _flat_number_list(pa_table.column(name))]
        rest = [name for name in pa_table.column_names if name not in fast]
        formatted = super().format_batch(pa_table.select(rest)) if rest else {}
        for name in fast:
            formatted[name] = _batch_tensors(pa_table.column(name))
        return {name: formatted[name] for name in pa_table.column_names}


_register_formatter(FlatListTorchFormatter, FORMAT_TYPE)
