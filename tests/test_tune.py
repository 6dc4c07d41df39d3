"""Tuning (`hf_distill.tune`, `scripts/tune.py`) on a tiny teacher: the validation slice, per-trial values, the shared
teacher cache, seeded trials, bad search spaces, and the tuned recipe."""

import importlib.util
import json
import math
import os

import pytest
import torch
import yaml
from conftest import REPO, WORDS, tiny_bert_config, write_tiny_tsv
from transformers import BertForSequenceClassification, DataCollatorWithPadding

import hf_distill.data
from hf_distill import (
    DataArguments,
    DistillationConfig,
    DistillationTrainer,
    load_recipe,
    make_student,
    parse_distill_args,
    row_counts,
    tokenize_dataset,
)
from hf_distill.data import _texts
from hf_distill.tune import TuneConfig, load_tuning_splits, search_dimensions, tune_distillation
from hf_distill.tune_recipe import parse_tune_args, set_recipe_values

pytest.importorskip("optuna")

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
RECIPE = """# Model arguments
teacher_model_name_or_path: teacher
student_num_layers: 2

# Data arguments
train_file: train.tsv
validation_file: dev.tsv
max_length: 16
max_train_samples: 40

# Distillation
temperature: 2.0
task_weight: 0.5
logits_weight: 0.5

# Training
output_dir: run
max_steps: 2
per_device_train_batch_size: 8
per_device_eval_batch_size: 16
learning_rate: 1.0e-3
warmup_steps: 0
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
seed: 0
"""
# A student narrower than the teacher, matched on hidden states: the trainer learns projections.
HIDDEN_RECIPE = RECIPE.replace("student_num_layers: 2", "student_model_name_or_path: narrow_student").replace(
    "logits_weight: 0.5\n", "logits_weight: 0.5\nhidden_weight: 1.0\nlayer_mapping: '1->0,3->1'\n"
)
FAST = ["--temperature_range", "none", "--learning_rate_range", "none", "--validation_samples", "8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A tiny teacher (no dropout), a narrower saved student, train/dev TSVs and two recipes in one folder."""
    root = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **NO_DROPOUT))
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, **NO_DROPOUT)).save_pretrained(
        root / "narrow_student"
    )
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("dev", 16)):
        write_tiny_tsv(root / f"{split}.tsv", n, g)
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "hidden.yaml").write_text(HIDDEN_RECIPE)
    return root


def tune_args(workdir, tmp_path, *flags, recipe="recipe.yaml"):
    return parse_tune_args(
        ["--config", str(workdir / recipe), "--tune_dir", str(tmp_path / "tune"), "--enqueue_base", "false", *flags]
    )


def run(workdir, tmp_path, *flags, recipe="recipe.yaml", **kwargs):
    args = tune_args(workdir, tmp_path, *flags, recipe=recipe)
    d = args.distill
    return tune_distillation(d.model, d.data, d.training, args.tune, **kwargs)


def complete(result):
    return [t for t in result.trials if t["state"] == "COMPLETE"]


def load_teacher_and_tokenizer(workdir):
    from transformers import AutoTokenizer

    return BertForSequenceClassification.from_pretrained(workdir / "teacher"), AutoTokenizer.from_pretrained(
        workdir / "teacher"
    )


# ------------------------------------------------------------------------------------------------ the validation slice
def words(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) for _ in range(n)]


@pytest.mark.parametrize(
    "source, unlabelled",
    [
        ({}, 0),
        ({"unlabelled_from_train": True}, 60 - 40),
        # 30 new sentences and a copy of every training sentence: the 10 copies of validation sentences are dropped.
        ({"unlabelled_file": "copies"}, 30 + 60 - 10),
    ],
    ids=["labelled-only", "unlabelled-from-train", "unlabelled-file-with-copies"],
)
def test_validation_slice_is_labelled_seeded_and_disjoint_from_every_trained_row(tmp_path, source, unlabelled):
    train = [f"{s}\t{i % 2}" for i, s in enumerate(words(60, 0))]
    (tmp_path / "train.tsv").write_text("\n".join(["sentence\tlabel", *train]) + "\n")
    if source.get("unlabelled_file"):
        (tmp_path / "transfer.txt").write_text("\n".join([*words(30, 1), *(r.split("\t")[0] for r in train)]) + "\n")
        source = {"unlabelled_file": str(tmp_path / "transfer.txt")}
    data_args = DataArguments(train_file=str(tmp_path / "train.tsv"), max_train_samples=40, **source)
    tune = TuneConfig(validation_samples=10, validation_seed=3)
    splits, info = load_tuning_splits(data_args, tune, seed=0)
    trained, validation = splits["train"], splits["validation"]
    assert len(validation) == 10 == info["validation_rows"]
    assert all(label in (0, 1) for label in validation["label"])  # labelled rows only
    assert not set(_texts(validation, data_args)) & set(_texts(trained, data_args))
    assert row_counts(trained) == info["train_rows"] == {"labelled": 40 - 10, "unlabelled": unlabelled}
    assert info["dropped_training_copies"] == (10 if "unlabelled_file" in source else 0)
    again, _ = load_tuning_splits(data_args, tune, seed=0)
    assert again["validation"]["sentence"] == validation["sentence"]
    other, _ = load_tuning_splits(data_args, TuneConfig(validation_samples=10, validation_seed=4), seed=0)
    assert other["validation"]["sentence"] != validation["sentence"]


def test_tuning_never_reads_the_dev_split(workdir, tmp_path, monkeypatch):
    opened = []
    real_builder, real_load = hf_distill.data._local_builder, hf_distill.data.load_dataset
    monkeypatch.setattr(
        hf_distill.data, "_local_builder", lambda path, *a, **k: opened.append(path) or real_builder(path, *a, **k)
    )
    monkeypatch.setattr(
        hf_distill.data, "load_dataset", lambda *a, **k: opened.append(k.get("data_files")) or real_load(*a, **k)
    )
    result = run(workdir, tmp_path, *FAST, "--n_trials", "1")
    assert complete(result) and opened
    assert not any("dev.tsv" in str(item) for item in opened), opened
    assert result.validation["validation_rows"] == 8


# ------------------------------------------------------------------------------------------------ per-trial values
def test_each_trial_trains_with_its_own_values_as_a_plain_run_would(workdir, tmp_path, tiny_tokenizer):
    # alpha=1: task_weight 0 (logits only); alpha=0: logits_weight 0 (task only).
    result = run(
        workdir, tmp_path, *FAST, "--alpha_range", "0,1", "--n_trials", "2", enqueue=[{"alpha": 1.0}, {"alpha": 0.0}]
    )
    logits_only, task_only = complete(result)
    assert logits_only["values"] == {"logits_weight": 1.0, "task_weight": 0.0}
    assert task_only["values"] == {"logits_weight": 0.0, "task_weight": 1.0}
    # The terms each trial's loss was made of, as evaluated on the validation slice.
    assert "eval_loss_logits" in logits_only["metrics"] and "eval_loss_task" not in logits_only["metrics"]
    assert "eval_loss_task" in task_only["metrics"] and "eval_loss_logits" not in task_only["metrics"]

    # The same values in a plain run (a student, no model_init, no search, the live teacher) give the same result.
    args = tune_args(workdir, tmp_path, *FAST)
    splits, _ = load_tuning_splits(args.distill.data, args.tune, seed=0)
    ds = tokenize_dataset(splits, tiny_tokenizer, args.distill.data)
    teacher, tokenizer = load_teacher_and_tokenizer(workdir)

    def plain(**values):
        trainer = DistillationTrainer(
            model=make_student(teacher, num_layers=2),
            teacher_model=teacher,
            args=DistillationConfig(
                output_dir=str(tmp_path / "plain"),
                max_steps=2,
                per_device_train_batch_size=8,
                per_device_eval_batch_size=16,
                learning_rate=1e-3,
                warmup_steps=0,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=0,
                temperature=2.0,
                **values,
            ),
            train_dataset=ds["train"],
            eval_dataset=ds["validation"],
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        trainer.train()
        return trainer.evaluate()

    for trial in (logits_only, task_only):
        metrics = plain(**trial["values"])
        for key in ("eval_loss", "eval_loss_logits", "eval_loss_task"):
            if key in trial["metrics"]:
                assert metrics[key] == pytest.approx(trial["metrics"][key], rel=1e-4), key
    assert plain(task_weight=0.5, logits_weight=0.5)["eval_loss"] != pytest.approx(
        logits_only["metrics"]["eval_loss"], rel=1e-2
    )


def test_every_trial_starts_from_fresh_projections(workdir, tmp_path):
    # Twice the same values: a trial that inherited the projections the trial before it trained would differ.
    result = run(
        workdir,
        tmp_path,
        *FAST,
        "--alpha_range",
        "none",
        "--n_trials",
        "2",
        recipe="hidden.yaml",
        enqueue=[{"hidden_weight": 1.0}, {"hidden_weight": 1.0}],
    )
    first, second = complete(result)
    assert "eval_loss_hidden" in first["metrics"]
    for key in ("eval_loss", "eval_loss_hidden", "eval_loss_task", "eval_loss_logits"):
        assert first["metrics"][key] == pytest.approx(second["metrics"][key], rel=1e-6), key


def test_a_trial_cannot_switch_on_a_term_the_trainer_was_built_without(workdir, tmp_path, tiny_tokenizer):
    teacher, tokenizer = load_teacher_and_tokenizer(workdir)
    enc = tiny_tokenizer(words(16, 0), truncation=True, max_length=16)
    from datasets import Dataset

    trainer = DistillationTrainer(
        model_init=lambda: make_student(teacher, num_layers=2),
        teacher_model=teacher,
        args=DistillationConfig(
            output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True, save_strategy="no"
        ),
        train_dataset=Dataset.from_dict({**enc, "labels": [i % 2 for i in range(16)]}),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    with pytest.raises(ValueError, match=r"trial 0 sets hidden_weight=1\.0, but the trainer was built with hidden_w"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"hidden_weight": 1.0}, n_trials=1, backend="optuna")


# ------------------------------------------------------------------------------------------------ the teacher cache
def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_teacher_runs_once_for_all_trials_and_not_again_on_a_rerun(workdir, tmp_path):
    teacher, tokenizer = load_teacher_and_tokenizer(workdir)
    calls = count_forwards(teacher)
    first = run(workdir, tmp_path, *FAST, "--n_trials", "3", teacher=teacher, tokenizer=tokenizer)
    assert len(complete(first)) == 3 and first.teacher_cache["built"]
    # One pass over the training rows and one over the validation slice, in eval batches of 16; none in the trials.
    train_rows, validation_rows = first.settings["run"]["train_rows"], first.validation["validation_rows"]
    assert calls[0] == math.ceil(train_rows / 16) + math.ceil(validation_rows / 16)

    calls[0] = 0
    again = run(workdir, tmp_path, *FAST, "--n_trials", "4", teacher=teacher, tokenizer=tokenizer)  # continues
    assert calls[0] == 0 and not again.teacher_cache["built"]
    assert [t["number"] for t in complete(again)] == [0, 1, 2, 3]
    assert complete(again)[:3] == complete(first)

    # Without the cache the teacher runs in every step of every trial and on every validation batch.
    calls[0] = 0
    live = run(
        workdir,
        tmp_path / "live",
        *FAST,
        "--n_trials",
        "2",
        "--use_teacher_cache",
        "false",
        teacher=teacher,
        tokenizer=tokenizer,
    )
    assert live.teacher_cache is None
    assert calls[0] == 2 * (2 + math.ceil(validation_rows / 16))  # max_steps 2


def test_a_rerun_with_other_settings_is_refused(workdir, tmp_path):
    run(workdir, tmp_path, *FAST, "--n_trials", "1")
    with pytest.raises(ValueError, match=r"was run with other settings \(.*max_steps: 2 -> 3"):
        run(workdir, tmp_path, *FAST, "--n_trials", "2", "--max_steps", "3")


def test_a_study_recorded_before_a_field_existed_continues_while_the_field_is_at_its_default(workdir, tmp_path):
    import optuna

    run(workdir, tmp_path, *FAST, "--n_trials", "1")
    study = optuna.load_study(study_name="hf-distill", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    recorded = study.user_attrs["settings"]
    recorded["run"] = {k: v for k, v in recorded["run"].items() if not k.startswith("ema_")}  # an older hf-distill
    study.set_user_attr("settings", recorded)
    assert len(complete(run(workdir, tmp_path, *FAST, "--n_trials", "2"))) == 2
    with pytest.raises(ValueError, match=r"other settings \(ema_decay: '<not set>' -> 0.99\)"):
        run(workdir, tmp_path, *FAST, "--n_trials", "3", "--ema_decay", "0.99")


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_continued_study_samples_what_an_uninterrupted_one_does_and_never_replays_its_trials(
    workdir, tmp_path, sampler
):
    """A sampler seeded once per process replayed its first draws when a study was continued: the SST-2 sweep
    resumed after a kill re-ran 4 of its trials with the very same values."""
    flags = ["--validation_samples", "8", "--sampler", sampler, "--learning_rate_range", "none"]
    whole = run(workdir, tmp_path / "whole", *flags, "--n_trials", "4")
    run(workdir, tmp_path / "parts", *flags, "--n_trials", "1")
    run(workdir, tmp_path / "parts", *flags, "--n_trials", "2")
    parts = run(workdir, tmp_path / "parts", *flags, "--n_trials", "4")
    params = [t["params"] for t in complete(whole)]
    assert [t["params"] for t in complete(parts)] == params
    assert len({tuple(sorted(p.items())) for p in params}) == 4  # four different points


def test_the_same_sampler_seed_gives_the_same_trials(workdir, tmp_path):
    flags = ["--validation_samples", "8", "--n_trials", "2"]
    a = run(workdir, tmp_path / "a", *flags, "--sampler_seed", "7")
    b = run(workdir, tmp_path / "b", *flags, "--sampler_seed", "7")
    c = run(workdir, tmp_path / "c", *flags, "--sampler_seed", "8")
    assert [(t["params"], t["objective"]) for t in complete(a)] == [(t["params"], t["objective"]) for t in complete(b)]
    assert [t["params"] for t in complete(a)] != [t["params"] for t in complete(c)]


# ------------------------------------------------------------------------------------------------ bad search spaces
BAD = [
    (["--temperature_range", "0,4"], r"temperature_range must be 'low,high' with low < high and low > 0, got '0,4'"),
    (["--alpha_range", "0.5,1.5"], r"alpha_range must be .* low >= 0 and high <= 1, got '0\.5,1\.5'"),
    (["--learning_rate_range", "1e-3,1e-4"], r"learning_rate_range must be 'low,high' with low < high.*'1e-3,1e-4'"),
    (["--temperature_range", "hot"], r"temperature_range must be 'low,high'.*got 'hot'"),
    (["--temperature_range", "auto"], r"temperature_range='auto' is only for the intermediate weights"),
    (
        ["--hidden_weight_range", "0.1,1"],
        r"hidden_weight_range='0\.1,1' searches hidden_weight, but the recipe has "
        r"hidden_weight=0",
    ),
    (
        ["--logits_weight", "0", "--task_weight", "1"],
        r"temperature_range='1,8' searches temperature, but the recipe "
        r"has logits_weight=0",
    ),
    (["--metric", "loss"], r"metric='loss' selects on the distillation loss, which depends on the searched temp"),
    (["--validation_samples", "0"], r"validation_samples must be >= 1, got 0"),
    (["--validation_samples", "5", "--validation_fraction", "0.2"], r"set validation_samples=5 or validation_fr"),
    (["--validation_fraction", "1.5"], r"validation_fraction must be in \(0, 1\), got 1\.5"),
    (["--n_trials", "0"], r"n_trials must be >= 1, got 0"),
    (["--sampler", "grid"], r"sampler must be one of \('tpe', 'random'\), got 'grid'"),
    (
        ["--temperature_range", "none", "--alpha_range", "none", "--learning_rate_range", "none"],
        r"the search space is empty",
    ),
]


@pytest.mark.parametrize("flags, match", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_search_spaces_are_refused_before_anything_is_loaded(workdir, tmp_path, flags, match):
    # The train file does not exist: an error about the search space comes before any data is read.
    with pytest.raises(ValueError, match=match):
        run(workdir, tmp_path, *flags, "--train_file", str(tmp_path / "missing.tsv"))
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--validation_samples", "40"], r"validation_samples=40 holds out 40 rows, but the train split has 40 label"),
        (["--metric", "f1"], r"metric='f1' is not computed for this task; the validation metrics are \['accuracy'\]"),
    ],
)
def test_bad_tuning_inputs_found_in_the_data_are_refused_before_any_trial(workdir, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        run(workdir, tmp_path, *FAST, *flags)
    assert not (tmp_path / "tune" / "study.db").exists()


def test_auto_searches_only_the_intermediate_terms_the_recipe_turns_on(workdir):
    args = parse_distill_args(["--config", str(workdir / "hidden.yaml")]).training
    names = [d.describe() for d in search_dimensions(TuneConfig(), args)]
    assert names == [
        "temperature [1, 8]",
        "alpha [0.1, 0.9]",
        "learning_rate [2e-05, 0.0005] log",
        "hidden_weight [0.25, 4] log",
    ]


# ------------------------------------------------------------------------------------------------ the tuned recipe
def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tuned_recipe_loads_and_runs(workdir, tmp_path):
    tuned = tmp_path / "tuned.yaml"
    argv = [
        "--config",
        str(workdir / "recipe.yaml"),
        "--tune_dir",
        str(tmp_path / "tune"),
        "--tuned_recipe",
        str(tuned),
        "--n_trials",
        "2",
        "--validation_samples",
        "8",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    result = load_script("tune").main(argv)
    best = result.best

    recipe = load_recipe(tuned)  # every key is a field; relative paths resolve to the same files
    for name, value in best["values"].items():
        assert recipe[name] == value
    assert recipe["train_file"] == str(workdir / "train.tsv") and recipe["output_dir"] == str(tmp_path / "run")
    header = tuned.read_text().split("\n\n")[0]
    for fact in (
        "2 complete trials",
        "tpe (seed 0)",
        "validation slice of 8 labelled training rows",
        "the dev split (validation_file / eval_split) was not read",
        f"Best: trial {best['number']}",
    ):
        assert fact in header.replace("\n# ", " "), fact
    trials = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert [t["params"] for t in trials["trials"]] == [t["params"] for t in result.trials]
    assert all(t["seconds"] > 0 and t["cpu_seconds"] > 0 and t["objective"] is not None for t in trials["trials"])
    assert not list(tmp_path.rglob("*.tmp"))

    # It runs: scripts/distill.py trains with the tuned values, and evaluates on the dev split.
    args = parse_distill_args(["--config", str(tuned)]).training
    assert {name: getattr(args, name) for name in best["values"]} == best["values"]
    load_script("distill").main(["--config", str(tuned)])
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    assert "eval_accuracy" in json.loads((tmp_path / "run" / "eval_results.json").read_text())


def test_set_recipe_values_keeps_comments_and_adds_missing_keys_to_their_section():
    text = "# Model arguments\nstudent_num_layers: 3\n\n# Distillation\ntemperature: 2.0  # T\n\n# Training\nseed: 1\n"
    out = set_recipe_values(text, {"temperature": 3.5, "hidden_weight": 0.5, "learning_rate": 2.0e-5, "seed": 1})
    assert out == (
        "# Model arguments\nstudent_num_layers: 3\n\n# Distillation\ntemperature: 3.5\nhidden_weight: 0.5"
        "\n\n# Training\nseed: 1\nlearning_rate: 2.0e-05\n"
    )
    assert yaml.safe_load(out)["learning_rate"] == 2.0e-5


def test_the_tuned_recipe_header_says_when_trials_repeated_a_point():
    from hf_distill.tune_recipe import _repeats

    a, b = {"params": {"temperature": 4.8, "alpha": 0.7}}, {"params": {"alpha": 0.7, "temperature": 4.8}}
    assert _repeats([a, b, {"params": {"temperature": 2.0, "alpha": 0.5}}]) == "; 2 distinct points"
    assert _repeats([a, {"params": {"temperature": 2.0, "alpha": 0.5}}]) == ""
