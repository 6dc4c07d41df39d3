"""`FlatListTorchFormatter` returns exactly what `datasets`' torch formatter returns, only faster.

Every way a trainer or a user reads a cache-attached dataset (a batch of rows by `__getitems__`, a slice, a column, one
row), on every kind of column (ragged and uniform flat lists of each float and integer width, nested lists, strings,
scalars, null values), on plain, sliced, selected, shuffled and multi-chunk datasets: the same values, dtypes and
shapes, and the same container (a stacked tensor where every row has one shape, a list of tensors where they differ).
"""

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets

from hf_distill.cache import formatting
from hf_distill.cache.formatting import FORMAT_TYPE, _flat_number_list


def _columns(rows: int) -> tuple[dict, Features]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 6, size=rows)
    data, features = {}, {}
    for dtype in ("float16", "float32", "float64", "int8", "int32", "int64", "uint16", "uint32", "uint8"):
        data[f"ragged_{dtype}"] = [(rng.standard_normal(n) * 50).astype(dtype).tolist() for n in lengths]
        data[f"uniform_{dtype}"] = [(rng.standard_normal(3) * 50).astype(dtype).tolist() for _ in range(rows)]
        features[f"ragged_{dtype}"] = List(Value(dtype))
        features[f"uniform_{dtype}"] = List(Value(dtype))
    data["nested"] = [[[float(i)] * 2] * int(n) for i, n in enumerate(lengths)]
    features["nested"] = List(List(Value("float32")))
    data["null_value"] = [[1.0, None] if i == 2 else [1.0, 2.0] for i in range(rows)]
    features["null_value"] = List(Value("float32"))
    data["flags"] = [[True, i % 2 == 0] for i in range(rows)]
    features["flags"] = List(Value("bool"))
    data["text"] = [f"row {i}" for i in range(rows)]
    features["text"] = Value("string")
    data["label"] = list(range(rows))
    features["label"] = Value("int64")
    return data, Features(features)


def _same(ours, theirs, where: str) -> None:
    assert type(ours) is type(theirs), f"{where}: {type(ours)} != {type(theirs)}"
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for key in theirs:
            _same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


def _datasets():
    data, features = _columns(12)
    base = Dataset.from_dict(data, features=features)
    yield "plain", base
    yield "sliced", base.select(range(3, 11))
    yield "selected", base.select([7, 2, 2, 9, 0])
    yield "shuffled", base.shuffle(seed=1)
    halves = [Dataset.from_dict({k: v[:6] for k, v in data.items()}, features=features)]
    halves.append(Dataset.from_dict({k: v[6:] for k, v in data.items()}, features=features))
    chunked = concatenate_datasets(halves)
    assert chunked.data.column(0).num_chunks == 2
    yield "two chunks", chunked


@pytest.mark.parametrize("columns", [None, "lists"], ids=["all columns", "some columns + output_all_columns"])
@pytest.mark.parametrize("name,dataset", list(_datasets()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_read_equals_the_torch_formatter(name, dataset, columns):
    if columns == "lists":
        columns = [c for c in dataset.column_names if c.startswith(("ragged", "uniform", "nested"))]
        ours = dataset.with_format(FORMAT_TYPE, columns=columns, output_all_columns=True)
        theirs = dataset.with_format("torch", columns=columns, output_all_columns=True)
    else:
        ours, theirs = dataset.with_format(FORMAT_TYPE), dataset.with_format("torch")
    n = len(dataset)
    for keys in ([0, 1, 2], [n - 1, 0, n - 1], [1]):
        _same(ours.__getitems__(keys), theirs.__getitems__(keys), f"{name} __getitems__({keys})")
    _same(ours[0:n], theirs[0:n], f"{name} [0:{n}]")
    _same(ours[1:3], theirs[1:3], f"{name} [1:3]")
    _same(ours[2], theirs[2], f"{name} [2]")
    for column in ("ragged_float16", "uniform_int32", "text"):
        _same(ours[column][:], theirs[column][:], f"{name} [{column!r}]")


def test_the_fast_path_is_taken_and_its_tensors_are_writable(monkeypatch):
    converted = []
    original = formatting._batch_tensors
    monkeypatch.setattr(formatting, "_batch_tensors", lambda column: converted.append(column.type) or original(column))
    data, features = _columns(8)
    dataset = Dataset.from_dict(data, features=features).with_format(FORMAT_TYPE)
    rows = dataset.__getitems__([0, 1, 2])
    assert len(converted) == 18  # the ragged and uniform columns of 9 dtypes, one conversion each for the batch
    for row in rows:
        row["ragged_float16"].add_(1)  # the memory-mapped Arrow buffer is read-only; ours are copies
    batch = dataset[0:8]
    assert isinstance(batch["uniform_float16"], torch.Tensor) and batch["uniform_float16"].dtype == torch.float32
    assert isinstance(batch["ragged_int32"], list) and batch["ragged_int32"][0].dtype == torch.int64


def test_a_requested_dtype_is_left_to_the_torch_formatter():
    data, features = _columns(4)
    dataset = Dataset.from_dict(data, features=features)
    ours = dataset.with_format(FORMAT_TYPE, dtype=torch.float64)
    theirs = dataset.with_format("torch", dtype=torch.float64)
    _same(ours[0:4], theirs[0:4], "dtype=float64")


def test_only_flat_number_lists_without_nulls_take_the_fast_path():
    def column(values, kind):
        return pa.chunked_array([pa.array(values, type=kind)])

    assert _flat_number_list(column([[1.0], [2.0, 3.0]], pa.list_(pa.float16())))
    assert _flat_number_list(column([[1], []], pa.large_list(pa.int32())))
    assert not _flat_number_list(column([None, [2.0]], pa.list_(pa.float32())))  # a null row
    assert not _flat_number_list(column([[None], [2.0]], pa.list_(pa.float32())))  # a null value
    assert not _flat_number_list(column([[1], [2]], pa.list_(pa.uint64())))  # no torch dtype for it
    assert not _flat_number_list(column([[True]], pa.list_(pa.bool_())))
    assert not _flat_number_list(column([[[1.0]]], pa.list_(pa.list_(pa.float32()))))
    assert not _flat_number_list(column([1.0], pa.float32()))
