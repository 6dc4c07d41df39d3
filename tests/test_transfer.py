"""Transfer-set distillation: unlabelled rows add only teacher terms (task loss masked, exact window normalisation),
their sources load as `DataArguments` says, eval texts never leak in, and the teacher cache serves them too."""

import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import test_scripts
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from test_scripts import load_script, overrides
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer, benchmark, make_student
from hf_distill.arguments import DataArguments
from hf_distill.benchmark import BenchmarkConfig, StageResult, fingerprint, format_table, load_benchmark_config
from hf_distill.benchmark_combine import combine_records, load_record
from hf_distill.data import (
    UNLABELLED_COLUMN,
    apply_label_info,
    check_transfer_weights,
    labelled_rows,
    load_task_dataset,
    row_counts,
    tokenize_dataset,
)
from hf_distill.losses.task import task_loss

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Per problem type: the teacher's head, the labels of a labelled row i, an unlabelled row's label, the logit loss.
TASKS = {
    "single": (dict(num_labels=2), lambda i: i % 2, -100, "kl"),
    "regression": (dict(num_labels=1, problem_type="regression"), lambda i: 0.25 * (i % 5), math.nan, "mse"),
    "multi_label": (
        dict(num_labels=3, problem_type="multi_label_classification"),
        lambda i: [float(i % 2), float(i % 3 == 0), 1.0],
        [math.nan] * 3,
        "kl",
    ),
}


def texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(" ".join(WORDS[j] for j in idx))
    return out


def mixed_dataset(tokenizer, task: str, n: int = 16) -> Dataset:
    """`n` rows, every third one unlabelled (-100 or NaN)."""
    _, label, missing, _ = TASKS[task]
    enc = tokenizer(texts(n), truncation=True, max_length=16)
    labels = [missing if i % 3 == 1 else label(i) for i in range(n)]
    return Dataset.from_dict({**enc, "labels": labels})


def teacher_for(task: str):
    torch.manual_seed(0)
    return BertForSequenceClassification(
        tiny_bert_config(num_layers=4, hidden=32, **TASKS[task][0], **NO_DROPOUT)
    ).eval()


def trainer_for(tmp_path, teacher, student, tokenizer, train, task, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-1,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        task_weight=0.5,
        logits_weight=0.5,
        hidden_weight=1.0,
        logits_loss=TASKS[task][3],
    )
    kwargs.update(overrides)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(**kwargs),
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def logged_terms(trainer) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k.startswith("loss_")} for e in trainer.state.log_history if "loss" in e]


# ------------------------------------------------------------------------------------------------ task loss / trainer
@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_task_loss_skips_nan_rows_and_divides_by_the_labelled_rows(task):
    torch.manual_seed(0)
    _, label, missing, _ = TASKS[task]
    width = TASKS[task][0]["num_labels"]
    logits = torch.randn(6, width)
    labels = torch.tensor([missing if i in (1, 4) else label(i) for i in range(6)], dtype=torch.float32)
    keep = torch.tensor([i not in (1, 4) for i in range(6)])
    problem = "regression" if task == "regression" else "multi_label_classification"
    got = task_loss(logits, labels, problem_type=problem)
    expected = task_loss(logits[keep], labels[keep], problem_type=problem)
    assert torch.isfinite(got) and torch.allclose(got, expected)
    # Every row unlabelled: an exact, finite 0.
    all_missing = torch.full_like(labels, math.nan)
    assert task_loss(logits, all_missing, problem_type=problem).item() == 0.0


@pytest.mark.parametrize("task", list(TASKS))
def test_logged_task_loss_is_the_loss_of_the_labelled_rows_only(tmp_path, tiny_tokenizer, task):
    teacher = teacher_for(task)
    torch.manual_seed(0)
    student = make_student(teacher, num_layers=2, verbose=False)
    train = mixed_dataset(tiny_tokenizer, task, n=8)
    batch = DataCollatorWithPadding(tiny_tokenizer)(train.to_list())
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = student(**batch).logits
    keep = labels != -100 if not labels.is_floating_point() else ~torch.isnan(labels.reshape(8, -1)).all(-1)
    problem = {"single": None, "regression": "regression", "multi_label": "multi_label_classification"}[task]
    expected = task_loss(logits[keep], labels[keep], problem_type=problem).item()

    trainer = trainer_for(tmp_path, teacher, student, tiny_tokenizer, train, task)
    trainer.train()
    (terms,) = logged_terms(trainer)
    assert all(math.isfinite(v) for v in terms.values()), terms
    assert math.isclose(terms["loss_task"], expected, rel_tol=1e-4), (terms["loss_task"], expected)
    assert set(terms) == {"loss_task", "loss_logits", "loss_hidden"}


@pytest.mark.parametrize("task", list(TASKS))
def test_gradient_accumulation_with_unlabelled_rows_matches_full_batch(tmp_path, tiny_tokenizer, task):
    """2 micro-batches of 4 (labelled and unlabelled rows unevenly spread) == 1 batch of 8: the task loss divides by
    the labelled rows of the whole window, the teacher terms by all its rows."""
    teacher = teacher_for(task)
    train = mixed_dataset(tiny_tokenizer, task, n=8)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        student = make_student(teacher, num_layers=2, verbose=False)
        trainer = trainer_for(
            tmp_path / f"ga{ga}", teacher, student, tiny_tokenizer, train, task, per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, max_grad_norm=0.0, optim="sgd",
        )  # fmt: skip
        trainer.train()
        results.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    for k in results[0]:
        assert torch.isfinite(results[0][k]).all(), k
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ loading
def write_tsv(path, rows, header=("sentence", "label")):
    path.write_text("\n".join(["\t".join(header), *("\t".join(str(v) for v in r) for r in rows)]) + "\n")
    return str(path)


@pytest.fixture
def sst_like(tmp_path):
    """A train file of 20 rows (`train 0` ... `train 19`) and an eval file of 4 rows (`dev 0` ... `dev 3`)."""
    train = write_tsv(tmp_path / "train.tsv", [(f"train {i}", ["neg", "pos"][i % 2]) for i in range(20)])
    dev = write_tsv(tmp_path / "dev.tsv", [(f"dev {i}", ["neg", "pos"][i % 2]) for i in range(4)])
    return train, dev


def test_unlabelled_from_train_is_the_rest_of_the_train_split_disjoint_from_the_labelled_subset(sst_like):
    train, dev = sst_like
    args = DataArguments(train_file=train, validation_file=dev, max_train_samples=6, unlabelled_from_train=True)
    ds = load_task_dataset(args, seed=3)
    rows = ds["train"]
    assert row_counts(rows) == {"labelled": 6, "unlabelled": 14}
    flags = rows[UNLABELLED_COLUMN]
    assert flags == [False] * 6 + [True] * 14  # labelled rows first
    labelled = set(rows["sentence"][:6])
    unlabelled = set(rows["sentence"][6:])
    assert not labelled & unlabelled and labelled | unlabelled == {f"train {i}" for i in range(20)}
    # The labelled subset is exactly the one max_train_samples gives without a transfer set.
    plain = load_task_dataset(DataArguments(train_file=train, validation_file=dev, max_train_samples=6), seed=3)
    assert plain["train"]["sentence"] == rows["sentence"][:6] and plain["train"]["label"] == rows["label"][:6]
    assert labelled_rows(rows)["sentence"] == plain["train"]["sentence"]
    assert UNLABELLED_COLUMN not in labelled_rows(rows).column_names
    # Seeded: the same seed gives the same rows in the same order, another seed another order.
    assert load_task_dataset(args, seed=3)["train"]["sentence"] == rows["sentence"]
    assert load_task_dataset(args, seed=4)["train"]["sentence"] != rows["sentence"]
    # max_unlabelled_samples takes a subset of the same pool.
    few = load_task_dataset(
        DataArguments(
            train_file=train, validation_file=dev, max_train_samples=6, unlabelled_from_train=True,
            max_unlabelled_samples=5,
        ),
        seed=3,
    )  # fmt: skip
    assert row_counts(few["train"]) == {"labelled": 6, "unlabelled": 5}
    assert set(few["train"]["sentence"][6:]) <= unlabelled


@pytest.mark.parametrize("kind", ["txt", "tsv", "jsonl"])
def test_unlabelled_file_rows_are_appended_and_tokenized_with_masked_labels(tmp_path, sst_like, tiny_tokenizer, kind):
    train, dev = sst_like
    extra = [f"story {w}" for w in WORDS[:5]]
    path = tmp_path / f"extra.{kind}"
    if kind == "txt":
        path.write_text("\n".join(extra) + "\n")
    elif kind == "tsv":
        write_tsv(path, [(t,) for t in extra], header=("sentence",))
    else:
        path.write_text("".join(f'{{"sentence": "{t}", "label": "ignored"}}\n' for t in extra))
    ds = load_task_dataset(DataArguments(train_file=train, validation_file=dev, unlabelled_file=str(path)))
    assert row_counts(ds["train"]) == {"labelled": 20, "unlabelled": 5}
    assert sorted(ds["train"]["sentence"][20:]) == sorted(extra)
    tokenized = tokenize_dataset(ds, tiny_tokenizer, DataArguments(train_file=train))
    labels = tokenized["train"]["labels"]
    assert labels[20:] == [-100] * 5 and all(v in (0, 1) for v in labels[:20])
    assert row_counts(tokenized["train"]) == {"labelled": 20, "unlabelled": 5}
    assert labelled_rows(tokenized["train"])["labels"] == labels[:20]
    assert set(tokenized["eval"]["labels"]) == {0, 1}


def test_unlabelled_split_of_a_dataset_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    header = "sentence,label\n"
    (folder / "train.csv").write_text(header + "".join(f"train {i},{i % 2}\n" for i in range(6)))
    (folder / "validation.csv").write_text(header + "dev 0,0\ndev 1,1\n")
    (folder / "test.csv").write_text(header + "".join(f"test {i},-1\n" for i in range(4)) + "dev 1,-1\n")
    args = DataArguments(dataset_name=str(folder), unlabelled_split="test")
    ds = load_task_dataset(args, seed=0)
    # GLUE-style test labels (-1) are never read; the copy of an eval sentence is dropped.
    assert row_counts(ds["train"]) == {"labelled": 6, "unlabelled": 4}
    assert sorted(ds["train"]["sentence"][6:]) == [f"test {i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"unlabelled_split='unseen' is not a split .* it has"):
        load_task_dataset(DataArguments(dataset_name=str(folder), unlabelled_split="unseen"))


def test_copies_of_eval_texts_are_dropped_and_counted(tmp_path, sst_like, caplog):
    train, dev = sst_like
    path = tmp_path / "extra.txt"
    path.write_text("dev 0\nnew text\n dev 2 \nother text\n\n")
    with caplog.at_level(logging.WARNING, logger="hf_distill.data"):
        ds = load_task_dataset(DataArguments(train_file=train, validation_file=dev, unlabelled_file=str(path)))
    assert sorted(ds["train"]["sentence"][20:]) == ["new text", "other text"]
    assert "dropped 2 of 5 unlabelled rows that repeat an eval text exactly" in caplog.text
    assert "and 1 empty rows" in caplog.text
    only_eval = tmp_path / "only_eval.txt"
    only_eval.write_text("dev 0\ndev 1\n")
    with pytest.raises(ValueError, match=r"unlabelled_file gives no unlabelled rows once copies of eval texts \(2\)"):
        load_task_dataset(DataArguments(train_file=train, validation_file=dev, unlabelled_file=str(only_eval)))


def test_float_and_multi_label_unlabelled_rows_tokenize_to_nan(tmp_path, tiny_tokenizer):
    train = write_tsv(tmp_path / "reg.tsv", [(f"train {i}", 0.5 * i) for i in range(6)])
    args = DataArguments(train_file=train, max_train_samples=4, unlabelled_from_train=True)
    labels = tokenize_dataset(load_task_dataset(args), tiny_tokenizer, args)["train"]["labels"]
    assert all(math.isfinite(v) for v in labels[:4]) and all(math.isnan(v) for v in labels[4:])

    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(f'{{"sentence": "train {i}", "label": {["a", "b"][: 1 + i % 2]}}}\n' for i in range(6)))
    multi.write_text(multi.read_text().replace("'", '"'))
    args = DataArguments(train_file=str(multi), max_train_samples=4, unlabelled_from_train=True)
    labels = tokenize_dataset(load_task_dataset(args), tiny_tokenizer, args)["train"]["labels"]
    assert all(len(row) == 2 and all(v in (0.0, 1.0) for v in row) for row in labels[:4])
    assert all(len(row) == 2 and all(math.isnan(v) for v in row) for row in labels[4:])
    assert row_counts(tokenize_dataset(load_task_dataset(args), tiny_tokenizer, args)["train"]) == {
        "labelled": 4,
        "unlabelled": 2,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(train_file="t.tsv", unlabelled_file="u.txt", unlabelled_from_train=True, max_train_samples=4),
            r"at most one unlabelled source, got unlabelled_file='u.txt', unlabelled_from_train=True",
        ),
        (dict(train_file="t.tsv", unlabelled_from_train=True), r"unlabelled_from_train=True needs max_train_samples"),
        (dict(train_file="t.tsv", unlabelled_split="test"), r"unlabelled_split='test' needs a Hub dataset"),
        (dict(dataset_name="glue", unlabelled_split="train"), r"unlabelled_split='train' is also the train or eval"),
        (dict(train_file="t.tsv", max_unlabelled_samples=5), r"max_unlabelled_samples=5 has no unlabelled source"),
        (dict(train_file="t.tsv", unlabelled_file="u.txt", max_unlabelled_samples=0), r"max_unlabelled_samples must"),
    ],
)
def test_bad_transfer_settings_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataArguments(**kwargs)


def test_bad_unlabelled_files_are_refused(tmp_path, sst_like):
    train, dev = sst_like
    with pytest.raises(FileNotFoundError, match=r"unlabelled_file='.*missing.txt' does not exist"):
        load_task_dataset(DataArguments(train_file=train, unlabelled_file=str(tmp_path / "missing.txt")))
    wrong = write_tsv(tmp_path / "wrong.tsv", [("x",)], header=("text",))
    with pytest.raises(ValueError, match=r"have no column 'sentence' .* set text_column to match"):
        load_task_dataset(DataArguments(train_file=train, unlabelled_file=wrong))
    parquet = tmp_path / "u.parquet"
    parquet.write_text("x")
    with pytest.raises(ValueError, match=r"unlabelled_file=.* has extension '.parquet'"):
        load_task_dataset(DataArguments(train_file=train, unlabelled_file=str(parquet)))


# ------------------------------------------------------------------------------------------------ teacher cache
@pytest.mark.parametrize("task", list(TASKS))
def test_cached_teacher_gives_the_live_losses_on_labelled_and_unlabelled_rows(tmp_path, tiny_tokenizer, task):
    """The teacher cache is keyed by the teacher's inputs, not the labels: unlabelled rows get their teacher outputs
    from it like labelled ones, every logged term equals the live teacher's, and the teacher never runs."""
    teacher = teacher_for(task)
    train = mixed_dataset(tiny_tokenizer, task, n=16)
    logs, calls = [], []
    for name, cache in (("live", {}), ("cached", dict(use_teacher_cache=True, teacher_cache_dtype="float32"))):
        torch.manual_seed(0)
        student = make_student(teacher, num_layers=2, verbose=False)
        trainer = trainer_for(
            tmp_path / name, teacher, student, tiny_tokenizer, train, task, max_steps=3, learning_rate=1e-2, **cache
        )
        if cache:
            assert trainer.teacher_cache is not None and trainer.teacher_cache.built
            handle = trainer.teacher.register_forward_pre_hook(lambda *_: calls.append(1))
        trainer.train()
        logs.append(logged_terms(trainer))
    handle.remove()
    assert not calls, "the teacher ran although its outputs were cached"
    live, cached = logs
    assert len(live) == len(cached) == 3
    for step, (e, g) in enumerate(zip(live, cached)):
        assert set(e) == set(g) == {"loss_task", "loss_logits", "loss_hidden"}
        for term in e:
            assert math.isfinite(e[term]) and math.isclose(e[term], g[term], rel_tol=1e-5, abs_tol=1e-7), (step, term)


def test_a_transfer_set_without_a_teacher_term_is_refused(tmp_path):
    data = DataArguments(train_file="t.tsv", unlabelled_file="u.txt")
    no_teacher = DistillationConfig(output_dir=str(tmp_path), task_weight=1.0, logits_weight=0.0, report_to="none")
    with pytest.raises(
        ValueError, match=r"unlabelled_file='u.txt' adds unlabelled rows, but every teacher term is off"
    ):
        check_transfer_weights(data, no_teacher)
    check_transfer_weights(data, DistillationConfig(output_dir=str(tmp_path), report_to="none"))  # logits on: fine
    check_transfer_weights(DataArguments(train_file="t.tsv"), no_teacher)  # no transfer set: the no-KD baseline


# ------------------------------------------------------------------------------------------------ benchmark
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "sst2_minilm_l3.yaml"


def bench_config(overrides: dict | None = None) -> BenchmarkConfig:
    """The default benchmark without its transfer set, plus `overrides` (the tests add the transfer set they study)."""
    return load_benchmark_config(
        BENCH, {"unlabelled_from_train": False, "max_unlabelled_samples": None, **(overrides or {})}
    )


def captured_specs(monkeypatch, config: BenchmarkConfig) -> dict[str, dict]:
    """The spec of every row's stages, captured from `run_stage` (nothing is trained or loaded)."""
    specs = {}

    def fake_run_stage(stage_dir, spec, work, cleanup=()):
        specs[spec["stage"]] = spec
        return StageResult(str(stage_dir), str(stage_dir), "reused", 0.0, {"global_step": 1})

    monkeypatch.setattr(benchmark, "run_stage", fake_run_stage)
    monkeypatch.setattr(
        benchmark, "run_trainer_stage", lambda stage_dir, spec, make: fake_run_stage(stage_dir, spec, make)
    )
    monkeypatch.setattr(benchmark, "row_counts", lambda train: {"labelled": 1, "unlabelled": 0})

    def fake_train_rows(self, transfer):  # 4,000 labelled rows, plus the unlabelled ones for a distilled row
        return range(4000 + (self.config.max_unlabelled_samples if transfer and self.transfer_spec() else 0))

    monkeypatch.setattr(benchmark.Benchmark, "train_rows", fake_train_rows)
    # A folder of its own, not the repository's outputs/: were a stage ever run for real here, it would leave its
    # checkpoints in the default benchmark's folder, and the README's main command would refuse them later.
    config.output_dir = tempfile.mkdtemp(prefix="captured-specs-")
    bench = benchmark.Benchmark(config, REPO)
    rows = {config.baseline_name: [config.baseline_recipe], **config.rows}
    for name, recipes in rows.items():
        bench.row_stages(name, recipes, {"stage": "student_init"}, transfer=name != config.baseline_name)
    return specs


def test_benchmark_transfer_fields_are_in_the_distilled_stages_fingerprints(monkeypatch):
    plain = bench_config()
    transfer = bench_config({"unlabelled_from_train": True, "max_unlabelled_samples": 20000})
    fewer = bench_config({"unlabelled_from_train": True, "max_unlabelled_samples": 10000})
    specs = {name: captured_specs(monkeypatch, c) for name, c in (("plain", plain), ("t", transfer), ("f", fewer))}
    kd_stage, baseline_stage = "vanilla_kd/1-vanilla_kd", "no_kd/1-no_kd"
    # No transfer set: the specs are what they were before these fields existed (finished stages stay reusable).
    assert not set(benchmark.TRANSFER_KEYS) & set(specs["plain"][kd_stage])
    # The distilled rows' stages change with every transfer field ...
    assert specs["t"][kd_stage]["max_unlabelled_samples"] == 20000 and specs["t"][kd_stage]["unlabelled_from_train"]
    for stage in specs["t"]:
        if stage != baseline_stage:
            assert fingerprint(specs["t"][stage]) not in {
                fingerprint(specs["plain"][stage]),
                fingerprint(specs["f"][stage]),
            }
    # ... the no-KD row trains on the labelled rows only, for as many steps as the distilled rows (match_steps):
    # 24,000 rows / 32 = 750 steps, 14,000 / 32 = 438, 4,000 / 32 = 125 (its spec keeps no "steps" then).
    assert specs["t"][baseline_stage]["steps"] == 750 and specs["f"][baseline_stage]["steps"] == 438
    assert "steps" not in specs["plain"][baseline_stage]
    assert specs["t"][kd_stage].get("steps") is None  # 750 = its own epoch: the spec is what it was
    # With match_steps off, each row trains one epoch over its own rows: the no-KD stage is shared by all three.
    own = {
        name: captured_specs(monkeypatch, bench_config({**overrides, "match_steps": False}))
        for name, overrides in (("plain", {}), ("t", {"unlabelled_from_train": True, "max_unlabelled_samples": 20000}))
    }
    assert fingerprint(own["t"][baseline_stage]) == fingerprint(own["plain"][baseline_stage])
    assert fingerprint(own["plain"][baseline_stage]) == fingerprint(specs["plain"][baseline_stage])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"unlabelled_from_train": True, "unlabelled_file": "u.txt"}, r"at most one unlabelled source"),
        ({"unlabelled_from_train": True, "max_train_samples": None}, r"unlabelled_from_train=True needs max_train"),
        ({"unlabelled_split": "validation"}, r"unlabelled_split='validation' is also the train or eval split"),
        ({"unlabelled_file": "u.txt", "max_unlabelled_samples": 0}, r"max_unlabelled_samples must be >= 1"),
        ({"max_unlabelled_samples": 100}, r"max_unlabelled_samples=100 has no unlabelled source"),
    ],
)
def test_benchmark_transfer_fields_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        bench_config(overrides)


def test_benchmark_transfer_paths_and_data_args(tmp_path):
    extra = tmp_path / "extra.txt"
    config = bench_config({"unlabelled_file": str(extra), "max_unlabelled_samples": 5})
    assert config.unlabelled_file == str(extra)
    data = benchmark.Benchmark(bench_config({"unlabelled_from_train": True}), REPO)
    if Path(data._path(data.config.train_file)).is_file():  # the shared SST-2 files (else the Hub is tried)
        args = data.data_args
        assert args.unlabelled_from_train and args.max_train_samples == 2000 and args.unlabelled_source


def test_benchmark_refuses_a_distilled_row_without_a_teacher_term_when_a_transfer_set_is_set():
    baseline = "recipes/minilm-sst2_to_minilm-l3/no_kd.yaml"
    config = bench_config({"unlabelled_from_train": True, "rows": {"task_only": [baseline]}})
    with pytest.raises(ValueError, match=r"row 'task_only', recipe .*no_kd.yaml: unlabelled_from_train=True adds"):
        benchmark.check_transfer_recipes(config, lambda p: REPO / p)
    benchmark.check_transfer_recipes(bench_config(), lambda p: REPO / p)  # no transfer set: fine
    benchmark.check_transfer_recipes(bench_config({"unlabelled_from_train": True}), lambda p: REPO / p)


def test_results_table_and_markdown_state_each_rows_training_rows():
    rows = [
        {"name": "teacher", "recipes": ["fine-tune"], "accuracy": 0.9, "train_rows_labelled": 8000,
         "train_rows_unlabelled": 0},
        {"name": "no_kd", "recipes": ["no_kd"], "accuracy": 0.85, "train_steps": 250, "train_rows_labelled": 8000,
         "train_rows_unlabelled": 0},
        {"name": "vanilla_kd", "recipes": ["vanilla_kd"], "accuracy": 0.88, "train_steps": 2105,
         "train_rows_labelled": 8000, "train_rows_unlabelled": 59349},
    ]  # fmt: skip
    lines = format_table(rows).splitlines()
    assert lines[0].endswith("| train rows (labelled + unlabelled) |")
    assert lines[4].endswith("| 2105 | - | 8,000 + 59,349 |") and lines[3].endswith("| 250 | - | 8,000 + 0 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    # Without a transfer set the table is the one it always was.
    assert "train rows" not in format_table([{**r, "train_rows_unlabelled": 0} for r in rows])
    results = {
        "benchmark": "b", "teacher": "t", "torch_threads": 2, "rows": [{**r, "eval_rows": 872} for r in rows],
        "budget": {"train_rows": 8000, "steps_per_student_row": 250, "per_device_train_batch_size": 32,
                   "max_length": 64, "stage_split": "s", "num_train_epochs": 1,
                   "transfer_set": {"unlabelled_from_train": True, "max_unlabelled_samples": None}},
    }  # fmt: skip
    text = benchmark.results_markdown(results)
    assert "Transfer set (unlabelled_from_train=True): the distilled rows train on 8,000 labelled + 59,349" in text
    assert "the teacher and no_kd on the 8,000 labelled rows alone" in text
    assert "250/2105 optimizer steps (1 epoch(s) of each row's rows)" in text  # match_steps: false


SST2 = REPO.parent / "shared" / "data" / "sst2"
RECIPES = REPO / "recipes" / "minilm-sst2_to_minilm-l3"


@pytest.mark.slow
@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason=f"real SST-2 files not found at {SST2} (../shared)")
def test_benchmark_with_a_transfer_set_end_to_end(tmp_path, tiny_tokenizer):
    """Tiny models on real SST-2 rows: the distilled row trains on 64 labelled + 64 unlabelled rows from the teacher
    cache, a labelled-only KD row and the no-KD row on the 64 labelled rows for as many steps, under two training
    seeds; results.json, results.md and the committed record say so, and BENCHMARKS.md-style blocks are generated
    from the record."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    vanilla = str(RECIPES / "vanilla_kd.yaml")
    config = BenchmarkConfig(
        name="tiny_transfer", output_dir=str(tmp_path / "out"), teacher_model_name_or_path=str(tmp_path / "teacher"),
        teacher_learning_rate=1e-3, train_file=str(SST2 / "train.tsv"), validation_file=str(SST2 / "dev.tsv"),
        max_length=32, max_train_samples=64, max_eval_samples=32, unlabelled_from_train=True,
        max_unlabelled_samples=64, student_num_layers=2, logging_steps=1, save_steps=50, teacher_cache=True,
        baseline_recipe=str(RECIPES / "no_kd.yaml"), rows={"vanilla_kd": [vanilla], "kd_labelled": [vanilla]},
        labelled_only_rows=["kd_labelled"], student_seeds=[42, 7], seed_rows=["no_kd", "vanilla_kd"],
        results_file=str(tmp_path / "results" / "{name}.json"),
    )  # fmt: skip
    results = benchmark.run_benchmark(config, root=REPO, command="pytest")
    rows = {r["name"]: r for r in results["rows"]}
    counts = {name: (r["train_rows_labelled"], r["train_rows_unlabelled"]) for name, r in rows.items()}
    assert counts == {"teacher": (64, 0), "no_kd": (64, 0), "vanilla_kd": (64, 64), "kd_labelled": (64, 0)}
    assert rows["teacher"]["train_steps"] == 2  # 64 rows at batch 32, its own epochs
    assert {rows[n]["train_steps"] for n in ("no_kd", "vanilla_kd", "kd_labelled")} == {4}  # 128 rows: one budget
    out = tmp_path / "out"
    history = json.loads((out / "rows" / "vanilla_kd" / "1-vanilla_kd" / "log_history.json").read_text())
    assert all(math.isfinite(h["loss_task"]) and math.isfinite(h["loss_logits"]) for h in history if "loss_task" in h)
    # One teacher cache for the three distilled trainings (two rows, two seeds): built once, on all 128 rows.
    caches = [p for p in (out / "teacher_cache").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 2  # the transfer rows' 128 rows and the labelled-only row's 64 rows
    # Seeds: the second seed retrained no_kd and vanilla_kd (not kd_labelled) from the same student.
    assert (out / "rows" / "vanilla_kd" / "seed7" / "1-vanilla_kd").is_dir()
    assert not (out / "rows" / "kd_labelled" / "seed7").exists()
    assert rows["vanilla_kd"]["seeds"] == [42, 7] and rows["kd_labelled"]["seeds"] == [42]
    per_seed = rows["vanilla_kd"]["accuracy_per_seed"]
    assert rows["vanilla_kd"]["accuracy"] == pytest.approx(sum(per_seed.values()) / 2)
    assert rows["vanilla_kd"]["accuracy_std"] >= 0

    # The intervals come from the stored dev predictions: pooled over both seeds for vanilla_kd (and no_kd).
    def correct(eval_name):
        stored = json.loads((out / "eval" / eval_name / "predictions.json").read_text())
        return np.asarray(stored["predictions"]) == np.asarray(stored["labels"])

    base = np.stack([correct("no_kd"), correct("no_kd-seed7")])
    pooled = np.stack([correct("vanilla_kd"), correct("vanilla_kd-seed7")])
    assert rows["vanilla_kd"]["delta_ci95"] == list(benchmark.paired_bootstrap(pooled, base, seed=42))
    assert rows["kd_labelled"]["delta_ci95"] == list(benchmark.paired_bootstrap(correct("kd_labelled"), base, seed=42))
    assert rows["vanilla_kd"]["delta_vs_baseline_pts"] == pytest.approx(100 * (pooled.mean() - base.mean()))
    # Each row carries its per-dev-row correctness per seed, from which the interval can be recomputed.
    bits = rows["vanilla_kd"]["dev_correct"]
    assert set(bits) == {"42", "7"} and bits["7"] == "".join("1" if ok else "0" for ok in correct("vanilla_kd-seed7"))
    assert set(rows["kd_labelled"]["dev_correct"]) == {"42"} and len(rows["teacher"]["dev_correct"]["42"]) == 32
    md = (out / "results.md").read_text()
    assert "the distilled rows train on 64 labelled + 64 unlabelled rows" in md and "no_kd, kd_labelled" in md
    assert "every student row 4 optimizer steps" in md and "| 64 + 64 |" in md and md.count("| 64 + 0 |") == 3
    # The record: no path of this machine, the command, every row; a docs block is generated from it.
    record_path = tmp_path / "results" / "tiny_transfer.json"
    record = json.loads(record_path.read_text())
    assert record["command"] == "pytest" and record["rows"][1]["name"] == "no_kd"
    assert str(tmp_path) not in record_path.read_text()
    doc = "text\n<!-- results: results/tiny_transfer.json -->\nold table\n<!-- /results -->\nmore\n"
    assert benchmark.stale_results_blocks(doc, tmp_path) == ["results/tiny_transfer.json"]
    fresh = benchmark.update_results_blocks(doc, tmp_path)
    assert benchmark.stale_results_blocks(fresh, tmp_path) == []
    assert benchmark.format_table(record["rows"]) in fresh and fresh.startswith("text\n") and fresh.endswith("more\n")


@pytest.mark.slow
def test_a_benchmark_run_under_another_student_seed_only(tmp_path, tiny_tokenizer):
    """`student_seeds: [7]` trains the student rows under seed 7 alone, from the teacher, data subset and student of
    seed 42: the run of one seed of a benchmark on one machine, its record combinable with the others'."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")

    def run(out, seeds, record="record.json"):
        config = BenchmarkConfig(
            name="tiny_seed", output_dir=str(out), teacher_model_name_or_path=str(tmp_path / "teacher"),
            teacher_learning_rate=1e-3, train_file=str(SST2 / "train.tsv"), validation_file=str(SST2 / "dev.tsv"),
            max_length=32, max_train_samples=64, max_eval_samples=32, student_num_layers=2, logging_steps=1,
            save_steps=50, baseline_recipe=str(RECIPES / "no_kd.yaml"),
            rows={"vanilla_kd": [str(RECIPES / "vanilla_kd.yaml")]}, student_seeds=seeds,
            results_file=str(out / record),
        )  # fmt: skip
        return {r["name"]: r for r in benchmark.run_benchmark(config, root=REPO)["rows"]}

    only_7, both = run(tmp_path / "only_7", [7]), run(tmp_path / "both", [42, 7])
    assert (tmp_path / "only_7" / "rows" / "vanilla_kd" / "seed7" / "1-vanilla_kd").is_dir()
    assert not (tmp_path / "only_7" / "rows" / "vanilla_kd" / "1-vanilla_kd").exists()
    assert only_7["vanilla_kd"]["seeds"] == [7] and set(only_7["vanilla_kd"]["dev_correct"]) == {"7"}
    # The same teacher and student init, and seed 7's training is the one the two-seed run made.
    assert only_7["teacher"]["dev_correct"] == both["teacher"]["dev_correct"]
    for name in ("no_kd", "vanilla_kd"):
        assert only_7[name]["dev_correct"]["7"] == both[name]["dev_correct"]["7"]
        assert only_7[name]["accuracy"] == pytest.approx(both[name]["accuracy_per_seed"][7])
    # Combining the records of a seed-42-only and a seed-7-only run gives what the two-seed run reports; the two
    # run in one folder, one after the other, as across sessions (the second reuses the teacher and student init,
    # and evaluates its own models beside the first's).
    shared = tmp_path / "one_folder"
    run(shared, [42], "record_42.json"), run(shared, [7], "record_7.json")
    assert (shared / "eval" / "vanilla_kd").is_dir() and (shared / "eval" / "vanilla_kd-seed7").is_dir()
    assert (shared / "eval" / "latency").is_dir() and (shared / "eval" / "latency-seed7").is_dir()
    parts = [load_record(shared / f"record_{s}.json") for s in (42, 7)]
    assert parts[1]["rows"][0]["dev_correct"] == parts[0]["rows"][0]["dev_correct"]  # the same teacher
    combined = {r["name"]: r for r in combine_records(parts)["rows"]}
    reference = {r["name"]: r for r in load_record(tmp_path / "both" / "record.json")["rows"]}
    for name in ("no_kd", "vanilla_kd"):
        for key in ("seeds", "dev_correct", "accuracy_per_seed", "delta_ci95"):
            assert combined[name].get(key) == reference[name].get(key), (name, key)
        for key in ("accuracy", "accuracy_std", "accuracy_kept_pct", "delta_vs_baseline_pts"):
            assert combined[name][key] == pytest.approx(reference[name][key]), (name, key)


def test_renumbering_to_the_teachers_label_order_keeps_unlabelled_rows_unlabelled(sst_like, tiny_tokenizer):
    """A teacher whose id2label is in another order re-numbers the data's classes; the -1 placeholder of unlabelled
    rows is no class and must not become one (it used to index the last class: new_ids[-1])."""
    train, dev = sst_like
    args = DataArguments(train_file=train, validation_file=dev, max_train_samples=6, unlabelled_from_train=True)
    raw = load_task_dataset(args)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, id2label={0: "pos", 1: "neg"}))
    renumbered = apply_label_info(raw, "label", teacher)
    sentences, labels = renumbered["train"]["sentence"], renumbered["train"]["label"]
    assert labels[6:] == [-1] * 14
    assert all(label == (0 if int(s.split()[1]) % 2 else 1) for s, label in zip(sentences[:6], labels[:6]))
    assert tokenize_dataset(renumbered, tiny_tokenizer, args)["train"]["labels"][6:] == [-100] * 14


# ------------------------------------------------------------------------------------------------ scripts/distill.py
@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """tests/test_scripts.py's tiny teacher and train/dev TSV files."""
    return test_scripts.workdir.__wrapped__(tmp_path_factory, tiny_tokenizer)


def test_distill_script_trains_on_a_transfer_set_and_refuses_one_without_teacher_terms(workdir, tmp_path):
    distill = load_script()
    out = tmp_path / "run"
    argv = overrides(
        workdir, out, "--student_num_layers", "2", "--max_train_samples", "16", "--unlabelled_from_train", "true",
        "--max_steps", "3", "--hidden_weight", "0",
    )  # fmt: skip
    distill.main(argv)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss_task" in e]
    assert len(logged) == 3 and all(math.isfinite(e["loss_task"]) and e["loss_logits"] >= 0 for e in logged)
    with pytest.raises(ValueError, match=r"unlabelled_from_train=True adds unlabelled rows, but every teacher term"):
        distill.main(
            overrides(
                workdir, tmp_path / "refused", "--student_num_layers", "2", "--max_train_samples", "16",
                "--unlabelled_from_train", "true", "--logits_weight", "0", "--hidden_weight", "0",
            )
        )  # fmt: skip
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
