"""int8 dynamic quantisation of a student: ONNX Runtime's for the exported model, PyTorch's own as the no-extra path.

- **ONNX Runtime** (`quantize_onnx_dynamic`, the `export` extra): `onnxruntime.quantization.quantize_dynamic` stores
  the weights of MatMul and Gather (embedding) nodes as int8 with one scale per output channel (`DYNAMIC_SETTINGS`)
  and quantises activations on the fly at run time (`model_int8.onnx`). No calibration rows are needed. Per-channel
  scales were chosen on held-out *training* rows, never on a reported split: on 2,000 SST-2 training rows that the
  flagship MPNet 6-layer student never saw, per-tensor weights (ONNX Runtime's default) kept 90.30% accuracy against
  fp32's 92.50% (96.1% of predictions unchanged), per-channel 92.20% (98.4%), per-channel with `reduce_range` 91.80%,
  uint8 weights per channel 92.00%, for the same 68 MB.
- **PyTorch** (`save_torch_int8` / `load_torch_int8`, nothing beyond torch): `torch.ao.quantization.quantize_dynamic`
  on every `nn.Linear` (weights int8 per tensor, activations quantised on the fly); embeddings, norms and the rest
  stay fp32. It is saved as `model_int8.pt`, `torch.save` of the quantised model's state dict, beside `config.json`;
  `load_torch_int8(folder)` rebuilds the model from the config, quantises it the same way and loads the state dict.
  Its kernels (fbgemm / qnnpack) run on CPU only. `torch.ao.quantization` is marked deprecated in favour of torchao
  but is still in torch 2.13 and needs no extra package.

- **ONNX Runtime static** (`quantize_onnx_static`, the `export` extra): `onnxruntime.quantization.quantize_static`
  with activation ranges calibrated (min-max) on batches of training rows (`model_int8_static.onnx`, QDQ format:
  QuantizeLinear / DequantizeLinear pairs around the int8 MatMul and Gather nodes, weights int8 per channel,
  activations uint8). No quantisation on the fly at run time, but ranges fixed by the calibration rows: accuracy
  depends on how representative they are, so calibrate on training rows, never on the rows you report. Measured on
  the flagship MPNet 6-layer student (2,000 held-out training rows, 128 calibration rows): 73.1% against fp32's 92.5%,
  and no better with the attention's activation-by-activation MatMuls or the embeddings left fp32: min-max ranges of
  these activations in uint8 lose too much. Use `onnx-int8` (dynamic) for such models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

from .export import TASK_CLASSES, task_of

ONNX_INT8 = "model_int8.onnx"
ONNX_INT8_STATIC = "model_int8_static.onnx"
TORCH_INT8 = "model_int8.pt"
# The node types static quantisation quantises: the weight-heavy ones (the projections, the embeddings). Softmax,
# LayerNorm, GELU and the residual Adds stay fp32: int8 there costs accuracy in a transformer and saves little time.
STATIC_OP_TYPES = ("MatMul", "Gemm", "Gather")
# The quantiser's settings, recorded with every export (and in the benchmark's stage specs, so changing them here
# re-exports instead of reusing an export made with the old ones).
DYNAMIC_SETTINGS = {"weight_type": "QInt8", "per_channel": True}
STATIC_SETTINGS = {
    "quant_format": "QDQ",
    "op_types_to_quantize": list(STATIC_OP_TYPES),
    "per_channel": True,
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "calibrate_method": "MinMax",
}


def quantizer_settings(variant: str) -> dict:
    """The quantiser settings of an int8 variant (`{}` for fp32 ONNX and PyTorch's int8, which has none to choose)."""
    return {"onnx-int8": DYNAMIC_SETTINGS, "onnx-int8-static": STATIC_SETTINGS}.get(variant, {})


def quantize_onnx_dynamic(onnx_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Dynamic int8 (weights int8 per tensor) of the ONNX model at `onnx_path`, written to `output_path`."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise ImportError('onnx-int8 quantisation needs onnx and onnxruntime: pip install -e ".[export]"') from err
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    if not onnx_path.is_file():
        raise ValueError(f"onnx_path {str(onnx_path)!r} is not a file; export the student first (export_student).")
    weight_type = getattr(QuantType, DYNAMIC_SETTINGS["weight_type"])
    quantize_dynamic(onnx_path, output_path, weight_type=weight_type, per_channel=DYNAMIC_SETTINGS["per_channel"])
    return output_path


def quantize_onnx_static(
    onnx_path: str | os.PathLike, output_path: str | os.PathLike, calibration_batches: Sequence[dict[str, np.ndarray]]
) -> Path:
    """Static int8 of the ONNX model at `onnx_path` (see the module docstring), calibrated on `calibration_batches`
    (dicts of the graph's int64 inputs, e.g. `hf_distill.export.encode` of training rows), written to `output_path`.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise ImportError(
            'onnx-int8-static quantisation needs onnx and onnxruntime: pip install -e ".[export]"'
        ) from err
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    if not onnx_path.is_file():
        raise ValueError(f"onnx_path {str(onnx_path)!r} is not a file; export the student first (export_student).")
    batches = list(calibration_batches)
    if not batches:
        raise ValueError(
            "calibration_batches is empty: static int8 needs rows to calibrate activation ranges on. Pass "
            "calibration_texts (training rows) to export_student."
        )

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            return next(self.remaining, None)

    # Shape inference and graph clean-up first, as ONNX Runtime recommends for static quantisation.
    prepared = output_path.with_name(output_path.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output_path),
            Batches(),
            quant_format=getattr(QuantFormat, STATIC_SETTINGS["quant_format"]),
            op_types_to_quantize=list(STATIC_SETTINGS["op_types_to_quantize"]),
            per_channel=STATIC_SETTINGS["per_channel"],
            activation_type=getattr(QuantType, STATIC_SETTINGS["activation_type"]),
            weight_type=getattr(QuantType, STATIC_SETTINGS["weight_type"]),
            calibrate_method=getattr(CalibrationMethod, STATIC_SETTINGS["calibrate_method"]),
        )
    finally:
        prepared.unlink(missing_ok=True)
    return output_path


def check_torch_int8(model: nn.Module) -> None:
    """Refuse models PyTorch's dynamic int8 cannot quantise usefully, or a torch build without its CPU kernels."""
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        raise ValueError(
            "quantize='torch-int8' needs a quantized engine, but torch.backends.quantized.supported_engines has none "
            "in this torch build. Use quantize='onnx-int8'."
        )
    # GPT-2 keeps its blocks' weights in transformers' Conv1D (a transposed Linear), which quantize_dynamic skips:
    # only the LM head would be quantised, so the "int8" model would be fp32 blocks and no smaller.
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    if conv1d:
        raise ValueError(
            f"quantize='torch-int8' quantises nn.Linear only, but model_type {model.config.model_type!r} keeps its "
            f"block weights in transformers Conv1D layers ({conv1d[0]!r} and {len(conv1d) - 1} more), which it "
            "would leave fp32. Use quantize='onnx-int8' for this family."
        )
    if not any(isinstance(module, nn.Linear) for module in model.modules()):
        raise ValueError(
            f"quantize='torch-int8' quantises nn.Linear layers, and {type(model).__name__} has none. "
            "Use quantize='onnx-int8'."
        )


def quantize_torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `nn.Linear` replaced by PyTorch's dynamic int8 Linear (CPU, eval mode)."""
    check_torch_int8(model)
    return torch.ao.quantization.quantize_dynamic(model.cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def save_torch_int8(model: nn.Module, path: str | os.PathLike) -> Path:
    """Quantise `model` with `quantize_torch_dynamic` and `torch.save` its state dict to `path` (`model_int8.pt`).

    The folder of `path` must also hold the model's `config.json` for `load_torch_int8`."""
    path = Path(path)
    torch.save(quantize_torch_dynamic(model).state_dict(), path)
    return path


def load_torch_int8(folder: str | os.PathLike) -> nn.Module:
    """The PyTorch int8 student saved by `save_torch_int8` in `folder` (beside its `config.json`), in eval mode."""
    folder = Path(folder)
    if not (folder / TORCH_INT8).is_file() or not (folder / "config.json").is_file():
        raise ValueError(
            f"folder {str(folder)!r} needs {TORCH_INT8} and config.json; write them with "
            "export_student(..., quantize='torch-int8')."
        )
    config = AutoConfig.from_pretrained(folder)
    model = TASK_CLASSES[task_of(config, folder)].from_config(config, attn_implementation="eager")
    model = quantize_torch_dynamic(model)
    # The state dict holds int8 tensors, their scales and dtypes only: loadable with weights_only.
    model.load_state_dict(torch.load(folder / TORCH_INT8, weights_only=True))
    return model.eval()
