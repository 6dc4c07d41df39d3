"""DistillationConfig, recipes and every bad-input error: one table of cases, each raised before any training step."""

import glob
import os

import pytest
import torch
import yaml
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, BertTokenizerFast, HfArgumentParser

from hf_distill import (
    DataArguments,
    DistillationConfig,
    DistillationTrainer,
    ModelArguments,
    check_recipe_keys,
    load_recipe,
    load_task_dataset,
    load_teacher,
    make_student,
    parse_layer_mapping,
    resolve_layer_pairs,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*", "*.yaml")))
RECIPES = [r for r in RECIPES if os.sep + "accelerate_configs" + os.sep not in r]


def config(**kw):
    return DistillationConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


def teacher():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))


def teacher_with(**kw):
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **kw))


def student(**kw):
    torch.manual_seed(1)
    return BertForSequenceClassification(tiny_bert_config(**{"num_layers": 2, "hidden": 16, **kw}))


def trainer(student_model=None, **cfg):
    return DistillationTrainer(model=student_model or student(), teacher_model=teacher(), args=config(**cfg))


def other_tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "quick", "the", "fox"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


def tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\nawful\t0\n")
    return str(path)


# (case id, callable taking (tmp_path, tiny_tokenizer), exception type, regex the message must match)
BAD_INPUTS = [
    ("temperature<=0", lambda p, t: config(temperature=0), ValueError, r"temperature must be > 0, got 0.*e\.g\. 2\.0"),
    ("negative weight", lambda p, t: config(hidden_weight=-1.0), ValueError, r"hidden_weight must be >= 0, got -1"),
    (
        "all weights zero",
        lambda p, t: config(task_weight=0, logits_weight=0),
        ValueError,
        r"all loss weights are 0.*task_weight=0\.5",
    ),
    ("unknown logit loss", lambda p, t: config(logits_loss="kld"), ValueError, r"logits_loss must be one of"),
    ("bad layer_mapping syntax", lambda p, t: config(layer_mapping="1-0"), ValueError, r"layer_mapping must be"),
    (
        "unknown distill_on",
        lambda p, t: config(distill_on="tokens"),
        ValueError,
        r"distill_on must be one of \('labels', 'all_tokens'\), got 'tokens'",
    ),
    (
        "softmax logit loss on a regression head",
        lambda p, t: DistillationTrainer(
            model=student(num_labels=1), teacher_model=teacher_with(num_labels=1), args=config(logits_loss="jsd")
        ),
        ValueError,
        r"logits_loss='jsd' with a regression head .* identically 0 .* Set logits_loss='mse'",
    ),
    (
        "softmax-only logit loss on a multi-label head",
        lambda p, t: DistillationTrainer(
            model=student(num_labels=3, problem_type="multi_label_classification"),
            teacher_model=teacher_with(num_labels=3, problem_type="multi_label_classification"),
            args=config(logits_loss="reverse_kl"),
        ),
        ValueError,
        r"logits_loss='reverse_kl' with a multi-label head .* Set logits_loss='kl' \(per-class sigmoid KL",
    ),
    (
        "teacher and student problem types differ",
        lambda p, t: DistillationTrainer(
            model=student(num_labels=3, problem_type="single_label_classification"),
            teacher_model=teacher_with(num_labels=3, problem_type="multi_label_classification"),
            args=config(),
        ),
        ValueError,
        r"problem_type differs: teacher 'multi_label_classification', student 'single_label_classification'",
    ),
    (
        "teacher layer out of range",
        lambda p, t: trainer(hidden_weight=1.0, layer_mapping="9->0"),
        ValueError,
        r"teacher layer 9, outside the teacher's layers 0\.\.3",
    ),
    (
        "student layer out of range",
        lambda p, t: trainer(hidden_weight=1.0, layer_mapping="3->5"),
        ValueError,
        r"student layer 5, outside the student's layers 0\.\.1",
    ),
    (
        "student deeper than teacher (make_student)",
        lambda p, t: make_student(teacher(), num_layers=8, verbose=False),
        ValueError,
        r"deeper than its teacher",
    ),
    (
        "student deeper than teacher (mapping)",
        lambda p, t: trainer(student(num_layers=6), hidden_weight=1.0, layer_mapping="uniform"),
        ValueError,
        r"cannot be deeper than its teacher",
    ),
    ("vocab mismatch", lambda p, t: trainer(student(vocab_size=100)), ValueError, r"vocab_size differs: teacher 64"),
    (
        "tokenizer mismatch",
        lambda p, t: DistillationTrainer(
            model=student(),
            teacher_model=teacher(),
            args=config(),
            processing_class=t,
            teacher_processing_class=other_tokenizer(p),
        ),
        ValueError,
        r"tokenize .* differently.*share one tokenizer",
    ),
    (
        "attention with different head counts",
        lambda p, t: trainer(student(heads=2), attention_weight=1.0),
        ValueError,
        r"(?s)4.*2.*attention_weight=0",
    ),
    (
        "label count mismatch",
        lambda p, t: trainer(student(num_labels=3)),
        ValueError,
        r"num_labels differs: teacher 2, student 3",
    ),
    (
        "unknown recipe key",
        lambda p, t: check_recipe_keys({"temprature": 2.0}),
        ValueError,
        r"'temprature' \(did you mean 'temperature'\?\)",
    ),
    (
        "dataset without the text column",
        lambda p, t: load_task_dataset(DataArguments(train_file=tsv(p), text_column="text")),
        ValueError,
        r"text_column='text' is not a column.*\['sentence', 'label'\]",
    ),
    (
        "dataset without the label column",
        lambda p, t: load_task_dataset(DataArguments(train_file=tsv(p), label_column="score")),
        ValueError,
        r"label_column='score' is not a column",
    ),
    (
        "max_train_samples < 1",
        lambda p, t: DataArguments(train_file="x.tsv", max_train_samples=0),
        ValueError,
        r"max_train_samples must be >= 1 or unset, got 0",
    ),
    (
        "teacher path does not exist",
        lambda p, t: load_teacher(ModelArguments(teacher_model_name_or_path=str(p / "no-such-teacher"))),
        FileNotFoundError,
        r"teacher_model_name_or_path=.*no-such-teacher.* does not exist",
    ),
    (
        "recipe file does not exist",
        lambda p, t: load_recipe(str(p / "missing.yaml")),
        FileNotFoundError,
        r"--config .*missing\.yaml.* does not exist",
    ),
]


@pytest.mark.parametrize("case,make,exc,match", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_error(case, make, exc, match, tmp_path, tiny_tokenizer):
    with pytest.raises(exc, match=match):
        make(tmp_path, tiny_tokenizer)


@pytest.mark.parametrize(
    "mapping,n_teacher,n_student,expected",
    [
        ("uniform", 12, 6, [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]),
        ("uniform", 4, 2, [(1, 0), (3, 1)]),
        ("alternate", 12, 6, [(0, 0), (2, 1), (4, 2), (7, 3), (9, 4), (11, 5)]),
        ("last", 12, 6, [(11, 5)]),
        ("1->0, 3->1", 4, 2, [(1, 0), (3, 1)]),
        ("1:0,3:1", 4, 2, [(1, 0), (3, 1)]),
    ],
)
def test_layer_mapping_strategies(mapping, n_teacher, n_student, expected):
    assert resolve_layer_pairs(mapping, n_teacher, n_student) == expected


def test_parse_layer_mapping_names_and_pairs():
    assert parse_layer_mapping("uniform") == "uniform"
    assert parse_layer_mapping("0->1,2->3") == [(0, 1), (2, 3)]


def test_config_round_trips_through_dict():
    cfg = config(temperature=3.0, hidden_weight=1.0, layer_mapping="last", hidden_loss="cosine")
    again = DistillationConfig(
        **{
            k: v
            for k, v in cfg.to_dict().items()
            if k in DistillationConfig.__dataclass_fields__ and DistillationConfig.__dataclass_fields__[k].init
        }
    )
    for key in ("temperature", "hidden_weight", "layer_mapping", "hidden_loss", "label_names"):
        assert getattr(again, key) == getattr(cfg, key)


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(r, REPO) for r in RECIPES])
def test_every_recipe_parses_and_validates(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.get("teacher_model_name_or_path"), "every recipe names its teacher"
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationConfig))
    recipe = {**recipe, "output_dir": str(tmp_path), "use_cpu": True}
    model_args, data_args, cfg = parser.parse_dict(recipe)
    assert cfg.temperature > 0
    # The comment headers of alignment-handbook recipes are there.
    text = open(path, encoding="utf-8").read()
    for header in ("# Model arguments", "# Distillation", "# Training"):
        assert header in text, f"{path} lacks the {header!r} header"


def test_accelerate_configs_parse():
    configs = sorted(glob.glob(os.path.join(REPO, "recipes", "accelerate_configs", "*.yaml")))
    names = {os.path.basename(c) for c in configs}
    assert {"cpu.yaml", "multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"} <= names
    for c in configs:
        assert "distributed_type" in yaml.safe_load(open(c))
