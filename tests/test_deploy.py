"""Tests for hf_distill.deploy (exported students as predictors), static int8 (hf_distill.quantize) and the timer's
CPU time (hf_distill.evaluation): every variant predicts what its export computes, through the evaluation helpers the
benchmark uses. Tiny models built in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import WORDS
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from hf_distill.deploy import (  # noqa: E402
    DEPLOY_VARIANTS,
    VARIANT_FILES,
    OnnxClassifier,
    load_variant,
    variant_size_mb,
)
from hf_distill.evaluation import measure_latencies, predict_logits  # noqa: E402
from hf_distill.export import ONNX_FILE, export_student, load_student, run_onnx  # noqa: E402
from hf_distill.quantize import ONNX_INT8_STATIC  # noqa: E402

VOCAB, HIDDEN = 64, 64
SMALL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4)
FP32_ATOL = 1e-4
INT8_ATOL = 0.25  # int8 vs fp32 on logits of magnitude ~1 from random tiny models (as in test_export.py)
CALIBRATION = [" ".join(WORDS[i : i + 6]) for i in range(0, 40, 2)]  # 20 "training" rows
CHECK = ["the movie was good", "a very boring plot and awful actors in it", "loved it"]
BUILDERS = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**SMALL, intermediate_size=128)),
    "mpnet": lambda: MPNetForSequenceClassification(MPNetConfig(**SMALL, intermediate_size=128, pad_token_id=1)),
    "llama-cls": lambda: LlamaForSequenceClassification(
        LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, pad_token_id=0, use_cache=False)
    ),
}


def saved(name: str, folder, tokenizer):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def dev_set(tokenizer, n: int = 10) -> Dataset:
    texts = [" ".join(WORDS[(3 * i) % 40 : (3 * i) % 40 + 2 + i % 5]) for i in range(n)]
    rows = tokenizer(texts, truncation=True)
    return Dataset.from_dict({**rows, "labels": [i % 2 for i in range(n)]})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """A tiny BERT student exported with every variant."""
    root = tmp_path_factory.mktemp("deploy")
    student = saved("bert", root / "student", tiny_tokenizer)
    quantize = [v for v in DEPLOY_VARIANTS if v != "onnx"]
    result = export_student(student, root / "export", check_texts=CHECK, quantize=quantize,
                            calibration_texts=CALIBRATION)  # fmt: skip
    return student, root / "export", result


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_static_int8_round_trip(family, tmp_path, tiny_tokenizer):
    student = saved(family, tmp_path / "student", tiny_tokenizer)
    out = tmp_path / "export"
    result = export_student(
        student, out, check_texts=CHECK, quantize="onnx-int8-static", calibration_texts=CALIBRATION
    )
    print(f"{family}: static int8 max abs diff {result.quantized['onnx-int8-static']['max_abs_diff_vs_fp32']:.3g}")
    assert result.quantized["onnx-int8-static"]["max_abs_diff_vs_fp32"] <= INT8_ATOL
    assert (out / ONNX_INT8_STATIC).stat().st_size < (out / ONNX_FILE).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "student"]  # no .prepared.onnx, no staging
    assert not any(p.name.endswith(".prepared.onnx") for p in out.iterdir())
    # Static int8 fixes activation ranges from the calibration rows: other calibration rows, other scales.
    other = export_student(student, tmp_path / "other", check_texts=CHECK, quantize="onnx-int8-static",
                           calibration_texts=["the"] * 4)  # fmt: skip
    assert (out / ONNX_INT8_STATIC).read_bytes() != (tmp_path / "other" / ONNX_INT8_STATIC).read_bytes()
    assert other.max_abs_diff <= FP32_ATOL


def test_static_int8_needs_calibration_rows(tmp_path, tiny_tokenizer):
    student = saved("bert", tmp_path / "student", tiny_tokenizer)
    with pytest.raises(ValueError, match="quantize='onnx-int8-static' needs calibration_texts"):
        export_student(student, tmp_path / "export", quantize=["onnx-int8", "onnx-int8-static"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_every_variant_predicts_what_its_export_computes(exported, tiny_tokenizer):
    student, export_dir, result = exported
    collator = DataCollatorWithPadding(tiny_tokenizer)
    dev = dev_set(tiny_tokenizer)
    reference, labels = predict_logits(load_student(student)[0], dev, collator, batch_size=4)
    batch = {k: v.numpy() for k, v in collator(dev[:10]).items() if k != "labels"}
    for variant in DEPLOY_VARIANTS:
        model = load_variant(export_dir, variant)
        logits, variant_labels = predict_logits(model, dev, collator, batch_size=4)
        assert np.array_equal(variant_labels, labels)
        atol = FP32_ATOL if variant == "onnx" else INT8_ATOL
        assert np.abs(logits - reference).max() <= atol, variant
        if variant != "torch-int8":  # the predictor runs the file itself: same logits as a plain session
            # on the same batch: dynamic int8 scales activations per tensor, so a row's logits depend on its batch
            one_batch, _ = predict_logits(model, dev, collator, batch_size=len(dev))
            feed = {k: batch[k] for k in model.graph_input_names}
            assert np.allclose(one_batch, run_onnx(export_dir / VARIANT_FILES[variant], feed), atol=1e-6), variant
        assert variant_size_mb(export_dir, variant) == (export_dir / VARIANT_FILES[variant]).stat().st_size / 1e6
    info = json.loads((export_dir / "export_info.json").read_text())
    assert set(info["quantized"]) == set(DEPLOY_VARIANTS) - {"onnx"}


def test_onnx_predictor_threads_and_inputs(exported):
    _, export_dir, _ = exported
    model = OnnxClassifier(export_dir / ONNX_FILE, num_threads=1)
    assert model.num_threads == 1 and list(model.parameters()) == []
    assert model.graph_input_names == ["input_ids", "attention_mask", "token_type_ids"]
    with pytest.raises(ValueError, match=r"the batch lacks \['attention_mask', 'token_type_ids'\]"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_variant_refusals(exported, tmp_path):
    _, export_dir, _ = exported
    with pytest.raises(ValueError, match=r"variant must be one of .* got 'int4'"):
        load_variant(export_dir, "int4")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no model_int8.onnx for variant 'onnx-int8'"):
        load_variant(tmp_path, "onnx-int8")


def test_round_robin_timer_takes_onnx_and_reports_cpu_time(exported, tiny_tokenizer):
    student, export_dir, _ = exported
    collator = DataCollatorWithPadding(tiny_tokenizer)
    models = {"pytorch": load_student(student)[0], **{v: load_variant(export_dir, v) for v in DEPLOY_VARIANTS}}
    medians, timings = measure_latencies(models, dev_set(tiny_tokenizer), collator, batch_sizes=(1, 4), runs=3,
                                         warmup=1, cpu_time=True)  # fmt: skip
    for name in models:
        assert set(medians[name]) == {"latency_b1_ms", "latency_b4_ms", "cpu_b1_ms", "cpu_b4_ms"}
        assert all(v > 0 for k, v in medians[name].items() if k.startswith("latency"))
        assert all(v >= 0 for k, v in medians[name].items() if k.startswith("cpu"))
        assert len(timings[name]["b4"]) == len(timings[name]["cpu_b4"]) == 3
    plain, _ = measure_latencies({"pytorch": models["pytorch"]}, dev_set(tiny_tokenizer), collator, runs=1, warmup=0)
    assert set(plain["pytorch"]) == {"latency_b1_ms", "latency_b32_ms"}  # no CPU keys unless asked


def test_export_script_static_int8_takes_a_calibration_file(tmp_path, tiny_tokenizer, capsys):
    import importlib.util
    from pathlib import Path

    script_path = Path(__file__).resolve().parents[1] / "scripts" / "export.py"
    spec = importlib.util.spec_from_file_location("export_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    student = saved("bert", tmp_path / "student", tiny_tokenizer)
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{text}\t1\n" for text in CALIBRATION))
    with pytest.raises(SystemExit):  # static int8 without calibration rows: a one-line error, nothing written
        script.main(
            ["--model_dir", str(student), "--output_dir", str(tmp_path / "a"), "--quantize", "onnx-int8-static"]
        )
    assert "needs calibration_texts" in capsys.readouterr().err and not (tmp_path / "a").exists()
    script.main(["--model_dir", str(student), "--output_dir", str(tmp_path / "b"), "--quantize", "onnx-int8-static",
                 "--calibration_file", str(train), "--num_calibration_rows", "8"])  # fmt: skip
    assert "onnx-int8-static: model_int8_static.onnx" in capsys.readouterr().out
    assert (tmp_path / "b" / ONNX_INT8_STATIC).is_file()
