"""Tests for hf_distill.export / hf_distill.quantize and scripts/export.py: ONNX round trip per family, int8 variants,
refusals that leave nothing written. Tiny models built in-process, saved with the tiny tokenizer."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import WORDS
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from hf_distill.export import ONNX_FILE, export_student, load_student, run_onnx  # noqa: E402
from hf_distill.quantize import ONNX_INT8, TORCH_INT8, load_torch_int8  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, HEADS, LAYERS = 64, 64, 4, 2
SMALL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
DECODER = dict(SMALL, intermediate_size=2 * HIDDEN, max_position_embeddings=64, num_key_value_heads=2, use_cache=False)
# fp32 ONNX Runtime vs PyTorch: the same float32 graph, only the kernels' summation order differs.
FP32_ATOL = 1e-4
# int8 vs fp32 PyTorch, on logits of magnitude ~1 from random tiny models: quantisation noise, not a wrong graph.
INT8_ATOL = 0.25
GPT2_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # inside the tiny vocabulary
CHECK_TEXTS = ["the movie was good", "a very boring plot and awful actors in it", "loved it"]


class Family(NamedTuple):
    name: str
    build: Callable[[], PreTrainedModel]
    quantize: tuple[str, ...] = ("onnx-int8", "torch-int8")


FAMILIES = [
    Family("bert", lambda: BertForSequenceClassification(BertConfig(**SMALL, intermediate_size=2 * HIDDEN))),
    Family(
        "roberta",
        lambda: RobertaForSequenceClassification(
            RobertaConfig(**SMALL, intermediate_size=2 * HIDDEN, max_position_embeddings=66, pad_token_id=1)
        ),
    ),
    Family(
        "distilbert",
        lambda: DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=2 * HIDDEN)
        ),
    ),
    Family(
        "mpnet",
        lambda: MPNetForSequenceClassification(MPNetConfig(**SMALL, intermediate_size=2 * HIDDEN, pad_token_id=1)),
    ),
    Family("llama-causal", lambda: LlamaForCausalLM(LlamaConfig(**DECODER, pad_token_id=0))),
    Family("llama-cls", lambda: LlamaForSequenceClassification(LlamaConfig(**DECODER, pad_token_id=0))),
    Family("qwen2-causal", lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER, pad_token_id=0))),
    # GPT-2's blocks are Conv1D, which torch's dynamic int8 leaves fp32: refused (see test_refusals), ONNX int8 only.
    Family(
        "gpt2-causal",
        lambda: GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, **GPT2_TOKENS)
        ),
        ("onnx-int8",),
    ),
]


def save(model: PreTrainedModel, folder: Path, tokenizer=None) -> Path:
    model.eval().save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def entries(folder: Path) -> list[str]:
    """Everything in `folder`, staging folders included (a half-written export would show up here)."""
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_export_round_trip(family, tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    student = save(family.build(), tmp_path / "student", tiny_tokenizer)
    out = tmp_path / "onnx"
    result = export_student(student, out, check_texts=CHECK_TEXTS, quantize=family.quantize)
    int8 = {k: f"{v['max_abs_diff_vs_fp32']:.2e}" for k, v in result.quantized.items()}
    print(f"{family.name}: fp32 max abs diff {result.max_abs_diff:.2e}, int8 {int8}")  # shown with -s

    # The folder: ONNX model, tokenizer, config, info; nothing else left beside it.
    assert entries(tmp_path) == ["onnx", "student"]
    assert {ONNX_FILE, "config.json", "tokenizer_config.json", "export_info.json"} <= set(entries(out))
    assert json.loads((out / "export_info.json").read_text())["max_abs_diff"] == result.max_abs_diff
    assert result.max_abs_diff <= FP32_ATOL
    assert result.num_check_rows == len(CHECK_TEXTS)

    # Dynamic axes: another batch size and sequence length than the (2, 8) export sample and the check rows.
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(WORDS) + 5, (5, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    batch = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if "token_type_ids" in result.input_names:
        batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    model = load_student(student)[0]
    with torch.no_grad():
        reference = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    real = mask.numpy().astype(bool) if reference.ndim == 3 else slice(None)  # causal LM: non-padding positions
    fp32 = run_onnx(out / ONNX_FILE, batch)
    assert fp32.shape == reference.shape
    assert np.abs(fp32 - reference)[real].max() <= FP32_ATOL

    # int8 variants: load, run, stay close to fp32, and are smaller on disk.
    fp32_bytes = (student / "model.safetensors").stat().st_size
    for variant in family.quantize:
        assert result.quantized[variant]["max_abs_diff_vs_fp32"] <= INT8_ATOL
        if variant == "onnx-int8":
            logits = run_onnx(out / ONNX_INT8, batch)
            assert (out / ONNX_INT8).stat().st_size < (out / ONNX_FILE).stat().st_size
        else:
            with torch.no_grad():
                logits = load_torch_int8(out)(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
            assert (out / TORCH_INT8).stat().st_size < fp32_bytes
        assert np.abs(logits - reference)[real].max() <= INT8_ATOL, variant


def electra(tmp_path, tokenizer):
    config = ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32)  # fmt: skip
    return save(ElectraForSequenceClassification(config), tmp_path / "student", tokenizer)


def bert(tmp_path, tokenizer, model_class=BertForSequenceClassification):
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)  # fmt: skip
    return save(model_class(config), tmp_path / "student", tokenizer)


def gpt2(tmp_path, tokenizer):
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64, **GPT2_TOKENS)
    return save(GPT2LMHeadModel(config), tmp_path / "student", tokenizer)


# (case, make the student folder, export_student keyword arguments, error message pattern)
REFUSALS = [
    ("unsupported architecture", electra, {}, r"model_type 'electra' .* not supported for export"),
    ("unsupported head", lambda p, t: bert(p, t, BertForMaskedLM), {}, r"config.architectures=\['BertForMaskedLM'\]"),
    ("missing tokenizer", lambda p, t: bert(p, None), {}, r"has no tokenizer"),
    ("opset too old", bert, {"opset": 11}, r"opset must be an integer in \[18, 23\].*got 11"),
    ("opset too new", bert, {"opset": 99}, r"opset must be an integer in \[18, 23\].*got 99"),
    ("bad quantize", bert, {"quantize": "int4"}, r"quantize must be one of .* got 'int4'"),
    ("torch-int8 of GPT-2 Conv1D", gpt2, {"quantize": "torch-int8"}, r"model_type 'gpt2' keeps its block weights"),
    ("empty check rows", bert, {"check_texts": [1, 2]}, r"check_texts must be a non-empty list of strings"),
]


@pytest.mark.parametrize("case, make, kwargs, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(case, make, kwargs, message, tmp_path, tiny_tokenizer):
    student = make(tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match=message):
        export_student(student, tmp_path / "onnx", **kwargs)
    assert entries(tmp_path) == ["student"], case


def test_existing_output_dir_is_refused_and_kept(tmp_path, tiny_tokenizer):
    student = bert(tmp_path, tiny_tokenizer)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"output_dir .* exists and is not empty"):
        export_student(student, out)
    assert entries(tmp_path) == ["onnx", "student"] and entries(out) == ["keep.txt"]


def test_failure_mid_export_leaves_nothing(tmp_path, tiny_tokenizer, monkeypatch):
    import hf_distill.export as export_module

    def broken_export(model, input_names, path, opset):
        Path(path).write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export_module, "export_onnx", broken_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_student(bert(tmp_path, tiny_tokenizer), tmp_path / "onnx")
    assert entries(tmp_path) == ["student"]


def test_script(tmp_path, tiny_tokenizer, capsys):
    spec = importlib.util.spec_from_file_location("export_script", REPO_ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    student = bert(tmp_path, tiny_tokenizer)
    check = tmp_path / "dev.tsv"
    check.write_text("sentence\tlabel\nthe film was fun\t1\nboring and dull\t0\n")
    script.main(["--model_dir", str(student), "--output_dir", str(tmp_path / "onnx"), "--quantize", "onnx-int8",
                 "--check_file", str(check)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "max |ONNX Runtime - PyTorch| over 2 check rows" in printed and "model_int8.onnx" in printed
    with pytest.raises(SystemExit):  # the output folder now exists: a one-line error, nothing changed
        script.main(["--model_dir", str(student), "--output_dir", str(tmp_path / "onnx")])
    assert "exists and is not empty" in capsys.readouterr().err
