"""Deployed students as predictors: an exported folder (`hf_distill.export`) loaded for one runtime and precision.

    model = load_variant("deploy/mpnet-6l", "onnx-int8")
    logits = model(input_ids=ids, attention_mask=mask).logits

`load_variant` returns an `nn.Module` whose `forward(**batch)` returns an output with `.logits`, like the PyTorch
student it came from, so `hf_distill.evaluation`'s accuracy pass (`predict_logits`) and round-robin timer
(`measure_latencies`) measure every variant with the same code, on the same batches, as the PyTorch models:

- `onnx`: the fp32 ONNX export (`model.onnx`) in ONNX Runtime;
- `onnx-int8`: its dynamic int8 quantisation by ONNX Runtime (`model_int8.onnx`);
- `onnx-int8-static`: static int8 (activation ranges calibrated on training rows, `model_int8_static.onnx`);
- `torch-int8`: PyTorch's dynamic int8 of every `nn.Linear` (`model_int8.pt`, `hf_distill.quantize`).

ONNX Runtime sessions run on `num_threads` intra-op threads (default: `torch.get_num_threads()`, the threads the
PyTorch models get) and one inter-op thread, with thread spinning off: a spinning pool keeps burning CPU after its
call returns, which would charge one model's CPU time to the next model timed in the round robin (and waste energy
on a device). PyTorch's own thread pool is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .export import ONNX_FILE
from .quantize import ONNX_INT8, ONNX_INT8_STATIC, TORCH_INT8

# Variant -> the weight file it runs from, inside an export folder.
VARIANT_FILES = {
    "onnx": ONNX_FILE,
    "onnx-int8": ONNX_INT8,
    "onnx-int8-static": ONNX_INT8_STATIC,
    "torch-int8": TORCH_INT8,
}
DEPLOY_VARIANTS = tuple(VARIANT_FILES)
VARIANT_RUNTIMES = {
    "onnx": "ONNX Runtime fp32",
    "onnx-int8": "ONNX Runtime int8 (dynamic)",
    "onnx-int8-static": "ONNX Runtime int8 (static)",
    "torch-int8": "PyTorch int8 (dynamic)",
}


class OnnxClassifier(nn.Module):
    """An ONNX Runtime CPU session behind a transformers-like `forward(**batch) -> output.logits`.

    Args:
        path: the `.onnx` file (inputs `input_ids`, `attention_mask`, maybe `token_type_ids`; output `logits`).
        num_threads: intra-op threads; default `torch.get_num_threads()`.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError('ONNX variants need onnx and onnxruntime: pip install -e ".[export]"') from err
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = str(path)
        self.num_threads = options.intra_op_num_threads
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        # The batch keys the graph takes (`hf_distill.evaluation.accepted_inputs` filters batches by them).
        self.graph_input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        missing = [name for name in self.graph_input_names if name not in batch]
        if missing:
            raise ValueError(f"the ONNX graph {self.path} takes {self.graph_input_names}; the batch lacks {missing}.")
        feed = {name: batch[name].detach().cpu().numpy().astype(np.int64) for name in self.graph_input_names}
        (logits,) = self.session.run(["logits"], feed)
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))


def variant_file(export_dir: str | os.PathLike, variant: str) -> Path:
    """The weight file of `variant` in `export_dir`, refusing an unknown variant or a folder without that file."""
    if variant not in VARIANT_FILES:
        raise ValueError(f"variant must be one of {list(DEPLOY_VARIANTS)}, got {variant!r}. Use 'onnx-int8'.")
    path = Path(export_dir) / VARIANT_FILES[variant]
    if not path.is_file():
        raise ValueError(
            f"{str(export_dir)!r} has no {VARIANT_FILES[variant]} for variant {variant!r}; write it with "
            f"export_student(..., quantize={variant!r})"
            + (" (the fp32 export is always written)." if variant == "onnx" else ".")
        )
    return path


def load_variant(export_dir: str | os.PathLike, variant: str, num_threads: int | None = None) -> nn.Module:
    """The exported student of `export_dir` as a predictor for `variant` (see the module docstring), in eval mode."""
    path = variant_file(export_dir, variant)
    if variant == "torch-int8":
        from .quantize import load_torch_int8

        return load_torch_int8(export_dir)
    return OnnxClassifier(path, num_threads).eval()


def variant_size_mb(export_dir: str | os.PathLike, variant: str) -> float:
    """Size on disk of the variant's weight file, in MB (10^6 bytes), as the benchmark counts a PyTorch model's."""
    return variant_file(export_dir, variant).stat().st_size / 1e6
