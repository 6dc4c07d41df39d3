"""Evaluation: metrics through `evaluate` (loaded from modules shipped in this package), agreement, latency."""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

METRICS_DIR = Path(__file__).parent / "metrics"
LATENCY_BATCH_SIZES = (1, 32)


def load_metric(name: str = "accuracy"):
    """`evaluate.load` of a metric shipped with hf-distill (works offline: it is loaded by path, not from the Hub)."""
    import evaluate

    path = METRICS_DIR / name
    if not path.is_dir():
        raise ValueError(
            f"metric {name!r} is not shipped with hf-distill; "
            f"available: {sorted(p.name for p in METRICS_DIR.iterdir())}."
        )
    return evaluate.load(str(path))


def task_metrics(logits, labels, metric=None) -> dict[str, float]:
    """Metrics for the task the labels imply (see `hf_distill.data`), from `(N, num_labels)` logits.

    Integer class ids: `accuracy` of the argmax. Float multi-hot `(N, num_labels)` labels (multi-label): `accuracy`
    is the exact-match rate of `logits > 0` (every class right), `label_accuracy` the rate per class. Float labels
    with one output (regression): `mse`, and no accuracy (an argmax over one output would always be 0).
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if labels.dtype.kind == "f" and labels.ndim == 2:
        right = (logits > 0) == (labels >= 0.5)
        return {"accuracy": float(right.all(-1).mean()), "label_accuracy": float(right.mean())}
    if labels.dtype.kind == "f":
        return {"mse": float(((logits.reshape(labels.shape) - labels) ** 2).mean())}
    metric = metric or load_metric("accuracy")
    return metric.compute(predictions=logits.argmax(-1), references=labels)


def classification_metrics():
    """A `compute_metrics` for `Trainer`: argmax accuracy of the logits (`task_metrics` for float labels)."""
    metric = load_metric("accuracy")

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        if isinstance(logits, tuple):
            logits = logits[0]
        return task_metrics(logits, labels, metric)

    return compute_metrics


def model_device(model) -> torch.device:
    """The device of `model`'s first parameter; CPU for a predictor without parameters (an ONNX Runtime session)."""
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def accepted_inputs(model) -> set[str]:
    """The batch keys `model` takes: its `graph_input_names` (an exported graph's inputs, `hf_distill.deploy`), else
    the parameters of its `forward`."""
    names = getattr(model, "graph_input_names", None)
    return set(names) if names is not None else set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def time_forward(model, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one `model(**batch)`; CPU time counts every thread of this process."""
    cuda = model_device(model).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    model(**batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def measure_latency(model, batch: dict[str, torch.Tensor], *, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of `model(**batch)` over `runs` timed forward passes after `warmup` untimed ones."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}. Use at least 20 for a stable median.")
    model.eval()
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    for _ in range(warmup):
        model(**batch)
    return statistics.median(time_forward(model, batch)[0] for _ in range(runs))


@torch.no_grad()
def predict_logits(model, dataset, collator, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of `model` over a tokenized dataset (columns input_ids, attention_mask, ..., labels)."""
    model.eval()
    device = model_device(model)
    accepted = accepted_inputs(model)
    logits, labels = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels.append(batch["labels"].numpy())
        inputs = {k: v.to(device) for k, v in batch.items() if k in accepted and k != "labels"}
        logits.append(model(**inputs).logits.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels)


def evaluate_model(model, dataset, collator, *, batch_size: int = 64) -> dict[str, float]:
    """Accuracy of a classifier on a tokenized dataset (`mse` for regression labels: see `task_metrics`)."""
    logits, labels = predict_logits(model, dataset, collator, batch_size=batch_size)
    return task_metrics(logits, labels)


def latency_batch(dataset, collator, batch_size: int, model=None) -> dict[str, torch.Tensor]:
    """A real padded batch of the first `batch_size` rows (without labels), restricted to what `model` accepts."""
    batch = collator([dataset[i % len(dataset)] for i in range(batch_size)])
    batch.pop("labels", None)
    if model is not None:
        accepted = accepted_inputs(model)
        batch = {k: v for k, v in batch.items() if k in accepted}
    return dict(batch)


def measure_latencies(
    models: dict[str, torch.nn.Module],
    dataset,
    collator,
    *,
    batch_sizes: tuple[int, ...] = LATENCY_BATCH_SIZES,
    runs: int = 20,
    warmup: int = 3,
    cpu_time: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """Median latency (ms) of each model at each of `batch_sizes` (default 1 and 32) of real rows, timed round-robin.

    Each round times every model once, in turn, so a burst of load from other processes on a shared machine slows all
    models alike instead of one model's whole measurement; the medians over `runs` rounds (after `warmup` untimed
    rounds) are then comparable, and so are the speed-ups. Returns the medians and every timing (ms).

    With `cpu_time`, also the median process CPU time of each forward pass, `cpu_b<size>_ms` (every thread of this
    process, so a model on 2 threads busy for 10 ms costs about 20 ms): the energy proxy of the deployment table.
    """
    medians: dict[str, dict[str, float]] = {name: {} for name in models}
    timings: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for batch_size in batch_sizes:
        batches = {name: latency_batch(dataset, collator, batch_size, model) for name, model in models.items()}
        for name, model in models.items():
            model.eval()
            batches[name] = {k: v.to(model_device(model)) for k, v in batches[name].items()}
            for _ in range(warmup):
                time_forward(model, batches[name])
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        for _ in tqdm(range(runs), desc=f"latency batch {batch_size} ({len(models)} models)", unit="round"):
            for name, model in models.items():
                times[name].append(tuple(1000 * t for t in time_forward(model, batches[name])))
        for name in models:
            wall, cpu = [t[0] for t in times[name]], [t[1] for t in times[name]]
            medians[name][f"latency_b{batch_size}_ms"] = statistics.median(wall)
            timings[name][f"b{batch_size}"] = wall
            if cpu_time:
                medians[name][f"cpu_b{batch_size}_ms"] = statistics.median(cpu)
                timings[name][f"cpu_b{batch_size}"] = cpu
    return medians, timings


def measure_speedup(teacher, student, dataset, collator, *, batch_size: int = 32, runs: int = 20) -> float:
    """Teacher latency / student latency: medians of `runs` rounds timing both, in turn, on the same real rows."""
    medians, _ = measure_latencies(
        {"teacher": teacher, "student": student}, dataset, collator, batch_sizes=(batch_size,), runs=runs
    )
    key = f"latency_b{batch_size}_ms"
    return medians["teacher"][key] / medians["student"][key]
