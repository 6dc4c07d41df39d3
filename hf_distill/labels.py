"""Labels: check a task's label column and encode it for training; agree it with the models' heads and configs.

The label column's type decides the task (`DataArguments.problem_type` can force it):

- integer ids `0..K-1`: single-label classification, kept as they are;
- class names (strings such as `World` / `Sports`): single-label classification; the names are mapped to ids in
  sorted order of the unique names of the whole train file (before `max_train_samples`), so `Business, Sports, World`
  become 0, 1, 2 whatever the row order. The column becomes a `datasets.ClassLabel`, which carries the names to
  [`label_info`] and from there to the models' `id2label` / `label2id` ([`apply_label_info`]);
- floats (a csv/tsv/json column such as `0.5`, `3.8`): regression, stored as float32;
- lists (json/jsonl only): multi-label classification, either multi-hot vectors of 0/1 per class (`[0, 1, 1]`, every
  row the same length; soft targets in [0, 1] are allowed) or lists of class names (`["World", "Sports"]`, `[]` for
  none), mapped to ids like single names. `tokenize_dataset` turns both into float32 multi-hot `labels`.

An eval label that the train split never uses, an empty label, a column mixing kinds, or a file without rows is
refused with a ValueError naming the column, the split, the value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from datasets import ClassLabel, Dataset, DatasetDict, List, Sequence, Value

from .config import PROBLEM_TYPES

SINGLE, REGRESSION, MULTI = PROBLEM_TYPES
KIND_WORDS = {
    "int": "integer ids",
    "float": "floats",
    "str": "class names",
    "class": "class ids",
    "multi_hot": "lists of 0/1 per class",
    "multi_str": "lists of class names",
    "multi_class": "lists of class ids",
}
LABEL_KINDS_HINT = (
    "Use one kind per column: class names, integer ids 0..K-1, floats (regression), or json lists (multi-label)."
)


@dataclass(frozen=True)
class LabelInfo:
    """What the label column holds, as the models' configs need it.

    Args:
        problem_type: `single_label_classification`, `regression` or `multi_label_classification` (the values of
            `PretrainedConfig.problem_type`).
        num_labels: size of the models' head (1 for regression).
        names: class names in id order when the data has them (string labels, `ClassLabel` columns), else `None`.
    """

    problem_type: str
    num_labels: int
    names: tuple[str, ...] | None = None

    @property
    def id2label(self) -> dict[int, str] | None:
        return None if self.names is None else dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.names is None else {name: i for i, name in enumerate(self.names)}


def list_item_feature(feature):
    """The item feature of a list column (`List` / `Sequence`), or None for any other column."""
    return feature.feature if isinstance(feature, (List, Sequence)) else None


def _kind(feature, values: list) -> str | None:
    """The kind of a label column (a key of KIND_WORDS), or None when it mixes kinds or is of no supported type."""
    inner = list_item_feature(feature)
    if isinstance(feature, ClassLabel):
        return "class"
    if isinstance(inner, ClassLabel):
        return "multi_class"
    if isinstance(feature, Value):
        dtype = feature.dtype
        if dtype == "bool" or "int" in dtype:
            return "int"
        if "float" in dtype or dtype == "double":
            return "float"
        if "string" in dtype:
            # A csv column with both ids and names ('1', 'World') loads as strings: refuse the mix, read all-numeric
            # strings as numbers.
            numeric = [_as_number(v) is not None for v in values]
            if all(numeric):
                return "int" if all(float(_as_number(v)).is_integer() for v in values) else "float"
            return "str" if not any(numeric) else None
        return None
    if isinstance(inner, Value):
        if inner.dtype == "bool" or "int" in inner.dtype or "float" in inner.dtype or inner.dtype == "double":
            return "multi_hot"
        if "string" in inner.dtype:
            return "multi_str"
    return None


def _as_number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _where(split: str, sources: dict[str, str]) -> str:
    return f"the {split} split ({sources[split]})" if split in sources else f"the {split} split"


def _check_filled(d: Dataset, column: str, split: str, sources: dict[str, str]) -> list:
    values = d[column]
    values = list(values)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(
                f"label_column={column!r} is empty in row {i + 1} of {_where(split, sources)} (rows counted from 1, "
                "header excluded). Every row needs a label: fill it in or drop the row."
            )
    return values


def _mixed_error(column: str, split: str, sources: dict[str, str], values: list) -> ValueError:
    seen: dict[str, tuple[int, object]] = {}
    for i, v in enumerate(values):
        key = "number" if _as_number(v) is not None and not isinstance(v, (list, dict)) else type(v).__name__
        seen.setdefault(key, (i, v))
    examples = " and ".join(f"{v!r} in row {i + 1}" for i, v in list(seen.values())[:2])
    detail = f": {examples}" if len(seen) > 1 else f" (e.g. {examples})"
    return ValueError(
        f"label_column={column!r} mixes label kinds or has an unsupported type in {_where(split, sources)}{detail}. "
        + LABEL_KINDS_HINT
    )


def encode_labels(
    ds: DatasetDict, label_column: str, problem_type: str | None = None, sources: dict[str, str] | None = None
) -> DatasetDict:
    """Check the label column of every split and encode it for training (see the module docstring).

    Args:
        ds: the raw splits, `train` first when there is one (it decides the label names).
        label_column: the column holding the labels.
        problem_type: one of `PROBLEM_TYPES` to force a task (e.g. `regression` on integer scores), or `None` to infer
            it from the column.
        sources: optional `split -> field` names used in error messages (e.g. `{"eval": "validation_file"}`).

    Returns:
        The splits with class names as `ClassLabel` ids (lists of names as lists of ids), floats as float32, multi-hot
        lists as float32 lists and integer ids unchanged.
    """
    sources = sources or {}
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}.")
    values = {split: _check_filled(d, label_column, split, sources) for split, d in ds.items()}
    kinds = {}
    for split, d in ds.items():
        kinds[split] = _kind(d.features[label_column], values[split])
        if kinds[split] is None:
            raise _mixed_error(label_column, split, sources, values[split])
    ref = "train" if "train" in ds else next(iter(ds))
    kind = kinds[ref]
    # Integer ids next to floats is fine (0 and 0.5 are both regression targets); anything else must agree.
    compatible = {kind} | ({"int", "float"} if kind in ("int", "float") else set())
    for split, other in kinds.items():
        if other not in compatible:
            raise ValueError(
                f"label_column={label_column!r} holds {KIND_WORDS[kind]} in {_where(ref, sources)} but "
                f"{KIND_WORDS[other]} in {_where(split, sources)}. Use the same kind of label in every split."
            )
    # A float column is regression even when its values are whole ('1.0'), unless problem_type says otherwise.
    task = problem_type or {"int": SINGLE, "class": SINGLE, "str": SINGLE, "float": REGRESSION}.get(kind, MULTI)
    _check_task(task, kind, label_column, ref, sources, problem_type)

    if task == REGRESSION:
        return DatasetDict({s: d.cast_column(label_column, Value("float32")) for s, d in ds.items()})
    if kind == "float":  # problem_type=single_label_classification on integral floats
        for split, vs in values.items():
            bad = next((v for v in vs if not float(v).is_integer()), None)
            if bad is not None:
                raise ValueError(
                    f"problem_type={problem_type!r} needs integer class ids, but label_column={label_column!r} has "
                    f"{bad!r} in {_where(split, sources)}. Use problem_type='regression' for real-valued targets."
                )
        kind = "int"
    if kind == "int":
        return _encode_ids(ds, values, label_column, ref, sources)
    if kind == "class":
        return _check_class_ids(ds, values, label_column, ref, sources)
    if kind in ("str", "multi_str"):
        return _encode_names(ds, values, label_column, ref, sources, multi=kind == "multi_str")
    if kind == "multi_hot":
        return _encode_multi_hot(ds, values, label_column, ref, sources)
    names = ds[ref].features[label_column].feature.names  # multi_class: lists of ClassLabel ids (Hub datasets)
    for split, d in ds.items():
        if d.features[label_column].feature.names != names:
            raise ValueError(
                f"label_column={label_column!r} has classes {d.features[label_column].feature.names} in "
                f"{_where(split, sources)} but {names} in {_where(ref, sources)}. Use one label set for all splits."
            )
    return ds


def _check_task(task: str, kind: str, column: str, ref: str, sources: dict, problem_type: str | None) -> None:
    multi = kind.startswith("multi")
    if task == MULTI and not multi:
        raise ValueError(
            f"problem_type={problem_type!r} needs a list label column, but label_column={column!r} holds "
            f"{KIND_WORDS[kind]} in {_where(ref, sources)}. Write the labels as json/jsonl lists, either 0/1 per "
            'class ([0, 1, 1]) or class names (["World", "Sports"]).'
        )
    if task != MULTI and multi:
        raise ValueError(
            f"problem_type={problem_type!r} needs one label per row, but label_column={column!r} holds "
            f"{KIND_WORDS[kind]} in {_where(ref, sources)}. Use problem_type='multi_label_classification' or None."
        )
    if task == REGRESSION and kind in ("str", "class"):
        raise ValueError(
            f"problem_type='regression' needs numeric labels, but label_column={column!r} holds {KIND_WORDS[kind]} "
            f"in {_where(ref, sources)}. Use problem_type='single_label_classification' or None for classes."
        )


def _unseen_error(label, column: str, split: str, ref: str, sources: dict, known) -> ValueError:
    return ValueError(
        f"label {label!r} of label_column={column!r} in {_where(split, sources)} never occurs in "
        f"{_where(ref, sources)}, whose labels are {list(known)}. A model cannot learn a class it never sees: add "
        f"{ref} rows with it, drop those {split} rows, or fix its spelling."
    )


def _encode_ids(ds: DatasetDict, values: dict, column: str, ref: str, sources: dict) -> DatasetDict:
    known = sorted({int(float(v)) for v in values[ref]})
    for split, vs in values.items():
        for i, v in enumerate(vs):
            if int(float(v)) < 0:
                raise ValueError(
                    f"label_column={column!r} has {v!r} in row {i + 1} of {_where(split, sources)}: class ids must "
                    "be >= 0 (-1 marks unlabelled rows, as in GLUE's test splits). Evaluate and train on labelled "
                    "splits (e.g. eval_split='validation')."
                )
        unseen = sorted({int(float(v)) for v in vs} - set(known))
        if unseen:
            raise _unseen_error(unseen[0], column, split, ref, sources, known)
    return DatasetDict(
        {s: d if "int" in d.features[column].dtype else d.cast_column(column, Value("int64")) for s, d in ds.items()}
    )


def _check_class_ids(ds: DatasetDict, values: dict, column: str, ref: str, sources: dict) -> DatasetDict:
    names = ds[ref].features[column].names
    for split, d in ds.items():
        if d.features[column].names != names:
            raise ValueError(
                f"label_column={column!r} has classes {d.features[column].names} in {_where(split, sources)} but "
                f"{names} in {_where(ref, sources)}. Use one label set for all splits."
            )
        bad = next(((i, v) for i, v in enumerate(values[split]) if not 0 <= v < len(names)), None)
        if bad is not None:
            raise ValueError(
                f"label_column={column!r} has {bad[1]!r} in row {bad[0] + 1} of {_where(split, sources)}, outside its "
                f"classes 0..{len(names) - 1} {names} (-1 marks unlabelled rows, as in GLUE's test splits). "
                "Train and evaluate on labelled splits (e.g. eval_split='validation')."
            )
    return ds


def _encode_names(ds: DatasetDict, values: dict, column: str, ref: str, sources: dict, multi: bool) -> DatasetDict:
    def flat(vs):
        return [x for v in vs for x in v] if multi else list(vs)

    names = sorted(set(flat(values[ref])))
    if not names:
        raise ValueError(
            f"label_column={column!r} has only empty lists in {_where(ref, sources)}: no class to learn. "
            "Give each row the names of its classes, e.g. ['World', 'Sports']."
        )
    for split, vs in values.items():
        unseen = sorted(set(flat(vs)) - set(names))
        if unseen:
            raise _unseen_error(unseen[0], column, split, ref, sources, names)
    feature = List(ClassLabel(names=names)) if multi else ClassLabel(names=names)
    if not multi and ds[ref].features[column].dtype != "string":
        ds = DatasetDict({s: d.cast_column(column, Value("string")) for s, d in ds.items()})
    return DatasetDict({s: d.cast_column(column, feature) for s, d in ds.items()})


def _encode_multi_hot(ds: DatasetDict, values: dict, column: str, ref: str, sources: dict) -> DatasetDict:
    width = len(values[ref][0])
    for split, vs in values.items():
        for i, v in enumerate(vs):
            if len(v) != width:
                raise ValueError(
                    f"label_column={column!r} has a list of {len(v)} values in row {i + 1} of "
                    f"{_where(split, sources)}, but {width} in row 1 of {_where(ref, sources)}. A multi-hot label has "
                    "one 0/1 value per class in every row: pad the lists to the number of classes."
                )
            bad = next((x for x in v if x is None or not 0 <= x <= 1), "ok")
            if bad != "ok":
                raise ValueError(
                    f"label_column={column!r} has {bad!r} in row {i + 1} of {_where(split, sources)}: multi-hot "
                    "labels are 0/1 per class (soft targets in [0, 1]). Use lists of class names for class names."
                )
    if width == 0:
        raise ValueError(
            f"label_column={column!r} has empty lists in {_where(ref, sources)}: multi-hot labels need one value per "
            "class. Give each row a list of 0/1 values, one per class."
        )
    return DatasetDict({s: d.cast_column(column, List(Value("float32"))) for s, d in ds.items()})


def label_info(ds: DatasetDict | Dataset, label_column: str = "labels") -> LabelInfo:
    """The task, head size and class names of an encoded label column (after [`load_task_dataset`]).

    Integer ids without names give `max id + 1` classes over the splits; float columns are regression (1 output);
    list columns are multi-label (their width, or their class names).
    """
    splits = list(ds.values()) if isinstance(ds, DatasetDict) else [ds]
    feature = splits[0].features[label_column]
    inner = list_item_feature(feature)
    if isinstance(feature, ClassLabel):
        return LabelInfo(SINGLE, feature.num_classes, tuple(feature.names))
    if isinstance(inner, ClassLabel):
        return LabelInfo(MULTI, inner.num_classes, tuple(inner.names))
    if inner is not None:
        return LabelInfo(MULTI, max(len(row) for d in splits for row in d[label_column][:1]))
    if isinstance(feature, Value) and "float" in feature.dtype:
        return LabelInfo(REGRESSION, 1)
    return LabelInfo(SINGLE, max(int(max(d[label_column])) for d in splits) + 1)


def num_labels_of(ds: DatasetDict, label_column: str = "labels") -> int:
    """Size of the models' head for this data: the number of classes (1 for regression). See [`label_info`]."""
    return label_info(ds, label_column).num_labels


def _explicit_names(config) -> tuple[str, ...] | None:
    """A config's class names, or None when they are the defaults transformers writes (`LABEL_0`, `LABEL_1`, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(str(id2label[i]) for i in sorted(id2label, key=int))
    return None if names == tuple(f"LABEL_{i}" for i in range(len(names))) else names


def apply_label_info(ds: DatasetDict, label_column: str, teacher, student=None) -> DatasetDict:
    """Agree the data's labels with the teacher's head and record them in the teacher's and student's configs.

    A teacher with its own class names (a non-default `id2label`) decides the ids: data names that match them (case
    aside) are re-numbered to the teacher's order; names that differ are refused naming both. Otherwise the data's
    names (if any) are written to both configs' `id2label` / `label2id`, with `problem_type`, so they are saved with
    the student. Call it after the models are loaded and before tokenizing.

    Returns:
        The splits, re-numbered to the teacher's order where needed.
    """
    info = label_info(ds, label_column)
    teacher_names = _explicit_names(teacher.config)
    names = info.names
    if names is not None and teacher_names is not None and names != teacher_names:
        order = {name.casefold(): i for i, name in enumerate(teacher_names)}
        if sorted(order) != sorted(n.casefold() for n in names):
            raise ValueError(
                f"the data's labels {list(names)} (label_column={label_column!r}) differ from the teacher's id2label "
                f"{list(teacher_names)}: its head predicts those classes. Rename the data's labels to the teacher's "
                "names, or distil from a teacher fine-tuned on these labels."
            )
        ds = _renumber(ds, label_column, [order[n.casefold()] for n in names], teacher_names)
        info = label_info(ds, label_column)
    names = info.names or teacher_names
    teacher_task = getattr(teacher.config, "problem_type", None)
    if teacher_task is not None and teacher_task != info.problem_type:
        raise ValueError(
            f"the teacher's problem_type is {teacher_task!r} but the data's labels (label_column={label_column!r}) "
            f"make it {info.problem_type!r}. Pass labels of the teacher's task, or set problem_type to "
            f"{teacher_task!r} if the data allows it."
        )
    for role, model in (("teacher", teacher), ("student", student)):
        if model is None:
            continue
        head = model.config.num_labels
        if head != info.num_labels:
            raise ValueError(
                f"the data has {info.num_labels} label(s) ({info.problem_type}, label_column={label_column!r}) but "
                f"the {role}'s head has num_labels={head}. Use a {role} with {info.num_labels} outputs, or fix the "
                "labels."
            )
        own = _explicit_names(model.config)
        if role == "student" and own is not None and names is not None and own != names:
            raise ValueError(
                f"the student's id2label {list(own)} differs from the teacher's/data's {list(names)}: logit "
                "distillation compares the heads class by class. Use a student with the teacher's label order."
            )
        if names is not None:
            model.config.id2label = dict(enumerate(names))
            model.config.label2id = {name: i for i, name in enumerate(names)}
        model.config.problem_type = info.problem_type
    return ds


def _renumber(ds: DatasetDict, column: str, new_ids: list[int], names: tuple[str, ...]) -> DatasetDict:
    multi = isinstance(list_item_feature(ds[next(iter(ds))].features[column]), ClassLabel)
    feature = List(ClassLabel(names=list(names))) if multi else ClassLabel(names=list(names))

    def renumber(batch):
        col = batch[column]
        # A negative id (-1: an unlabelled transfer-set row, see `hf_distill.data`) is no class and stays as it is.
        batch[column] = (
            [[new_ids[x] for x in row] for row in col] if multi else [new_ids[x] if x >= 0 else x for x in col]
        )
        return batch

    out = {}
    for split, d in ds.items():
        plain = d.cast_column(column, List(Value("int64")) if multi else Value("int64"))
        out[split] = plain.map(renumber, batched=True, desc=f"Renumbering {split} labels").cast_column(column, feature)
    return DatasetDict(out)
