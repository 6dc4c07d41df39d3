"""The benchmark's evaluation stages: dev accuracy of each final model (`eval/<model>/`), the round-robin latency
of all of them (`eval/latency/`), and the paired comparisons built from the stored per-row predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from .benchmark_report import paired_bootstrap
from .benchmark_stages import METRICS_FILE, PREDICTIONS_FILE, evaluate_saved_model, fingerprint, run_stage
from .evaluation import LATENCY_BATCH_SIZES, measure_latencies


class EvaluationStages:
    """Mixed into `hf_distill.benchmark.Benchmark`: needs its `config`, `out`, `dataset`, `collator` and `stages`."""

    def eval_stage(self, name: str, model_dir: str | Path, model_spec: dict[str, Any]) -> dict[str, Any]:
        """Dev accuracy, parameters and size on disk of one final model."""
        spec = {
            "stage": f"eval/{name}",
            "model": fingerprint(model_spec),
            "max_eval_samples": self.config.max_eval_samples,
        }

        def work(tmp: Path) -> dict:
            metrics, predictions = evaluate_saved_model(
                model_dir,
                self.dataset["eval"],
                self.collator,
                batch_size=self.config.eval_batch_size,
                desc=name,
                return_predictions=True,
            )
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            (tmp / PREDICTIONS_FILE).write_text(json.dumps(predictions), encoding="utf-8")
            return {"metrics": metrics}

        result = run_stage(self.out / "eval" / name, spec, work)
        self.stages.append(result)
        return result.info["metrics"]

    def eval_name(self, name: str, seed: int) -> str:
        """The folder under `eval/` of row `name` trained under `seed`: `name` under the benchmark's `seed`,
        `<name>-seed<s>` under another, like `rows/<row>/` and `rows/<row>/seed<s>/`. So a run of another seed alone
        (`student_seeds: [43]`) in the folder of an earlier run evaluates its own models beside the earlier ones
        (and reuses the teacher, its cache and the student init) instead of colliding with their evaluations."""
        return name if seed == self.config.seed else f"{name}-seed{seed}"

    def latency_stage(
        self,
        models: dict[str, tuple[str | Path, dict[str, Any]]],
        folder: str = "latency",
        *,
        exports: dict[tuple[str, str], tuple[Path, dict[str, Any], dict]] | None = None,
    ) -> dict:
        """CPU latency of every final model, measured round-robin in one stage so all share the same conditions;
        in `eval/<folder>` (`eval_name("latency", main seed)`: the models timed differ with the main seed).

        `exports`: (row, variant) -> (export folder, spec, info) of deployed students (`hf_distill.benchmark_deploy`),
        timed as `<row>-<variant>` beside the PyTorch `models`, with process CPU time too."""
        from .deploy import load_variant

        c = self.config
        spec = {
            "stage": f"eval/{folder}",
            "models": {name: fingerprint(model_spec) for name, (_, model_spec) in models.items()},
            **({"exports": {f"{r}-{v}": fingerprint(s) for (r, v), (_, s, _) in exports.items()}} if exports else {}),
            "runs": c.latency_runs,
            "warmup": c.latency_warmup,
            "batch_sizes": list(LATENCY_BATCH_SIZES),
            "max_eval_samples": c.max_eval_samples,
        }

        def work(tmp: Path) -> dict:
            loaded = {
                name: AutoModelForSequenceClassification.from_pretrained(model_dir).to("cpu").eval()
                for name, (model_dir, _) in models.items()
            }
            loaded |= {f"{r}-{v}": load_variant(path, v) for (r, v), (path, _, _) in (exports or {}).items()}
            latencies, timings = measure_latencies(loaded, self.dataset["eval"], self.collator, runs=c.latency_runs,
                                                   warmup=c.latency_warmup, cpu_time=bool(exports))  # fmt: skip
            (tmp / "timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")
            return {"latencies": latencies, "torch_threads": torch.get_num_threads()}

        result = run_stage(self.out / "eval" / folder, spec, work, remeasure=True)  # a row added: time them all again
        self.stages.append(result)
        return result.info

    # ------------------------------------------------------------------ per dev row, from the stored predictions
    def stored_predictions(self, eval_name: str) -> dict[str, list[int]] | None:
        """`{"predictions": [...], "labels": [...]}` of the model evaluated as `eval_name`, in dev order (None for an
        evaluation made before predictions were stored)."""
        path = self.out / "eval" / eval_name / PREDICTIONS_FILE
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def correct(self, eval_name: str) -> np.ndarray | None:
        """Per dev row, whether the model evaluated as `eval_name` got it right (None for an evaluation made before
        predictions were stored)."""
        stored = self.stored_predictions(eval_name)
        return None if stored is None else np.asarray(stored["predictions"]) == np.asarray(stored["labels"])

    def correct_by_seed(self, name: str, seeds: list[int]) -> dict[int, np.ndarray] | None:
        """`correct` of a row's model under each training seed (evaluated as `eval_name(name, s)`; the teacher as
        `teacher`); None when any of them predates stored predictions."""
        runs = {s: self.correct(name if name == "teacher" else self.eval_name(name, s)) for s in seeds}
        return None if any(v is None for v in runs.values()) else runs

    def add_intervals(self, rows: list[dict[str, Any]], correct: dict[str, dict[int, np.ndarray] | None]) -> None:
        """`delta_ci95` of every student row: the paired bootstrap interval of its points over the baseline, over the
        dev rows, pooling the training seeds of both (`paired_bootstrap`). `correct`: row name -> `correct_by_seed`."""
        c = self.config
        base = correct[c.baseline_name]
        for row in rows:
            mine = correct[row["name"]]
            if row["name"] in ("teacher", c.baseline_name) or base is None or mine is None:
                continue
            row["delta_ci95"] = list(
                paired_bootstrap(np.stack(list(mine.values())), np.stack(list(base.values())), seed=c.seed)
            )
