"""Loading task data: string class labels, float (regression) and multi-label labels from files, label checks."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill import (
    DataArguments,
    apply_label_info,
    classification_metrics,
    label_info,
    load_task_dataset,
    num_labels_of,
    tokenize_dataset,
)


def write_tsv(path, rows, header="sentence\tlabel"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load(train, dev=None, **kw):
    return load_task_dataset(DataArguments(train_file=train, validation_file=dev, **kw))


def model(num_labels=3, id2label=None, problem_type=None):
    torch.manual_seed(0)
    extra = {"id2label": id2label, "num_labels": len(id2label)} if id2label else {"num_labels": num_labels}
    config = tiny_bert_config(num_layers=2, hidden=16, problem_type=problem_type, **extra)
    return BertForSequenceClassification(config)


def collate(ds, tokenizer):
    return DataCollatorWithPadding(tokenizer)([ds[i] for i in range(len(ds))])


# ---------------------------------------------------------------------- single-label classification
def test_string_labels_map_to_sorted_train_names(tmp_path, tiny_tokenizer):
    train = write_tsv(
        tmp_path / "train.tsv", ["a good film\tWorld", "the plot\tSports", "bad\tBusiness", "fun\tWorld"]
    )
    dev = write_tsv(tmp_path / "dev.tsv", ["great\tSports", "dull\tWorld"])
    ds = load(train, dev)
    # Sorted unique names of the train file decide the ids, whatever the row order.
    assert ds["train"]["label"] == [2, 1, 0, 2]
    assert ds["eval"]["label"] == [1, 2]
    info = label_info(ds, "label")
    assert info == label_info(ds["train"], "label")
    assert (info.problem_type, info.num_labels, info.names) == (
        "single_label_classification",
        3,
        ("Business", "Sports", "World"),
    )
    assert info.id2label == {0: "Business", 1: "Sports", 2: "World"}
    assert info.label2id == {"Business": 0, "Sports": 1, "World": 2}
    assert num_labels_of(ds, "label") == 3
    tok = tokenize_dataset(ds, tiny_tokenizer, DataArguments(train_file=train))
    assert tok["train"]["labels"] == [2, 1, 0, 2]
    assert label_info(tok, "labels").names == ("Business", "Sports", "World")  # the names survive tokenization
    assert collate(tok["train"], tiny_tokenizer)["labels"].dtype == torch.long


def test_mapping_comes_from_the_whole_train_file_not_the_subset(tmp_path):
    rows = [f"w{i}\t{name}" for i, name in enumerate(["c", "a", "b", "a", "c", "b"])]
    ds = load(write_tsv(tmp_path / "train.tsv", rows), max_train_samples=1)
    assert len(ds["train"]) == 1
    assert label_info(ds, "label").names == ("a", "b", "c")


def test_integer_labels_stay_as_they_are(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\t1", "b\t0", "c\t2"]), write_tsv(tmp_path / "dev.tsv", ["d\t2"]))
    assert ds["train"]["label"] == [1, 0, 2] and ds["eval"]["label"] == [2]
    info = label_info(ds, "label")
    assert (info.problem_type, info.num_labels, info.names) == ("single_label_classification", 3, None)


def test_numeric_strings_in_json_are_ids(tmp_path):
    ds = load(
        write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "label": "1"}, {"sentence": "b", "label": "0"}])
    )
    assert ds["train"]["label"] == [1, 0]
    assert label_info(ds, "label").names is None


@pytest.mark.parametrize(
    "train_rows,dev_rows,match",
    [
        (
            ["a\tWorld", "b\tSports"],
            ["c\tScience"],
            r"label 'Science' of label_column='label' in the eval split \(validation_file\) never occurs in the "
            r"train split \(train_file\), whose labels are \['Sports', 'World'\]",
        ),
        (["a\t0", "b\t1"], ["c\t2"], r"label 2 of label_column='label' in the eval split .*whose labels are \[0, 1\]"),
    ],
    ids=["names", "ids"],
)
def test_eval_label_unseen_in_train_is_refused(tmp_path, train_rows, dev_rows, match):
    with pytest.raises(ValueError, match=match + r".*add train rows with it, drop those eval rows"):
        load(write_tsv(tmp_path / "train.tsv", train_rows), write_tsv(tmp_path / "dev.tsv", dev_rows))


def test_mixed_labels_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"label_column='label' mixes label kinds .*train split \(train_file\): "
        r"'1' in row 1 and 'World' in row 2\. Use one kind per column",
    ):
        load(write_tsv(tmp_path / "train.tsv", ["a\t1", "b\tWorld"]))
    with pytest.raises(ValueError, match=r"mixes label kinds.*1 in row 1 and 'World' in row 2"):
        load(write_jsonl(tmp_path / "t.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": "World"}]))


def test_splits_with_different_label_kinds_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"holds class names in the train split .* but integer ids in the eval split"):
        load(write_tsv(tmp_path / "train.tsv", ["a\tWorld"]), write_tsv(tmp_path / "dev.tsv", ["b\t0"]))


def test_empty_label_is_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"label_column='label' is empty in row 2 of the train split \(train_file\).*"
        r"fill it in or drop the row",
    ):
        load(write_tsv(tmp_path / "train.tsv", ["a\t1", "b\t", "c\t0"]))


@pytest.mark.parametrize("content", ["sentence\tlabel\n", "", "\n\n"], ids=["header-only", "empty", "blank-lines"])
def test_file_without_rows_is_refused(tmp_path, content):
    path = tmp_path / "train.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"train_file='.*train\.tsv' has no data rows.*at least one labelled row"):
        load(str(path))


def test_negative_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has -1 in row 2 of the eval split .*unlabelled rows"):
        load(write_tsv(tmp_path / "train.tsv", ["a\t0", "b\t1"]), write_tsv(tmp_path / "dev.tsv", ["c\t0", "d\t-1"]))


def test_problem_type_must_be_known():
    with pytest.raises(ValueError, match=r"problem_type must be one of .* got 'classification'"):
        DataArguments(train_file="x.tsv", problem_type="classification")


# ---------------------------------------------------------------------- regression
def test_float_labels_load_as_float32_regression(tmp_path, tiny_tokenizer):
    train = write_tsv(tmp_path / "train.tsv", ["a good film\t0.5", "bad\t3.75", "fun\t1"])
    ds = load(train, write_tsv(tmp_path / "dev.tsv", ["dull\t2"]))
    info = label_info(ds, "label")
    assert (info.problem_type, info.num_labels) == ("regression", 1)
    tok = tokenize_dataset(ds, tiny_tokenizer, DataArguments(train_file=train))
    batch = collate(tok["train"], tiny_tokenizer)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [0.5, 3.75, 1.0]
    assert collate(tok["eval"], tiny_tokenizer)["labels"].tolist() == [2.0]
    assert num_labels_of(tok, "labels") == 1


def test_float_labels_from_json(tmp_path):
    rows = [{"sentence": "a", "label": 0.25}, {"sentence": "b", "label": -1.5}]
    ds = load(write_jsonl(tmp_path / "train.json", rows))
    assert label_info(ds, "label").problem_type == "regression"
    assert ds["train"]["label"] == [0.25, -1.5]


def test_integer_scores_as_regression(tmp_path, tiny_tokenizer):
    train = write_tsv(tmp_path / "train.tsv", ["a\t1", "b\t5"])
    ds = load(train, problem_type="regression")
    assert label_info(ds, "label").problem_type == "regression"
    tok = tokenize_dataset(ds, tiny_tokenizer, DataArguments(train_file=train))
    assert collate(tok["train"], tiny_tokenizer)["labels"].dtype == torch.float32


def test_real_valued_labels_refused_as_classes(tmp_path):
    with pytest.raises(ValueError, match=r"needs integer class ids.* has 0\.5 .*problem_type='regression'"):
        load(write_tsv(tmp_path / "train.tsv", ["a\t0.5", "b\t1"]), problem_type="single_label_classification")


# ---------------------------------------------------------------------- multi-label
def test_multi_hot_lists_load_as_float_multi_hot(tmp_path, tiny_tokenizer):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"sentence": "a", "label": [0, 1, 1]}, {"sentence": "b", "label": [1, 0, 0]}]
    )
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "c", "label": [0, 0, 1]}])
    ds = load(train, dev)
    info = label_info(ds, "label")
    assert (info.problem_type, info.num_labels, info.names) == ("multi_label_classification", 3, None)
    tok = tokenize_dataset(ds, tiny_tokenizer, DataArguments(train_file=train))
    batch = collate(tok["train"], tiny_tokenizer)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert num_labels_of(tok, "labels") == 3


def test_lists_of_names_load_as_multi_hot_over_sorted_names(tmp_path, tiny_tokenizer):
    rows = [
        {"sentence": "a", "label": ["World", "Sports"]},
        {"sentence": "b", "label": []},
        {"sentence": "c", "label": ["Arts"]},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    ds = load(train)
    info = label_info(ds, "label")
    assert (info.problem_type, info.num_labels, info.names) == (
        "multi_label_classification",
        3,
        ("Arts", "Sports", "World"),
    )
    tok = tokenize_dataset(ds, tiny_tokenizer, DataArguments(train_file=train))
    assert collate(tok["train"], tiny_tokenizer)["labels"].tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]


def test_multi_hot_rows_of_different_lengths_are_refused(tmp_path):
    rows = [{"sentence": "a", "label": [0, 1, 1]}, {"sentence": "b", "label": [1, 0]}]
    with pytest.raises(
        ValueError, match=r"list of 2 values in row 2 of the train split.*but 3 in row 1.*pad the lists"
    ):
        load(write_jsonl(tmp_path / "train.jsonl", rows))


def test_multi_label_needs_lists(tmp_path):
    with pytest.raises(ValueError, match=r"problem_type='multi_label_classification' needs a list label column.*json"):
        load(write_tsv(tmp_path / "train.tsv", ["a\t1"]), problem_type="multi_label_classification")


# ---------------------------------------------------------------------- labels into the models' configs
def test_names_are_written_to_teacher_and_student_configs(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\tWorld", "b\tSports", "c\tBusiness"]))
    teacher, student = model(3), model(3)
    out = apply_label_info(ds, "label", teacher, student)
    assert out["train"]["label"] == [2, 1, 0]
    for m in (teacher, student):
        assert m.config.id2label == {0: "Business", 1: "Sports", 2: "World"}
        assert m.config.label2id == {"Business": 0, "Sports": 1, "World": 2}
        assert m.config.problem_type == "single_label_classification"
    student.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["id2label"] == {"0": "Business", "1": "Sports", "2": "World"}


def test_data_is_renumbered_to_the_teachers_names(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\tworld", "b\tsports", "c\tbusiness"]))
    teacher = model(id2label={0: "World", 1: "Business", 2: "Sports"})
    student = model(3)
    out = apply_label_info(ds, "label", teacher, student)
    # The teacher's head index i means its id2label[i]: the rows follow it (names matched case-insensitively).
    assert out["train"]["label"] == [0, 2, 1]
    assert label_info(out, "label").names == ("World", "Business", "Sports")
    assert student.config.id2label == {0: "World", 1: "Business", 2: "Sports"}


def test_teacher_with_other_names_is_refused(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\tWorld", "b\tSports"]))
    teacher = model(id2label={0: "negative", 1: "positive"})
    with pytest.raises(
        ValueError,
        match=r"the data's labels \['Sports', 'World'\] .* differ from the teacher's "
        r"id2label \['negative', 'positive'\].*Rename the data's labels",
    ):
        apply_label_info(ds, "label", teacher, model(2))


def test_head_size_different_from_the_data_is_refused(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\tWorld", "b\tSports", "c\tArts"]))
    with pytest.raises(ValueError, match=r"the data has 3 label\(s\) .* the teacher's head has num_labels=2"):
        apply_label_info(ds, "label", model(2), model(2))


def test_integer_labels_keep_the_teachers_names(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\t0", "b\t1"]))
    teacher, student = model(id2label={0: "negative", 1: "positive"}), model(2)
    apply_label_info(ds, "label", teacher, student)
    assert student.config.id2label == {0: "negative", 1: "positive"}


def test_regression_sets_problem_type(tmp_path):
    ds = load(write_tsv(tmp_path / "train.tsv", ["a\t0.5", "b\t2.5"]))
    teacher, student = model(1), model(1)
    apply_label_info(ds, "label", teacher, student)
    assert teacher.config.problem_type == student.config.problem_type == "regression"


# ---------------------------------------------------------------------- metrics of float labels
def test_metrics_follow_the_label_kind():
    """Argmax accuracy for ids; exact match / per-class for multi-hot labels; MSE (no accuracy) for regression."""
    metrics = classification_metrics()
    assert metrics((np.array([[2.0, -1.0], [-1.0, 3.0]]), np.array([0, 0]))) == {"accuracy": 0.5}
    logits = np.array([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]])
    multi = metrics((logits, np.array([[1, 0, 1], [1, 0, 0]], dtype=np.float32)))
    assert multi == {"accuracy": 0.5, "label_accuracy": pytest.approx(5 / 6)}
    # An argmax over one output is always 0: before, float targets 1.0 / 2.0 were cast to ids and scored as "accuracy".
    assert metrics((np.array([[0.5], [2.0]]), np.array([1.0, 2.0], dtype=np.float32))) == {"mse": 0.125}


# ---------------------------------------------------------------------- the script
def run_script(tmp_path, tokenizer, train: str, dev: str, num_labels: int, *argv: str) -> dict:
    """scripts/distill.py in-process on a tiny teacher of `num_labels` outputs; returns the saved student's config."""
    import importlib.util
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("distill_script", os.path.join(repo, "scripts", "distill.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    config = tiny_bert_config(num_layers=2, hidden=16, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "out"
    script.main(
        [
            *("--teacher_model_name_or_path", str(tmp_path / "teacher"), "--train_file", train),
            *("--validation_file", dev, "--output_dir", str(out), "--max_length", "16", "--max_steps", "2"),
            *("--per_device_train_batch_size", "3", "--student_num_layers", "1", "--use_cpu", "true"),
            *("--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1"),
            *argv,
        ]
    )
    results = json.loads((out / "all_results.json").read_text())
    assert all(math.isfinite(v) for k, v in results.items() if k.startswith("eval_loss")), results
    return json.loads((out / "student" / "config.json").read_text())


@pytest.mark.slow
def test_distill_script_stores_string_label_names_in_the_student(tmp_path, tiny_tokenizer):
    """scripts/distill.py on World/Sports/Business labels: the saved student's config names the classes."""
    names = ["World", "Sports", "Business"]
    train = write_tsv(tmp_path / "train.tsv", [f"the film {i}\t{names[i % 3]}" for i in range(6)])
    dev = write_tsv(tmp_path / "dev.tsv", ["fun\tSports", "dull\tWorld"])
    config = run_script(tmp_path, tiny_tokenizer, train, dev, 3)
    assert config["id2label"] == {"0": "Business", "1": "Sports", "2": "World"}
    assert config["label2id"] == {"Business": 0, "Sports": 1, "World": 2}
    assert config["problem_type"] == "single_label_classification"


@pytest.mark.slow
def test_distill_script_trains_on_float_regression_labels(tmp_path, tiny_tokenizer):
    train = write_tsv(tmp_path / "train.tsv", [f"the film {i}\t{i / 4}" for i in range(6)])
    dev = write_tsv(tmp_path / "dev.tsv", ["fun\t0.5", "dull\t1.25"])
    config = run_script(tmp_path, tiny_tokenizer, train, dev, 1, "--logits_loss", "mse")
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1


@pytest.mark.slow
def test_distill_script_trains_on_multi_label_json_lists(tmp_path, tiny_tokenizer):
    rows = [{"sentence": f"the film {i}", "label": [["World"], ["Sports", "World"], []][i % 3]} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "fun", "label": ["Sports"]}])
    config = run_script(tmp_path, tiny_tokenizer, train, dev, 2)
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "Sports", "1": "World"}
