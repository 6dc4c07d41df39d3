"""Augmentation as a transfer set: `DataArguments.augment_*` and the benchmark's fields (hf_distill.augment wired into
load_task_dataset): which rows are appended, flagged, stored, refused, and what the distilled rows train on."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel, BertTokenizerFast

from hf_distill import augment, benchmark, transfer
from hf_distill.arguments import DataArguments
from hf_distill.augment import augment_dataset
from hf_distill.benchmark import BenchmarkConfig
from hf_distill.data import (
    UNLABELLED_COLUMN,
    check_transfer_weights,
    labelled_rows,
    load_masked_lm,
    load_task_dataset,
    row_counts,
    tokenize_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
RECIPES = REPO / "recipes" / "minilm-sst2_to_minilm-l3"
TRAIN = [
    "the movie was good and fun",
    "a very boring plot",
    "it was not great but fun",
    "loved the actors and the story",
    "the worst film of the year",
    "a dull and awful plot with bad actors",
    "really fun to watch",
    "the story is a mess",
    "great acting in a weak film",
    "i would see it again",
]
DEV = ["a good film", "the plot was boring"]


def write_tsv(path, sentences):
    lines = ["sentence\tlabel", *(f"{s}\t{i % 2}" for i, s in enumerate(sentences))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def files(tmp_path):
    return write_tsv(tmp_path / "train.tsv", TRAIN), write_tsv(tmp_path / "dev.tsv", DEV)


def test_augmented_rows_follow_the_labelled_rows_flagged_unlabelled(files, tmp_path):
    train, dev = files
    args = DataArguments(train_file=train, validation_file=dev, max_train_samples=6, augment_method="eda",
                         augment_n_per_row=3)  # fmt: skip
    ds = load_task_dataset(args, seed=3)
    rows = ds["train"]
    plain = load_task_dataset(DataArguments(train_file=train, validation_file=dev, max_train_samples=6), seed=3)
    labelled = plain["train"]
    # The labelled subset is the one max_train_samples gives alone; the augmented rows come after it, flagged.
    assert rows["sentence"][:6] == labelled["sentence"] and rows["label"][:6] == labelled["label"]
    counts = row_counts(rows)
    assert counts["labelled"] == 6 and 0 < counts["unlabelled"] <= 18
    assert rows[UNLABELLED_COLUMN] == [False] * 6 + [True] * counts["unlabelled"]
    assert labelled_rows(rows)["sentence"] == labelled["sentence"]
    # Exactly the texts augment_dataset makes from the labelled rows (seeded by the data seed), in a seeded order.
    made = augment_dataset(labelled.select_columns(["sentence"]), "sentence", method="eda", n_per_row=3, seed=3)
    assert sorted(rows["sentence"][6:]) == sorted(made["sentence"])
    assert not set(rows["sentence"][6:]) & set(DEV)
    assert load_task_dataset(args, seed=3)["train"]["sentence"] == rows["sentence"]  # deterministic
    # Their labels are masked once tokenized; the labelled rows keep theirs.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tokenized = tokenize_dataset(ds, tokenizer, args)["train"]
    assert tokenized["labels"][6:] == [-100] * counts["unlabelled"] and -100 not in tokenized["labels"][:6]


def test_augmented_rows_come_after_the_unlabelled_rows_and_are_limited(files):
    train, dev = files
    args = DataArguments(train_file=train, validation_file=dev, max_train_samples=4, unlabelled_from_train=True,
                         augment_method="swap", augment_n_per_row=2, max_augmented_samples=5)  # fmt: skip
    rows = load_task_dataset(args, seed=0)["train"]
    assert row_counts(rows) == {"labelled": 4, "unlabelled": 6 + 5}
    assert set(rows["sentence"][4:10]) == set(TRAIN) - set(rows["sentence"][:4])  # the rest of the train split
    swapped = rows["sentence"][10:]
    labelled_words = [sorted(s.split()) for s in rows["sentence"][:4]]
    assert all(sorted(s.split()) in labelled_words for s in swapped)  # swaps of the labelled rows only


def test_augmented_rows_are_stored_once_and_reused(files, tmp_path, monkeypatch):
    train, dev = files
    store = tmp_path / "augmented"
    args = DataArguments(train_file=train, validation_file=dev, max_train_samples=6, augment_method="eda",
                         augment_cache_dir=str(store))  # fmt: skip
    first = load_task_dataset(args, seed=1)["train"]["sentence"]
    entries = [p for p in store.iterdir()]
    assert len(entries) == 1 and (entries[0] / augment.METADATA_NAME).is_file()

    def no_edits(*a, **k):
        raise AssertionError("the stored augmented rows were not reused")

    monkeypatch.setattr(augment, "_augment_batch", no_edits)
    assert load_task_dataset(args, seed=1)["train"]["sentence"] == first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(augment_method="synonyms"), r"augment_method must be one of .* got 'synonyms'"),
        (dict(augment_method="eda", augment_n_per_row=0), r"augment_n_per_row must be an integer >= 1, got 0"),
        (dict(augment_method="eda", augment_p=1.5), r"augment_p must be a probability in \[0, 1\] or unset, got 1.5"),
        (dict(augment_method="mlm", augment_top_k=0), r"augment_top_k must be an integer >= 1"),
        (dict(augment_method="mlm"), r"augment_method='mlm' needs augment_mlm_model_name_or_path"),
        (dict(augment_method="eda", augment_mlm_model_name_or_path="m"), r"only read by augment_method='mlm'"),
        (dict(max_augmented_samples=10), r"max_augmented_samples=10 has no augmentation to apply to"),
        (dict(augment_method="eda", max_augmented_samples=0), r"max_augmented_samples must be an integer >= 1"),
        (dict(augment_method="eda", text_pair_column="s2"), r"edits one text per row, got text_pair_column='s2'"),
    ],
)
def test_bad_augmentation_settings_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataArguments(train_file="t.tsv", **kwargs)


def test_augment_methods_listed_for_the_configs_are_the_librarys():
    assert transfer.AUGMENT_METHODS == augment.AUGMENT_METHODS


def test_augmentation_alone_is_a_transfer_set_that_needs_a_teacher_term():
    args = DataArguments(train_file="t.tsv", augment_method="eda")
    assert args.transfer_source == "augment_method" and args.unlabelled_source is None
    task_only = SimpleNamespace(logits_weight=0.0, hidden_weight=0.0, embeddings_weight=0.0, attention_weight=0.0)
    with pytest.raises(ValueError, match=r"augment_method='eda' adds unlabelled rows, but every teacher term is off"):
        check_transfer_weights(args, task_only)
    check_transfer_weights(args, SimpleNamespace(**{**vars(task_only), "logits_weight": 0.5}))


def test_a_masked_lm_without_its_trained_head_is_refused(tmp_path, tiny_tokenizer):
    """A sentence encoder (no MLM head in the checkpoint) would get a random head from from_pretrained."""
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "encoder")
    tiny_tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"augment_mlm_model_name_or_path=.*encoder.* has no trained masked-LM head"):
        load_masked_lm(str(tmp_path / "encoder"))
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path / "mlm")
    tiny_tokenizer.save_pretrained(tmp_path / "mlm")
    model, tokenizer = load_masked_lm(str(tmp_path / "mlm"))
    assert not model.training and tokenizer.mask_token_id is not None


def test_mlm_augmentation_from_data_arguments_uses_the_given_masked_lm(files, tmp_path, tiny_tokenizer):
    train, dev = files
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config(vocab_size=len(tiny_tokenizer)))
    mlm.save_pretrained(tmp_path / "mlm")
    tiny_tokenizer.save_pretrained(tmp_path / "mlm")
    args = DataArguments(train_file=train, validation_file=dev, max_train_samples=6, augment_method="mlm",
                         augment_mlm_model_name_or_path=str(tmp_path / "mlm"), augment_n_per_row=2)  # fmt: skip
    rows = load_task_dataset(args, seed=0)["train"]
    made = augment_dataset(
        labelled_rows(rows).select_columns(["sentence"]), "sentence", method="mlm", n_per_row=2, seed=0, p=0.4,
        mlm_model=mlm.eval(), mlm_tokenizer=tiny_tokenizer,
    )  # fmt: skip
    assert sorted(rows["sentence"][6:]) == sorted(made["sentence"]) and len(made) > 0


# ------------------------------------------------------------------------------------------------ benchmark
def bench(**overrides) -> BenchmarkConfig:
    return benchmark.load_benchmark_config(
        REPO / "benchmarks" / "sst2_minilm_l3.yaml",
        {"unlabelled_from_train": False, "max_unlabelled_samples": None, **overrides},
    )


def test_benchmark_augmentation_fields_are_in_the_transfer_spec_only_when_set():
    assert benchmark.Benchmark(bench(), REPO).transfer_spec() == {}
    with_unlabelled = benchmark.Benchmark(bench(unlabelled_from_train=True, max_unlabelled_samples=10), REPO)
    assert set(with_unlabelled.transfer_spec()) == set(benchmark.TRANSFER_KEYS)  # as before augmentation existed
    spec = benchmark.Benchmark(bench(augment_method="eda", augment_n_per_row=2), REPO).transfer_spec()
    assert (
        spec["augment_method"] == "eda"
        and spec["augment_n_per_row"] == 2
        and set(spec) == set(transfer.AUGMENT_FIELDS)
    )
    with pytest.raises(ValueError, match=r"augment_n_per_row must be an integer >= 1"):
        bench(augment_method="eda", augment_n_per_row=0)


def test_benchmark_data_args_store_the_augmented_rows_in_the_output_folder(tmp_path):
    config = bench(augment_method="eda", output_dir=str(tmp_path / "out"), augment_mlm_model_name_or_path=None)
    args = benchmark.Benchmark(config, REPO).data_args
    assert args.augment_method == "eda" and args.augment_cache_dir == str(tmp_path / "out" / "augmented")
    assert benchmark.Benchmark(bench(), REPO).data_args.augment_cache_dir is None


@pytest.mark.slow
def test_benchmark_with_an_augmented_transfer_set_end_to_end(tmp_path, tiny_tokenizer):
    """Tiny models on real SST-2 rows: the distilled row trains on 32 labelled rows plus their EDA copies, read from
    the teacher cache; the no-KD row on the 32 labelled rows for as many steps; the augmented rows are stored once."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    config = BenchmarkConfig(
        name="tiny_augment", output_dir=str(tmp_path / "out"), teacher_model_name_or_path=str(tmp_path / "teacher"),
        teacher_learning_rate=1e-3, train_file=str(SST2 / "train.tsv"), validation_file=str(SST2 / "dev.tsv"),
        max_length=32, max_train_samples=32, max_eval_samples=16, augment_method="eda", augment_n_per_row=3,
        student_num_layers=2, logging_steps=1, save_steps=50, teacher_cache=True,
        baseline_recipe=str(RECIPES / "no_kd.yaml"), rows={"vanilla_kd": [str(RECIPES / "vanilla_kd.yaml")]},
        results_file=str(tmp_path / "record.json"),
    )  # fmt: skip
    results = benchmark.run_benchmark(config, root=REPO, command="pytest")
    rows = {r["name"]: r for r in results["rows"]}
    unlabelled = rows["vanilla_kd"]["train_rows_unlabelled"]
    assert rows["vanilla_kd"]["train_rows_labelled"] == 32 and 32 < unlabelled <= 96
    assert (rows["no_kd"]["train_rows_labelled"], rows["no_kd"]["train_rows_unlabelled"]) == (32, 0)
    steps = -(-(32 + unlabelled) // 32)
    assert rows["vanilla_kd"]["train_steps"] == rows["no_kd"]["train_steps"] == steps
    assert len([p for p in (tmp_path / "out" / "augmented").iterdir() if not p.name.startswith(".")]) == 1
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["budget"]["transfer_set"]["augment_method"] == "eda"
    assert "augment_method='eda'" in (tmp_path / "out" / "results.md").read_text()
