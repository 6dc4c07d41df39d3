"""The benchmark's deployment rows (hf_distill.benchmark_deploy): a tiny benchmark with `deploy_rows` exports its
student, and every variant's figures are the ones an independent evaluation of the exported files gives."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, DataCollatorWithPadding

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from hf_distill.benchmark import STAGE_FILE, load_benchmark_config, run_benchmark  # noqa: E402
from hf_distill.benchmark_deploy import format_deploy_table  # noqa: E402
from hf_distill.benchmark_report import record_table  # noqa: E402
from hf_distill.deploy import DEPLOY_VARIANTS, load_variant  # noqa: E402
from hf_distill.evaluation import predict_logits  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2"))
RECIPES = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3")
BENCHMARK = os.path.join(REPO, "benchmarks", "sst2_minilm_l3.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"deploy_rows": ["vanila_kd"]}, r"deploy_rows must list student rows of this benchmark"),
        ({"deploy_rows": "vanilla_kd"}, r"deploy_rows must list student rows"),
        ({"deploy_rows": ["vanilla_kd"], "deploy_variants": ["int4"]}, r"deploy_variants must be a list of distinct"),
        ({"deploy_variants": ["onnx", "onnx"]}, r"deploy_variants must be a list of distinct"),
        ({"deploy_variants": []}, r"deploy_variants must be a list of distinct"),
        ({"deploy_opset": 11}, r"deploy_opset: opset must be an integer in \[18, 23\]"),
    ],
)
def test_bad_deploy_config(override, message):
    with pytest.raises(ValueError, match=message):
        load_benchmark_config(BENCHMARK, override)


def test_deploy_rows_may_name_chain_and_mutual_rows():
    """Their final model is a plain student too (a chain's last stage; a mutual-learning row's peer 0)."""
    methods = os.path.join(REPO, "benchmarks", "sst2_minilm_l3_methods.yaml")
    config = load_benchmark_config(methods, {"deploy_rows": ["dml", "ta_chain", "vanilla_kd"]})
    assert config.deploy_rows == ["dml", "ta_chain", "vanilla_kd"]
    with pytest.raises(ValueError, match=r"deploy_rows must list student rows of this benchmark \(.*'dml'"):
        load_benchmark_config(methods, {"deploy_rows": ["dml_peer1"]})


def test_deploy_needs_the_export_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'", name="onnxscript")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(ValueError, match=r"needs the export extra \(onnxscript is missing\): pip install"):
        load_benchmark_config(BENCHMARK, {"deploy_rows": ["vanilla_kd"]})
    load_benchmark_config(BENCHMARK)  # without deploy_rows nothing is imported


def test_format_deploy_table():
    rows = [
        {"name": "teacher", "runtime": "PyTorch fp32", "accuracy": 0.9186, "size_mb": 438.0, "latency_b1_ms": 40.0,
         "latency_b32_ms": 900.0, "speedup_b1": 1.0, "speedup_b32": 1.0, "cpu_s_per_1000": 56.25},
        {"name": "kd-onnx-int8", "runtime": "ONNX Runtime int8 (dynamic)", "accuracy": 0.9021,
         "delta_vs_fp32_pts": -0.23, "agreement_with_fp32": 0.989, "size_mb": 66.1, "size_pct_of_fp32": 24.9,
         "latency_b1_ms": 8.0, "latency_b32_ms": 160.0, "speedup_b1": 5.0, "speedup_b32": 5.625,
         "cpu_s_per_1000": 10.0, "max_abs_diff_vs_fp32": 0.0812},
    ]  # fmt: skip
    lines = format_deploy_table(rows).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert (
        lines[2] == "| teacher | PyTorch fp32 | 91.86 | - | - | 438.0 | - | 40.0 | 900.0 | 1.00× | 1.00× | 56.25 | - |"
    )
    assert lines[3] == (
        "| kd-onnx-int8 | ONNX Runtime int8 (dynamic) | 90.21 | -0.23 | 98.9 | 66.1 | 25% | 8.0 | 160.0 | 5.00× "
        "| 5.62× | 10.00 | 0.081 |"
    )


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(SST2, "train.tsv")), reason="real SST-2 files not found")
def test_benchmark_deploy_rows_end_to_end(tmp_path, tiny_tokenizer, monkeypatch):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=32))
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "out"
    config = load_benchmark_config(
        BENCHMARK,
        {
            "name": "tiny_deploy",
            "output_dir": str(out),
            "teacher_model_name_or_path": str(tmp_path / "teacher"),
            "teacher_hub_fallback": None,
            "teacher_learning_rate": 1e-3,
            "train_file": os.path.join(SST2, "train.tsv"),
            "validation_file": os.path.join(SST2, "dev.tsv"),
            "max_length": 24,
            "max_train_samples": 64,
            "unlabelled_from_train": False,
            "max_unlabelled_samples": None,
            "teacher_cache": False,
            "max_eval_samples": 40,
            "student_num_layers": 1,
            "per_device_train_batch_size": 32,
            "logging_steps": 1,
            "save_steps": 2,
            "baseline_recipe": os.path.join(RECIPES, "no_kd.yaml"),
            "rows": {"vanilla_kd": [os.path.join(RECIPES, "vanilla_kd.yaml")]},
            "deploy_rows": ["vanilla_kd"],
            "deploy_variants": list(DEPLOY_VARIANTS),
            "results_file": str(tmp_path / "record.json"),
        },
    )
    results = run_benchmark(config, REPO, command="python scripts/benchmark.py --config tiny.yaml")
    deploy = {r["name"]: r for r in results["deploy"]}
    assert list(deploy) == ["teacher", "vanilla_kd", *(f"vanilla_kd-{v}" for v in DEPLOY_VARIANTS)]
    student = {r["name"]: r for r in results["rows"]}["vanilla_kd"]
    assert deploy["vanilla_kd"]["accuracy"] == student["accuracy"]
    assert deploy["teacher"]["speedup_b1"] == 1.0 and deploy["teacher"]["speedup_b32"] == 1.0

    # Each variant's accuracy and agreement are those of its exported file, evaluated here independently.
    eval_set = _eval_set(results, out)
    collator = DataCollatorWithPadding(tiny_tokenizer)
    fp32_dir = out / "rows" / "vanilla_kd" / "1-vanilla_kd"
    fp32 = predict_logits(BertForSequenceClassification.from_pretrained(fp32_dir).eval(), eval_set, collator)
    for variant in DEPLOY_VARIANTS:
        row = deploy[f"vanilla_kd-{variant}"]
        export_dir = out / "deploy" / f"vanilla_kd-{variant}" / "model"
        logits, labels = predict_logits(load_variant(export_dir, variant), eval_set, collator, batch_size=64)
        assert row["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == labels)))
        assert row["agreement_with_fp32"] == pytest.approx(float(np.mean(logits.argmax(-1) == fp32[0].argmax(-1))))
        assert row["delta_vs_fp32_pts"] == pytest.approx(100 * (row["accuracy"] - student["accuracy"]))
        assert row["size_mb"] > 0 and row["size_pct_of_fp32"] == pytest.approx(
            100 * row["size_mb"] / student["size_mb"]
        )
        assert row["latency_b1_ms"] > 0 and row["cpu_s_per_1000"] > 0
        assert row["speedup_b1"] == pytest.approx(deploy["teacher"]["latency_b1_ms"] / row["latency_b1_ms"])
    assert deploy["vanilla_kd-onnx"]["max_abs_diff_vs_fp32"] <= 1e-4
    assert deploy["vanilla_kd-onnx"]["agreement_with_fp32"] == 1.0

    # The record and the tables carry the deployment rows.
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["deploy"] == json.loads(json.dumps(results["deploy"]))
    assert format_deploy_table(record["deploy"]) in record_table(tmp_path / "record.json")
    assert "| vanilla_kd-onnx-int8 | ONNX Runtime int8 (dynamic) |" in (out / "results.md").read_text()

    # A rerun reuses every stage, the deployment ones included, and gives the same table.
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "**" / STAGE_FILE), recursive=True)}
    again = run_benchmark(config, REPO, command="python scripts/benchmark.py --config tiny.yaml")
    assert {s["status"] for s in again["stages"]} == {"reused"}
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert again["deploy"] == results["deploy"]

    # Other quantiser settings are refused on the finished export, not served by it (a stale int8 model).
    import hf_distill.quantize as quantize_module

    monkeypatch.setitem(quantize_module.DYNAMIC_SETTINGS, "per_channel", False)
    with pytest.raises(
        ValueError, match=r"vanilla_kd-onnx-int8 was made with other settings \(differing: \['quantizer'\]\)"
    ):
        run_benchmark(config, REPO, command="python scripts/benchmark.py --config tiny.yaml")


def _eval_set(results, out):
    """The benchmark's tokenized dev rows, rebuilt the way the benchmark builds them."""
    from hf_distill.benchmark import Benchmark, BenchmarkConfig

    config = BenchmarkConfig(**{k: v for k, v in results["config"].items()})
    return Benchmark(config, REPO).dataset["eval"]
