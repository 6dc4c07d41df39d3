"""scripts/benchmark.py and hf_distill.benchmark: pure helpers (fast) and the whole pipeline on tiny models (slow)."""

import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, Trainer

from hf_distill.benchmark import (
    RESULT_KEYS,
    STAGE_FILE,
    check_baseline_recipe,
    fingerprint,
    format_table,
    load_benchmark_config,
    paired_bootstrap,
    run_stage,
    split_budget,
    total_train_steps,
)
from hf_distill.lm_benchmark import load_any_benchmark_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2"))
RECIPES = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3")
BENCHMARKS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.yaml")))


# ---------------------------------------------------------------------------------------------------- fast: helpers
@pytest.mark.parametrize(
    "total, stages, expected",
    [(125, 1, [125]), (125, 2, [63, 62]), (6, 3, [2, 2, 2]), (7, 3, [3, 2, 2]), (2, 2, [1, 1])],
)
def test_split_budget(total, stages, expected):
    assert split_budget(total, stages) == expected
    assert sum(split_budget(total, stages)) == total


def test_split_budget_too_small():
    with pytest.raises(ValueError, match="cannot be split over 3 stages"):
        split_budget(2, 3)


@pytest.mark.parametrize("rows, batch, epochs, expected", [(4000, 32, 1, 125), (100, 32, 1, 4), (100, 32, 2.5, 10)])
def test_total_train_steps(rows, batch, epochs, expected):
    assert total_train_steps(rows, batch, epochs) == expected


def test_format_table():
    rows = [
        {"name": "teacher", "recipes": ["fine-tune"], "accuracy": 0.8591, "accuracy_kept_pct": 100.0,
         "params": 22_713_216, "size_mb": 90.9, "latency_b1_ms": 9.87, "latency_b32_ms": 301.2, "speedup_b1": 1.0,
         "speedup_b32": 1.0, "train_steps": 125, "train_seconds": 120.4},
        {"name": "tinybert", "recipes": ["tinybert_stage1", "tinybert_stage2"], "accuracy": 0.8440,
         "accuracy_kept_pct": 98.24, "delta_vs_baseline_pts": -0.5, "params": 17_390_000, "size_mb": 69.6,
         "latency_b1_ms": 5.0, "latency_b32_ms": 150.6, "speedup_b1": 1.974, "speedup_b32": 2.0, "train_steps": 125,
         "train_seconds": 99.0},
    ]  # fmt: skip
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[1].startswith("|---|")
    assert (
        "| teacher | fine-tune | 85.91 | 100.0 | - | 22.7 | 90.9 | 9.9 | 301.2 | 1.00× | 1.00× | 125 | 120 |" in lines
    )
    assert "| tinybert | tinybert_stage1 → tinybert_stage2 | 84.40 | 98.2 | -0.50 |" in lines[3]


def _reference_bootstrap(a, b, resamples, seed):
    """The interval written out row by row, as in the textbook (slow)."""
    rng = np.random.default_rng(seed)
    n, diffs = a.shape[-1], []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        diffs.append(100 * (np.mean(np.atleast_2d(a)[:, idx]) - np.mean(np.atleast_2d(b)[:, idx])))
    return tuple(np.percentile(diffs, [2.5, 97.5]))


def test_paired_bootstrap_matches_a_row_by_row_reference():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 50)) < 0.8, rng.random((2, 50)) < 0.7  # 3 seeds against 2, 50 dev rows
    assert paired_bootstrap(a, b, resamples=500, seed=3) == pytest.approx(_reference_bootstrap(a, b, 500, 3))
    assert paired_bootstrap(a[0], b[0], resamples=500, seed=3) == pytest.approx(
        _reference_bootstrap(a[0], b[0], 500, 3)
    )


def test_paired_bootstrap_cases():
    same = np.array([True, False] * 50)
    assert paired_bootstrap(same, same) == (0.0, 0.0)  # the same predictions: no difference in any resample
    better = np.ones(100, dtype=bool)
    low, high = paired_bootstrap(better, same)
    assert 35 < low < 50 < high < 65  # +50 points, and a 95% interval around it
    # Pairing matters: two models wrong on the same 10 rows differ by 0 in every resample, whichever 10 those are.
    a = np.arange(100) >= 10
    assert paired_bootstrap(a, a.copy()) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different rows: 100 vs 99"):
        paired_bootstrap(better, better[:99])


def test_run_stage_runs_once_then_reuses(tmp_path):
    calls = []

    def work(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_text("w")
        return {"status": "trained", "global_step": 3}

    spec = {"stage": "x", "lr": 1e-4}
    first = run_stage(tmp_path / "x", spec, work)
    assert (first.status, len(calls)) == ("trained", 1)
    assert (tmp_path / "x" / "weights.bin").is_file() and not (tmp_path / "x.tmp").exists()
    mtime = os.stat(tmp_path / "x" / STAGE_FILE).st_mtime_ns
    again = run_stage(tmp_path / "x", spec, work)
    assert (again.status, len(calls), again.info["global_step"]) == ("reused", 1, 3)
    assert os.stat(tmp_path / "x" / STAGE_FILE).st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"other settings \(differing: \['lr'\]\)"):
        run_stage(tmp_path / "x", {**spec, "lr": 2e-4}, work)


def test_run_stage_interrupted_leaves_no_folder(tmp_path):
    def crash(tmp):
        (tmp / "half-written").write_text("?")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "x", {"stage": "x"}, crash, cleanup=[tmp_path / "x.checkpoints"])
    assert not (tmp_path / "x").exists()  # never mistaken for a finished stage
    result = run_stage(tmp_path / "x", {"stage": "x"}, lambda tmp: None)
    assert result.status == "done" and not (tmp_path / "x" / "half-written").exists()


def test_a_measurement_stage_of_other_settings_is_measured_again_and_replaced_only_when_done(tmp_path):
    """The latency stage (remeasure): adding a row changes its spec; it times every model again instead of refusing,
    and an interrupted new measurement leaves the old one in place."""

    def measure(value):
        def work(tmp):
            (tmp / "latency.json").write_text(value)

        return work

    run_stage(tmp_path / "lat", {"models": ["a"]}, measure("old"), remeasure=True)
    assert run_stage(tmp_path / "lat", {"models": ["a"]}, measure("?"), remeasure=True).status == "reused"

    def crash(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "lat", {"models": ["a", "b"]}, crash, remeasure=True)
    assert (tmp_path / "lat" / "latency.json").read_text() == "old"
    result = run_stage(tmp_path / "lat", {"models": ["a", "b"]}, measure("new"), remeasure=True)
    assert result.status == "done" and (tmp_path / "lat" / "latency.json").read_text() == "new"
    assert result.info["spec"] == {"models": ["a", "b"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat"]  # no .tmp / .stale left
    with pytest.raises(ValueError, match="other settings"):  # a training stage still refuses
        run_stage(tmp_path / "lat", {"models": ["a"]}, measure("x"))


def test_fingerprint_is_order_independent():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


@pytest.mark.parametrize("path", BENCHMARKS, ids=[os.path.basename(p) for p in BENCHMARKS])
def test_shipped_benchmarks_load(path):
    config = load_any_benchmark_config(path)  # `kind: lm` files are LM benchmarks
    check_baseline_recipe(os.path.join(REPO, config.baseline_recipe))
    for recipes in config.rows.values():
        for recipe in [recipes] if isinstance(recipes, str) else recipes:
            assert os.path.isfile(os.path.join(REPO, recipe)), recipe


@pytest.mark.parametrize("path", [p for p in BENCHMARKS if "kind: lm" not in open(p, encoding="utf-8").read()])
def test_every_shipped_row_builds_its_training_arguments(path, tmp_path):
    """Every stage of every row of a shipped benchmark gets a valid DistillationConfig as the benchmark builds it
    (recipe objective + the benchmark's cache arguments): a row the benchmark would refuse only after an hour of
    other rows (a teacher cache with a term it cannot serve, ...) fails here instead."""
    from hf_distill.benchmark import Benchmark, recipe_training_args
    from hf_distill.benchmark_rows import mutual_training_args
    from hf_distill.config import DistillationConfig
    from hf_distill.mutual_config import MutualLearningConfig

    config = load_benchmark_config(path)
    bench = Benchmark(config, REPO)
    for name, recipes in {config.baseline_name: [config.baseline_recipe], **config.rows}.items():
        for recipe in recipes:
            training = recipe_training_args(bench._path(recipe))
            cache = bench.cache_args(training) if name != config.baseline_name else {}
            args = bench._training_args(DistillationConfig, str(tmp_path), max_steps=1, **{**training, **cache})
            assert args.max_steps == 1, (name, recipe)
    for name, recipe in config.mutual_rows.items():  # MutualLearningTrainer rows (hf_distill.benchmark_rows)
        training = mutual_training_args(bench._path(recipe))
        args = bench._training_args(MutualLearningConfig, str(tmp_path), max_steps=1, **training)
        assert args.max_steps == 1, (name, recipe)
    bench.check_row_recipes()  # teacher_weights against extra_teacher_seeds, the cache, the mutual recipes


@pytest.mark.parametrize(
    "override, message",
    [
        ({"temprature": 2}, "unknown key"),
        ({"latency_runs": 5}, "latency_runs must be >= 20"),
        ({"rows": {}}, "rows must map row names"),
        ({"rows": {"teacher": ["x.yaml"]}}, "is taken"),
        ({"baseline_recipe": None}, "baseline_recipe is required"),
        ({"validation_file": None}, "train_file and validation_file go together"),
        ({"labelled_only_rows": ["vanila_kd"]}, r"labelled_only_rows names \['vanila_kd'\], which are not student"),
        ({"labelled_only_rows": "vanilla_kd"}, "labelled_only_rows must be a list of row names"),
        ({"seed_rows": ["teacher"]}, r"seed_rows names \['teacher'\]"),
        ({"student_seeds": [42, 42]}, "student_seeds must be a list of distinct integers"),
        ({"student_seeds": 42}, "student_seeds must be a list of distinct integers"),
    ],
)
def test_bad_benchmark_config(override, message):
    with pytest.raises(ValueError, match=message):
        load_benchmark_config(os.path.join(REPO, "benchmarks", "sst2_minilm_l3.yaml"), override)


def test_baseline_recipe_must_be_task_only(tmp_path):
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump({"teacher_model_name_or_path": "t", "task_weight": 0.5, "logits_weight": 0.5}))
    with pytest.raises(ValueError, match="every other weight 0"):
        check_baseline_recipe(path)


# ---------------------------------------------------------------------------------------------------- slow: end to end
def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(REPO, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage_mtimes(out):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "**", STAGE_FILE), recursive=True)}


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(SST2, "train.tsv")), reason=f"real SST-2 files not found at {SST2} (../shared)"
)
def test_benchmark_end_to_end_resume_and_reuse(tmp_path, tiny_tokenizer, monkeypatch):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "out"
    config = {
        "name": "tiny",
        "output_dir": str(out),
        "teacher_model_name_or_path": str(tmp_path / "teacher"),
        "teacher_learning_rate": 1e-3,
        "train_file": os.path.join(SST2, "train.tsv"),
        "validation_file": os.path.join(SST2, "dev.tsv"),
        "max_length": 32,
        "max_train_samples": 192,  # 6 steps at batch 32; TinyBERT: 3 + 3
        "max_eval_samples": 96,
        "student_num_layers": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "baseline_recipe": os.path.join(RECIPES, "no_kd.yaml"),
        "rows": {
            "vanilla_kd": [os.path.join(RECIPES, "vanilla_kd.yaml")],
            "distilbert": [os.path.join(RECIPES, "distilbert.yaml")],
            "tinybert": [os.path.join(RECIPES, "tinybert_stage1.yaml"), os.path.join(RECIPES, "tinybert_stage2.yaml")],
        },
    }
    config_path = tmp_path / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = _load_script()

    # Run 1 is interrupted during the teacher's fine-tuning, after its checkpoint at step 2.
    original_step, calls = Trainer.training_step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--config", str(config_path)])
    monkeypatch.setattr(Trainer, "training_step", original_step)
    assert not (out / "teacher").exists()
    assert (out / "teacher.checkpoints" / "checkpoint-2").is_dir()

    # Run 2 resumes the teacher from that checkpoint and runs every other stage.
    results = script.main(["--config", str(config_path)])
    status = {os.path.relpath(s["path"], out): s["status"] for s in results["stages"]}
    assert status["teacher"] == "resumed"
    assert status["rows/tinybert/2-tinybert_stage2"] == "trained"
    assert not (out / "teacher.checkpoints").exists()  # deleted once the stage finished

    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["teacher", "no_kd", "vanilla_kd", "distilbert", "tinybert"]
    for row in saved["rows"]:
        assert set(RESULT_KEYS) <= set(row), set(RESULT_KEYS) - set(row)
        assert 0 <= row["accuracy"] <= 1 and row["params"] > 0 and row["size_mb"] > 0
        assert row["latency_b1_ms"] > 0 and row["latency_b32_ms"] > 0 and row["speedup_b32"] > 0
    assert {r["train_steps"] for r in saved["rows"][1:]} == {6}  # same budget for every student row
    # The record names the teacher layers the student was copied from: those of the saved student_init.
    init_config = json.loads((out / "student_init" / "config.json").read_text())
    assert saved["budget"]["student_teacher_layers"] == init_config["distillation_teacher_layers"]
    assert len(saved["budget"]["student_teacher_layers"]) == 2
    assert saved["rows"][0]["accuracy_kept_pct"] == pytest.approx(100.0)
    assert [s["steps"] for s in saved["rows"][-1]["stages"]] == [3, 3]
    for path in saved["plots"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| tinybert | tinybert_stage1 → tinybert_stage2 |" in (out / "results.md").read_text()
    history = json.loads((out / "rows" / "distilbert" / "1-distilbert" / "log_history.json").read_text())
    assert {"loss_task", "loss_logits", "loss_hidden"} <= set().union(*history)

    # Run 3 reuses every finished stage and rewrites none of them.
    mtimes = _stage_mtimes(out)
    again = script.main(["--config", str(config_path)])
    assert {s["status"] for s in again["stages"]} == {"reused"}
    assert _stage_mtimes(out) == mtimes
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in saved["rows"]]


# ---------------------------------------------------------------------------------------------------- BENCHMARKS.md
UNRECORDED = "<!-- unrecorded:"  # a table run before results were recorded as data; says when and why


def test_benchmarks_md_tables_are_generated_from_the_committed_records():
    """Every results table in BENCHMARKS.md is `format_table` of a committed record (python scripts/benchmark.py
    --update-docs rewrites them), except the few marked as run before records existed."""
    from hf_distill.benchmark import stale_results_blocks
    from hf_distill.benchmark_report import BLOCK_RE

    text = open(os.path.join(REPO, "BENCHMARKS.md"), encoding="utf-8").read()
    assert stale_results_blocks(text, REPO) == [], "run: python scripts/benchmark.py --update-docs"
    blocks = [m.span() for m in BLOCK_RE.finditer(text)]
    assert blocks, "BENCHMARKS.md has no <!-- results: ... --> block"
    for match in BLOCK_RE.finditer(text):
        record = json.load(open(os.path.join(REPO, match["path"]), encoding="utf-8"))
        # A benchmark's record, or a benchmark script's that carries its own table (benchmarks/lm_loss_memory.py)
        script = "markdown" in record and record["command"].startswith("python benchmarks/")
        assert record["commit"] and (record["command"].startswith("python scripts/benchmark.py") or script)
    offset, outside = 0, []
    for line in text.splitlines(keepends=True):
        if line.startswith("| model | recipe stages |") and not any(a <= offset < b for a, b in blocks):
            outside.append(offset)
        offset += len(line)
    for position in outside:
        before = text[:position].rstrip().splitlines()[-1]
        assert before.startswith(UNRECORDED), f"a results table outside a results block: {text[position:][:80]!r}"
    assert len(outside) <= 1  # the MPNet run of 2026-11-24, until the flagship run replaces it


def test_the_plotted_loss_terms_are_the_trainers():
    """Every term the trainer logs has a loss curve (benchmark_report keeps its own tuple to stay import-light)."""
    from hf_distill.benchmark_report import LOSS_TERMS
    from hf_distill.trainer import TERMS

    assert LOSS_TERMS == TERMS
