"""Export a saved student to ONNX, with its tokenizer and config beside it, and check ONNX Runtime against PyTorch.

    result = export_student("students/mpnet-6l", "deploy/mpnet-6l", check_texts=dev_sentences, quantize="onnx-int8")
    print(result.max_abs_diff, result.sizes)

The output folder holds `model.onnx` (inputs `input_ids`, `attention_mask` and, when the tokenizer and the model
both use it, `token_type_ids`, each of shape (batch, sequence) with both axes dynamic; output `logits`), the tokenizer
files, `config.json` and `export_info.json` (task, opset, inputs, the measured differences, file sizes). It is written
into a temporary sibling folder and renamed into place at the end, so a failed export leaves nothing half-written.

Exporter: `torch.onnx.export(..., dynamo=True)`, the `torch.export`-based exporter (it writes through onnxscript),
PyTorch's default and the one it maintains since 2.9; the TorchScript exporter (`dynamo=False`) is deprecated there
and warns so. `optimum-onnx` 0.1.0, the only release in the package registry, pins `transformers<4.58`: installing
it downgrades this project's transformers 5 to 4.57.6, so it cannot be used with transformers 5.24. The dynamo
exporter is slower to trace than TorchScript (seconds per tiny model) but exports every family and head tested in
tests/test_export.py with the batch and sequence axes dynamic.

The model is loaded with `attn_implementation="eager"` (transformers 5 defaults BERT, Llama and others to SDPA).
Measured here on a tiny BERT: the dynamo exporter matched PyTorch with SDPA too (3.7e-9), but the TorchScript
exporter's SDPA graph was off by up to 7e-3, and eager attention is plain MatMul / Softmax that every family has, that
every opset in `OPSET_RANGE` and ONNX Runtime's int8 quantiser handle, and that computes the same function.

Causal LMs are exported as full-sequence logits without a KV cache (`use_cache=False`): enough to score text and to
greedy-decode by re-running the prefix, not an incremental-decoding graph.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .student import LAYER_PATHS

ONNX_FILE = "model.onnx"
INFO_FILE = "export_info.json"
DEFAULT_OPSET = 18
# The dynamo exporter writes opset 18 and newer; onnxruntime 1.32's CPU kernels go up to 23 (checked by the tests).
OPSET_RANGE = (18, 23)
# ONNX models are protobufs, limited to 2 GiB in one file; a bigger student would need external-data export.
MAX_ONNX_BYTES = 2**31 - 2**26
# Tokenizer files transformers' tokenizers save; without one of them `AutoTokenizer` builds an empty tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
# Head class name suffix -> task, and the Auto class that loads it.
TASK_SUFFIXES = {
    "ForSequenceClassification": "sequence-classification",
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",  # GPT2LMHeadModel
}
TASK_CLASSES = {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}
# Inputs the graph may take, in this order; each is used when the tokenizer produces it and the model accepts it.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
QUANTIZE_CHOICES = ("none", "onnx-int8", "onnx-int8-static", "torch-int8")
# Rows per calibration batch of static int8 (`calibration_texts`).
CALIBRATION_BATCH = 16
# Sentences used to check the export when the caller gives none (real rows are better: pass `check_texts`).
DEFAULT_CHECK_TEXTS = (
    "the movie was good",
    "a very boring plot and awful actors",
    "i loved it",
    "not the best film of the year, but funny and never dull",
)


@dataclass
class ExportResult:
    """What `export_student` wrote and measured.

    Attributes:
        output_dir: the folder holding the ONNX model, its tokenizer and config.
        task: `"sequence-classification"` or `"causal-lm"`.
        opset: ONNX opset of the default domain.
        input_names: the graph's inputs, each of shape (batch, sequence).
        max_abs_diff: max |ONNX Runtime - PyTorch| over the logits of the check rows (fp32 export); for causal LMs
            over non-padding positions only.
        num_check_rows: how many rows were compared.
        quantized: per quantised variant ("onnx-int8", "torch-int8"), its file and max |int8 - fp32 PyTorch|.
        sizes: bytes on disk of each weight file in `output_dir`, by file name.
    """

    output_dir: str
    task: str
    opset: int
    input_names: list[str]
    max_abs_diff: float
    num_check_rows: int
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def task_of(config, model_dir: str | os.PathLike) -> str:
    """The export task of a saved model from its `config.architectures`, refusing families and heads not exported."""
    if config.model_type not in LAYER_PATHS:
        raise ValueError(
            f"model_type {config.model_type!r} in {model_dir} is not supported for export; supported model types are "
            f"{sorted(LAYER_PATHS)} (those make_student builds). Export a student of one of these families."
        )
    architectures = list(getattr(config, "architectures", None) or [])
    for suffix, task in TASK_SUFFIXES.items():
        if architectures and architectures[0].endswith(suffix):
            return task
    raise ValueError(
        f"config.architectures={architectures} in {model_dir}: export supports sequence-classification heads "
        "(*ForSequenceClassification) and causal-LM heads (*ForCausalLM, GPT2LMHeadModel). Save the student with "
        "one of these heads (e.g. AutoModelForSequenceClassification) and export that folder."
    )


def check_opset(opset: int) -> int:
    """`opset` if the exporter and ONNX Runtime both support it, else a ValueError naming the range."""
    low, high = OPSET_RANGE
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(
            f"opset must be an integer in [{low}, {high}] (the dynamo exporter writes opset >= {low}; onnxruntime's "
            f"CPU kernels go up to {high}), got {opset!r}. Use opset={DEFAULT_OPSET}."
        )
    return opset


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The resolved output folder, refusing a non-empty one unless `overwrite`."""
    path = Path(output_dir).resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ValueError(
            f"output_dir {str(output_dir)!r} exists and is not empty; export writes a fresh folder. Pick a new "
            "output_dir, remove it, or pass overwrite=True (--overwrite_output_dir)."
        )
    return path


def load_student(model_dir: str | os.PathLike) -> tuple[nn.Module, Any, str]:
    """(model in eval mode with eager attention, tokenizer, task) of a saved student folder, checked for export.

    Raises:
        ValueError: unsupported family or head, or no tokenizer saved in `model_dir`.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model_dir {str(model_dir)!r} has no config.json; pass a folder written by save_pretrained (e.g. the "
            "output_dir of scripts/distill.py or scripts/make_student.py)."
        )
    config = AutoConfig.from_pretrained(model_dir)
    task = task_of(config, model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"model_dir {str(model_dir)!r} has no tokenizer (none of {list(TOKENIZER_FILES)}); the ONNX model is "
            "shipped with its tokenizer. Save it with the student: tokenizer.save_pretrained(model_dir)."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = TASK_CLASSES[task].from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    return model.eval(), tokenizer, task


def graph_input_names(model: nn.Module, tokenizer) -> list[str]:
    """The inputs of the exported graph: `input_ids`, `attention_mask`, and `token_type_ids` when both use it."""
    accepted = set(inspect.signature(model.forward).parameters)
    produced = set(getattr(tokenizer, "model_input_names", ())) | {"input_ids", "attention_mask"}
    return [name for name in INPUT_NAMES if name in accepted and name in produced]


class LogitsOnly(nn.Module):
    """A transformers model as a function of positional (batch, sequence) int64 tensors returning only the logits."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model, self.input_names = model, list(input_names)
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs)), **self.extra, return_dict=True).logits


def encode(tokenizer, texts: Sequence[str], input_names: Sequence[str], max_length: int | None = None) -> dict:
    """Padded int64 numpy arrays of `texts` for the graph's inputs (a GPT-2-style tokenizer pads with EOS here)."""
    if not texts or isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"check_texts must be a non-empty list of strings, got {texts!r:.200}. Pass e.g. dev rows.")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad_token nor an eos_token, so check rows cannot be batched. Set "
                "tokenizer.pad_token and save the tokenizer in model_dir again."
            )
        tokenizer = copy.deepcopy(tokenizer)  # pad with EOS for the check only; the saved tokenizer is left as it came
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_tensors="np",
    )
    return {name: batch[name].astype(np.int64) for name in input_names}


def sample_inputs(model: nn.Module, input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """A (2, 8) example batch for tracing: sizes above 1 so that `torch.export` keeps both axes symbolic."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        ids[1, 6:] = pad
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(tensors[name] for name in input_names)


def torch_logits(model: nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    """fp32 PyTorch logits of `model` on a numpy batch."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, return_dict=True)
    return out.logits.float().numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray, attention_mask: np.ndarray, task: str) -> float:
    """max |a - b| over the logits; for causal LMs over real (non-padding) positions, whose logits are the output."""
    if a.shape != b.shape:
        raise RuntimeError(f"ONNX output shape {a.shape} differs from PyTorch's {b.shape}; please report this.")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if task == "causal-lm":
        diff = diff[attention_mask.astype(bool)]
    return float(diff.max())


def onnx_session(path: str | os.PathLike):
    """An ONNX Runtime CPU session; onnxruntime is the `export` extra (`pip install -e ".[export]"`)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError('ONNX export needs onnx and onnxruntime: pip install -e ".[export]"') from err
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the ONNX model at `path` on a numpy batch."""
    session = onnx_session(path)
    return session.run(["logits"], {i.name: batch[i.name] for i in session.get_inputs()})[0]


def export_onnx(model: nn.Module, input_names: Sequence[str], path: str | os.PathLike, opset: int) -> None:
    """Write `model` (logits only) to `path` with dynamic batch and sequence axes on every input."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if param_bytes > MAX_ONNX_BYTES:
        raise ValueError(
            f"the student holds {param_bytes / 2**30:.2f} GiB of fp32 weights, over ONNX's 2 GiB single-file limit "
            f"({MAX_ONNX_BYTES} bytes); external-data export is not supported here. Export a smaller student, or "
            "call torch.onnx.export(..., external_data=True) yourself."
        )
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = LogitsOnly(model, input_names).eval()
    torch.onnx.export(
        wrapper,
        sample_inputs(model, input_names),
        str(path),
        input_names=list(input_names),
        output_names=["logits"],
        # forward(*inputs) binds all inputs to one parameter, hence one tuple of per-input specs.
        dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in input_names),),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def file_sizes(folder: Path) -> dict[str, int]:
    """Bytes of each model file (ONNX, weights) in `folder`."""
    suffixes = (".onnx", ".safetensors", ".pt", ".data")
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.suffix in suffixes}


def export_student(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    check_texts: Sequence[str] | None = None,
    quantize: str | Sequence[str] = "none",
    calibration_texts: Sequence[str] | None = None,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> ExportResult:
    """Export a saved student to ONNX, check ONNX Runtime against PyTorch, optionally quantise to int8.

    Args:
        model_dir: a student folder (`save_pretrained` output with its tokenizer) of a family in `LAYER_PATHS`, with a
            sequence-classification or causal-LM head.
        output_dir: the folder to create (must not exist or be empty, unless `overwrite`).
        opset: ONNX opset, in `OPSET_RANGE`.
        check_texts: rows to compare ONNX Runtime with PyTorch on; `DEFAULT_CHECK_TEXTS` if None.
        quantize: `"none"`, `"onnx-int8"` (ONNX Runtime dynamic int8, `model_int8.onnx`), `"torch-int8"` (PyTorch
            dynamic int8 of nn.Linear, `model_int8.pt`, see `hf_distill.quantize`), `"onnx-int8-static"` (ONNX
            Runtime static int8 calibrated on `calibration_texts`, `model_int8_static.onnx`), or a list of them.
        calibration_texts: training rows to calibrate static int8's activation ranges on (needed by, and only by,
            `"onnx-int8-static"`; not the rows you evaluate on).
        atol: largest max |ONNX - PyTorch| accepted for the fp32 export; above it the export fails (nothing written).
        overwrite: replace a non-empty `output_dir`.

    Returns:
        `ExportResult` (also written to `output_dir/export_info.json`).
    """
    from . import quantize as quantize_module  # the int8 paths; imported here since quantize imports this module

    # ---- Checks, before anything is written ----
    opset = check_opset(opset)
    variants = [quantize] if isinstance(quantize, str) else list(quantize)
    for variant in variants:
        if variant not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {list(QUANTIZE_CHOICES)}, got {variant!r}. Use 'onnx-int8'.")
    variants = [v for v in dict.fromkeys(variants) if v != "none"]
    if "onnx-int8-static" in variants and not calibration_texts:
        raise ValueError(
            "quantize='onnx-int8-static' needs calibration_texts: training rows (not the evaluation rows) whose "
            "activation ranges fix the int8 scales, e.g. 128 of them (--calibration_file in scripts/export.py)."
        )
    output_dir = check_output_dir(output_dir, overwrite)
    model, tokenizer, task = load_student(model_dir)
    if "torch-int8" in variants:
        quantize_module.check_torch_int8(model)
    input_names = graph_input_names(model, tokenizer)
    max_length = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "model_type", None) in ("roberta", "xlm-roberta") and max_length:
        max_length -= 2  # RoBERTa positions start after the padding index
    batch = encode(tokenizer, DEFAULT_CHECK_TEXTS if check_texts is None else check_texts, input_names, max_length)
    calibration = [
        encode(tokenizer, list(calibration_texts[i : i + CALIBRATION_BATCH]), input_names, max_length)
        for i in range(0, len(calibration_texts or ()), CALIBRATION_BATCH)
    ]
    reference = torch_logits(model, batch)

    # ---- Export into a staging folder beside the target, renamed into place at the end ----
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        export_onnx(model, input_names, staging / ONNX_FILE, opset)
        diff = max_abs_diff(run_onnx(staging / ONNX_FILE, batch), reference, batch["attention_mask"], task)
        if not diff <= atol:
            raise RuntimeError(
                f"ONNX Runtime's logits differ from PyTorch's by up to {diff:.3g} on {len(reference)} check rows, "
                f"over atol={atol}; nothing was written. Please report this with the student's config."
            )
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        result = ExportResult(str(output_dir), task, opset, input_names, diff, len(reference))
        for variant in variants:
            if variant == "onnx-int8":
                path = quantize_module.quantize_onnx_dynamic(staging / ONNX_FILE, staging / quantize_module.ONNX_INT8)
                logits = run_onnx(path, batch)
            elif variant == "onnx-int8-static":
                path = quantize_module.quantize_onnx_static(
                    staging / ONNX_FILE, staging / quantize_module.ONNX_INT8_STATIC, calibration
                )
                logits = run_onnx(path, batch)
            else:
                path = quantize_module.save_torch_int8(model, staging / quantize_module.TORCH_INT8)
                logits = torch_logits(quantize_module.load_torch_int8(staging), batch)
            result.quantized[variant] = {
                "file": path.name,
                "settings": quantize_module.quantizer_settings(variant),
                "max_abs_diff_vs_fp32": max_abs_diff(logits, reference, batch["attention_mask"], task),
            }
        result.sizes = file_sizes(staging)
        (staging / INFO_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
        if output_dir.exists():  # empty, or replaced with overwrite=True
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return result
