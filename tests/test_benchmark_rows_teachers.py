"""Benchmark rows beyond one teacher and one student (hf_distill.benchmark_rows): multi-teacher rows over extra
teachers fine-tuned under other seeds, and deep-mutual-learning rows over copies of student_init."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_bert_config
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from hf_distill import benchmark
from hf_distill.benchmark import (
    LOG_HISTORY_FILE,
    STAGE_FILE,
    Benchmark,
    load_benchmark_config,
    recipe_training_args,
    run_benchmark,
)
from hf_distill.benchmark_rows import mutual_training_args
from hf_distill.evaluation import predict_logits
from hf_distill.mutual_config import parse_mutual_args
from hf_distill.trainer import DistillationTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2"))
RECIPES = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3")
METHODS = os.path.join(REPO, "benchmarks", "sst2_minilm_l3_methods.yaml")
BASE = os.path.join(REPO, "benchmarks", "sst2_minilm_l3.yaml")  # the default benchmark, with the rows of each test
MULTI = os.path.join(RECIPES, "multi_teacher_seeds.yaml")
DML = os.path.join(RECIPES, "mutual", "benchmark_dml.yaml")
HAS_SST2 = os.path.isfile(os.path.join(SST2, "train.tsv"))

# The rows of the methods table that this module adds, on the default benchmark.
ROWS = {
    "rows": {"vanilla_kd": [os.path.join(RECIPES, "vanilla_kd.yaml")], "multi_teacher_seeds": [MULTI]},
    "extra_teacher_seeds": [43],
    "mutual_rows": {"dml": DML},
}


# ---------------------------------------------------------------------------------------------------- the recipes
def test_multi_teacher_recipe_is_vanilla_kd_plus_two_teachers():
    vanilla, multi = recipe_training_args(os.path.join(RECIPES, "vanilla_kd.yaml")), recipe_training_args(MULTI)
    extra = {k: multi[k] for k in set(multi) - set(vanilla)}
    assert extra == {"teacher_weights": [0.5, 0.5], "multi_teacher_average": "probs", "use_teacher_cache": False}
    assert {k: multi[k] for k in vanilla} == vanilla
    assert "extra_teacher_model_names_or_paths" not in yaml.safe_load(open(MULTI, encoding="utf-8"))


def test_dml_recipe_is_the_papers_and_runs_with_scripts_mutual():
    peer_args, _, args, _ = parse_mutual_args(["--config", DML, "--output_dir", "unused", "--use_cpu", "true"])
    assert (args.temperature, args.task_weight, args.logits_weight, args.logits_loss) == (1.0, 1.0, 1.0, "kl")
    assert args.learning_rate == recipe_training_args(os.path.join(RECIPES, "vanilla_kd.yaml"))["learning_rate"]
    assert len(peer_args.peer_num_layers) == 2
    training = mutual_training_args(DML)
    assert "output_dir" not in training and "seed" not in training and training["logits_weight"] == 1.0


def test_methods_benchmark_has_the_rows():
    config = load_benchmark_config(METHODS)
    assert config.extra_teacher_seeds == [43] and config.mutual_num_peers == 2
    assert config.rows["multi_teacher_seeds"] == ["recipes/minilm-sst2_to_minilm-l3/multi_teacher_seeds.yaml"]
    assert config.mutual_rows == {"dml": "recipes/minilm-sst2_to_minilm-l3/mutual/benchmark_dml.yaml"}
    bench = Benchmark(config, REPO)
    bench.check_row_recipes()  # valid as shipped; builds nothing
    assert not bench.out.exists() or bench.out.is_dir()


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "override, message",
    [
        ({"extra_teacher_seeds": [42]}, r"extra_teacher_seeds must be a list of distinct integers other than seed=42"),
        ({"extra_teacher_seeds": [43, 43]}, r"extra_teacher_seeds must be a list of distinct integers"),
        ({"extra_teacher_seeds": 43}, r"extra_teacher_seeds must be a list of distinct integers"),
        ({"extra_teacher_seeds": [43], "finetune_teacher": False}, r"but finetune_teacher is false"),
        ({"mutual_rows": ["dml"]}, r"mutual_rows must map row names to one mutual-learning recipe each"),
        ({"mutual_rows": {"dml": None}}, r"mutual_rows must map row names to one mutual-learning recipe each"),
        ({"mutual_rows": {"vanilla_kd": DML}}, r"mutual_rows names 'vanilla_kd', which is already a row"),
        ({"mutual_rows": {"no_kd": DML}}, r"mutual_rows names 'no_kd', which is already a row"),
        ({"mutual_rows": {"teacher-seed43": DML}}, r"row name 'teacher-seed43' is taken"),
        ({"mutual_rows": {"d m l": DML}}, r"row name 'd m l' must be a plain folder name"),
        ({"mutual_num_peers": 1}, r"mutual_num_peers must be an integer >= 2"),
        ({"rows": {"teacher-seed43": [MULTI]}}, r"row name 'teacher-seed43' is taken"),
    ],
)
def test_bad_rows_config(override, message):
    with pytest.raises(ValueError, match=message):
        load_benchmark_config(BASE, {**ROWS, **override})


def test_seed_rows_may_name_a_mutual_row():
    assert load_benchmark_config(BASE, {**ROWS, "seed_rows": ["dml"]}).seed_rows == ["dml"]


def _write(path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    "override, recipe, message",
    [
        # One weight per teacher: two weights but no extra teacher.
        ({"extra_teacher_seeds": []}, None, r"row 'multi_teacher_seeds', recipe .*multi_teacher_seeds.yaml: "
         r"teacher_weights=\[0.5, 0.5\] has 2 entries but this benchmark has 1 teacher\(s\) \(teacher; "
         r"extra_teacher_seeds=\[\]\)\. Give one weight per teacher, the teacher first, or set extra_teacher_seeds "
         r"to 1 seed\(s\), e.g\. extra_teacher_seeds: \[43\]"),
        ({"extra_teacher_seeds": [43, 44]}, None, r"has 2 entries but this benchmark has 3 teacher\(s\) \(teacher, "
         r"teacher-seed43, teacher-seed44"),
        # Several teachers and the benchmark's cache: the recipe must keep the cache off.
        ({}, {"temperature": 2.0, "task_weight": 0.5, "logits_weight": 0.5, "teacher_weights": [0.5, 0.5]},
         r"distils from 2 teachers, which the teacher cache cannot serve .* Set use_teacher_cache: false"),
        # Mutual rows: a missing recipe, a recipe with a teacher-based term, a recipe of unknown keys.
        ({"mutual_rows": {"dml": "recipes/nowhere/dml.yaml"}}, None,
         r"mutual_rows\['dml'\]='recipes/nowhere/dml.yaml' does not exist"),
        ({}, {"hidden_weight": 1.0}, r"mutual_rows\['dml'\] \(.*\): hidden_weight=1.0 matches a student's hidden"),
        ({}, {"temprature": 1.0}, r"unknown key\(s\) in .*'temprature' \(did you mean 'temperature'\?\)"),
    ],
)  # fmt: skip
def test_bad_row_recipes_are_refused_before_any_stage(tmp_path, override, recipe, message):
    override = {**ROWS, "output_dir": str(tmp_path / "out"), **override}
    if recipe is not None and "teacher_weights" in recipe:
        override["rows"] = {"multi": [_write(tmp_path / "multi.yaml", recipe)]}
    elif recipe is not None:
        override["mutual_rows"] = {"dml": _write(tmp_path / "dml.yaml", recipe)}
    config = load_benchmark_config(BASE, override)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_benchmark(config, REPO)
    assert not (tmp_path / "out").exists()  # refused before any stage: nothing trained, nothing written


# ---------------------------------------------------------------------------------------------------- end to end
def _save_base(tmp_path, tokenizer) -> None:
    """The pre-trained "checkpoint" the benchmark fine-tunes its teachers from: a tiny BERT and its tokenizer."""
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=32)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")


def _tiny_config(tmp_path, **overrides):
    values = {
        "name": "tiny_rows",
        "output_dir": str(tmp_path / "out"),
        "teacher_model_name_or_path": str(tmp_path / "base"),
        "teacher_hub_fallback": None,
        "teacher_learning_rate": 1e-3,
        "teacher_num_train_epochs": 1,
        "train_file": os.path.join(SST2, "train.tsv"),
        "validation_file": os.path.join(SST2, "dev.tsv"),
        "max_length": 24,
        "max_train_samples": 64,  # 2 steps at batch 32
        "unlabelled_from_train": False,
        "max_unlabelled_samples": None,
        "teacher_cache": True,  # the one-teacher rows use it; the multi-teacher recipe keeps it off
        "max_eval_samples": 40,
        "student_num_layers": 1,
        "logging_steps": 1,
        "save_steps": 1,
        "baseline_recipe": os.path.join(RECIPES, "no_kd.yaml"),
        "rows": {"vanilla_kd": [os.path.join(RECIPES, "vanilla_kd.yaml")], "multi_teacher_seeds": [MULTI]},
        "extra_teacher_seeds": [43],
        "mutual_rows": {"dml": DML},
        "results_file": None,  # no record in the repository
        **overrides,
    }
    return load_benchmark_config(BASE, values)


def _eval_set(out):
    config = benchmark.BenchmarkConfig(**json.loads((out / "results.json").read_text())["config"])
    return Benchmark(config, REPO).dataset["eval"]


def _stage_mtimes(out):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "**" / STAGE_FILE), recursive=True)}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SST2, reason="real SST-2 files not found")
def test_multi_teacher_and_mutual_rows_end_to_end(tmp_path, tiny_tokenizer, monkeypatch):
    _save_base(tmp_path, tiny_tokenizer)
    config = _tiny_config(tmp_path)
    out = tmp_path / "out"

    teachers_of_row = {}  # row -> the teachers its DistillationTrainer distils from
    first_forward = {}  # row -> the student's inputs and logits of its first training forward

    class Recording(DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            row = os.path.basename(os.path.dirname(self.args.output_dir.rstrip("/")))
            teachers_of_row[row] = self.teachers

            def hook(module, args, inputs, output):
                if module.training:
                    first_forward.setdefault(row, ({k: v.clone() for k, v in inputs.items()}, output.logits.detach()))

            self.model.register_forward_hook(hook, with_kwargs=True)

    monkeypatch.setattr(benchmark, "DistillationTrainer", Recording)
    results = run_benchmark(config, REPO)
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "teacher-seed43", "no_kd", "vanilla_kd", "multi_teacher_seeds", "dml"]

    # The extra teacher: the teacher's fine-tune (same spec, steps and rows) under seed 43, so other weights.
    main_info = json.loads((out / "teacher" / STAGE_FILE).read_text())
    extra_info = json.loads((out / "teacher-seed43" / STAGE_FILE).read_text())
    assert {k: v for k, v in extra_info["spec"].items() if k != "teacher_seed"} == {
        **main_info["spec"],
        "stage": "teacher-seed43",
    }
    assert extra_info["spec"]["teacher_seed"] == 43 and extra_info["global_step"] == main_info["global_step"] == 2
    main = AutoModelForSequenceClassification.from_pretrained(out / "teacher").state_dict()
    extra = AutoModelForSequenceClassification.from_pretrained(out / "teacher-seed43").state_dict()
    assert main.keys() == extra.keys()
    assert not torch.equal(main["classifier.weight"], extra["classifier.weight"])  # its head drawn from seed 43
    assert rows["teacher-seed43"]["teacher_seed"] == 43 and rows["teacher-seed43"]["train_steps"] == 2
    assert rows["teacher-seed43"]["recipes"] == ["fine-tune (seed 43)"]

    # The multi-teacher row distilled from both teachers, in order; the one-teacher rows from the teacher alone.
    multi = teachers_of_row["multi_teacher_seeds"]
    assert len(multi) == 2 and len(teachers_of_row["vanilla_kd"]) == 1
    for teacher, reference in zip(multi, (main, extra)):
        assert all(torch.equal(teacher.state_dict()[k], reference[k]) for k in reference)
    # Its logged logit term at step 1 is KL(0.5 p_teacher + 0.5 p_teacher-seed43 || p_student) at T = 2, by hand (in
    # float64; the trainer's fp32 sum of near-cancelling terms is good to ~1e-3 here), and neither teacher alone's.
    inputs, student_logits = first_forward["multi_teacher_seeds"]
    with torch.no_grad():
        p_teachers = [torch.softmax(t(**inputs).logits.double() / 2.0, -1) for t in multi]
    log_s = torch.log_softmax(student_logits.double() / 2.0, -1)

    def kl_t2(p):
        return (4.0 * (p * (p.log() - log_s)).sum(-1).mean()).item()

    multi_dir = out / "rows" / "multi_teacher_seeds" / "1-multi_teacher_seeds"
    history = json.loads((multi_dir / LOG_HISTORY_FILE).read_text())
    logged = next(h["loss_logits"] for h in history if h.get("step") == 1 and "loss_logits" in h)
    assert logged == pytest.approx(kl_t2(0.5 * p_teachers[0] + 0.5 * p_teachers[1]), rel=2e-3)
    assert all(logged != pytest.approx(kl_t2(p), rel=2e-2) for p in p_teachers)
    spec = json.loads((multi_dir / STAGE_FILE).read_text())
    assert spec["spec"]["extra_teachers"] == {"teacher-seed43": benchmark.fingerprint(extra_info["spec"])}
    assert "teacher_cache" not in spec["spec"] and spec["spec"]["recipe"]["teacher_weights"] == [0.5, 0.5]
    vanilla_spec = json.loads((out / "rows" / "vanilla_kd" / "1-vanilla_kd" / STAGE_FILE).read_text())["spec"]
    assert "extra_teachers" not in vanilla_spec and vanilla_spec["teacher_cache"] is True

    # The DML row: 2 peers for the row budget on the labelled rows; its figures are peer 0's.
    dml_dir = out / "rows" / "dml" / "1-benchmark_dml"
    assert (dml_dir / "peer0" / "config.json").is_file() and (dml_dir / "peer1" / "config.json").is_file()
    history = json.loads((dml_dir / LOG_HISTORY_FILE).read_text())
    assert {"loss_task_peer0", "loss_mutual_peer0", "loss_task_peer1", "loss_mutual_peer1"} <= set().union(*history)
    dml = rows["dml"]
    assert dml["train_steps"] == rows["no_kd"]["train_steps"] == rows["vanilla_kd"]["train_steps"] == 2
    assert (dml["train_rows_labelled"], dml["train_rows_unlabelled"], dml["transfer_set"]) == (64, 0, False)
    eval_set = _eval_set(out)
    collator = Benchmark(config, REPO).collator
    peers = [AutoModelForSequenceClassification.from_pretrained(dml_dir / f"peer{k}").eval() for k in (0, 1)]
    with torch.inference_mode():
        (z0, labels), (z1, _) = (predict_logits(p, eval_set, collator) for p in peers)
    assert dml["accuracy"] == pytest.approx(float(np.mean(z0.argmax(-1) == labels)))
    assert dml["peer_accuracy"] == pytest.approx([float(np.mean(z.argmax(-1) == labels)) for z in (z0, z1)])
    mean = (torch.softmax(torch.tensor(z0), -1) + torch.softmax(torch.tensor(z1), -1)) / 2
    assert dml["ensemble_accuracy"] == pytest.approx(float(np.mean(mean.argmax(-1).numpy() == labels)))
    assert (dml["num_peers"], dml["evaluated_peer"]) == (2, 0)
    assert not torch.equal(peers[0].classifier.weight, peers[1].classifier.weight)  # trained apart (dropout)
    assert results["budget"]["mutual_rows"] == ["dml"] and results["budget"]["extra_teacher_seeds"] == [43]

    table = (out / "results.md").read_text()
    assert "| teacher-seed43 | fine-tune (seed 43) |" in table and "| dml | benchmark_dml |" in table
    assert "dml: deep mutual learning of 2 copies of student_init" in table
    assert "every student row 2 optimizer steps" in table  # the extra teacher is not a student row

    # A rerun reuses every stage and rewrites none.
    mtimes = _stage_mtimes(out)
    again = run_benchmark(config, REPO)
    assert {s["status"] for s in again["stages"]} == {"reused"}
    assert _stage_mtimes(out) == mtimes

    # Another extra teacher: the one-teacher rows are reused, the multi-teacher row is not silently reused.
    with pytest.raises(ValueError, match=r"multi_teacher_seeds.*other settings \(differing: \['extra_teachers'\]\)"):
        run_benchmark(_tiny_config(tmp_path, extra_teacher_seeds=[44]), REPO)
    assert (out / "teacher-seed44" / STAGE_FILE).is_file()
    assert (
        os.stat(out / "rows" / "vanilla_kd" / "1-vanilla_kd" / STAGE_FILE).st_mtime_ns
        == mtimes[str(out / "rows" / "vanilla_kd" / "1-vanilla_kd" / STAGE_FILE)]
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SST2, reason="real SST-2 files not found")
def test_mutual_row_resumes_from_its_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    """An interrupted DML stage resumes from its last checkpoint (peer<k>/ folders) to the peers an uninterrupted
    run trains."""
    from hf_distill.mutual import MutualLearningTrainer

    _save_base(tmp_path, tiny_tokenizer)
    rows = {"rows": {"vanilla_kd": [os.path.join(RECIPES, "vanilla_kd.yaml")]}, "extra_teacher_seeds": []}
    config = _tiny_config(tmp_path, teacher_cache=False, **rows)
    out = tmp_path / "out"
    stage = out / "rows" / "dml" / "1-benchmark_dml"

    original, calls = MutualLearningTrainer.training_step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the checkpoint of step 1
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MutualLearningTrainer, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config, REPO)
    monkeypatch.setattr(MutualLearningTrainer, "training_step", original)
    checkpoint = stage.with_name("1-benchmark_dml.checkpoints") / "checkpoint-1"
    assert (checkpoint / "peer0").is_dir() and (checkpoint / "peer1").is_dir() and not stage.exists()

    results = run_benchmark(config, REPO)
    status = {os.path.relpath(s["path"], out): s["status"] for s in results["stages"]}
    assert status["rows/dml/1-benchmark_dml"] == "resumed" and status["teacher"] == "reused"
    assert not stage.with_name("1-benchmark_dml.checkpoints").exists()

    fresh = run_benchmark(
        _tiny_config(tmp_path, teacher_cache=False, output_dir=str(tmp_path / "fresh"), **rows), REPO
    )
    assert {r["name"]: r["accuracy"] for r in fresh["rows"]} == {r["name"]: r["accuracy"] for r in results["rows"]}
    for k in (0, 1):
        resumed = AutoModelForSequenceClassification.from_pretrained(stage / f"peer{k}").state_dict()
        uninterrupted = AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "fresh" / "rows" / "dml" / "1-benchmark_dml" / f"peer{k}"
        ).state_dict()
        for name, value in uninterrupted.items():
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=f"peer{k} {name}")
