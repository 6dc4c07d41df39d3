"""The benchmark's deployment rows: the final students of `deploy_rows` exported to ONNX, quantised to int8, and
measured like every other model (`deploy_rows`, `deploy_variants` in `BenchmarkConfig`).

Stages, each resumable and reused like the others (`hf_distill.benchmark`):

    deploy/<row>-<variant>/model/   `export_student` of the row's final student (main seed) for one variant: the
                                    fp32 ONNX model (always, it is what the int8 variants quantise), the variant's
                                    file, tokenizer, config, export_info.json (max |ONNX - PyTorch| on check rows)
    eval/<row>-<variant>/           dev accuracy and per-row predictions of the variant, through the same accuracy
                                    pass as the PyTorch models (`hf_distill.evaluation.predict_logits`)
    eval/deploy-latency/            latency at batch 1 and 32 and process CPU time of the fp32 PyTorch teacher, each
                                    deployed row's fp32 PyTorch student and its variants, timed round-robin in one
                                    stage (same batches, same threads: ONNX Runtime gets torch's thread count)

The export is checked on the first `DEPLOY_CHECK_ROWS` dev rows (a numerical check of the graph, nothing is chosen
by it) and static int8 calibrated on the first `DEPLOY_CALIBRATION_ROWS` labelled training rows (never on dev rows).

The deployment table (`deploy_rows_of`): per model, dev accuracy and points against its fp32 PyTorch student, the
share of dev rows predicted as the fp32 student predicts them, size on disk of the weight file and its share of the
fp32 student's, latency at batch 1 and 32, the speed-up over the fp32 PyTorch teacher (both timed in this stage), and
CPU seconds per 1,000 predictions at batch 32 (process CPU time over every thread: a proxy for energy, not a
measurement of it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark_stages import METRICS_FILE, PREDICTIONS_FILE, fingerprint, run_stage
from .evaluation import LATENCY_BATCH_SIZES, load_metric, predict_logits

DEPLOY_CHECK_ROWS = 64
DEPLOY_CALIBRATION_ROWS = 128
DEPLOY_LATENCY = "deploy-latency"
# Per model in the deployment table: runtime and precision.
FP32_RUNTIME = "PyTorch fp32"


class DeployStages:
    """Mixed into `hf_distill.benchmark.Benchmark`: needs its `config`, `out`, `raw`, `dataset`, `collator`,
    `stages`, and `eval_name` / `stored_predictions` (`hf_distill.benchmark_eval.EvaluationStages`)."""

    def deploy_stages(
        self,
        finals: dict[str, tuple[str | Path, dict[str, Any]]],
        evaluations: dict[str, dict[str, Any]],
        main_seed: int,
    ) -> list[dict[str, Any]]:
        """Export, evaluate and time the deployment variants of `config.deploy_rows`; the deployment table's rows.

        `finals`: model name -> (folder, spec) of the final PyTorch models (the teacher and every row, main seed);
        `evaluations`: their dev metrics (`eval_stage`)."""
        c = self.config
        if not c.deploy_rows:
            return []
        exports = {
            (row, variant): self.deploy_export_stage(row, variant, *finals[row])
            for row in c.deploy_rows
            for variant in c.deploy_variants
        }
        variant_evals = {
            (row, variant): self.deploy_eval_stage(self.eval_name(f"{row}-{variant}", main_seed), variant, path, spec)
            for (row, variant), (path, spec, _) in exports.items()
        }
        timed = {"teacher": finals["teacher"]} | {row: finals[row] for row in c.deploy_rows}
        latency = self.latency_stage(timed, self.eval_name(DEPLOY_LATENCY, main_seed), exports=exports)
        predictions = {row: self.predictions(self.eval_name(row, main_seed)) for row in c.deploy_rows}
        predictions |= {key: self.predictions(ev["eval_name"]) for key, ev in variant_evals.items()}
        return deploy_rows_of(c.deploy_rows, c.deploy_variants, evaluations, variant_evals, exports, latency,
                              predictions)  # fmt: skip

    # ------------------------------------------------------------------ deploy/<row>-<variant>
    def deploy_export_stage(self, row: str, variant: str, model_dir, model_spec) -> tuple[Path, dict, dict]:
        """`export_student` of one row's final student for one variant; (export folder, spec, stage info)."""
        from .export import export_student
        from .quantize import quantizer_settings

        c = self.config
        static = variant == "onnx-int8-static"
        spec = {
            "stage": f"deploy/{row}-{variant}",
            "model": fingerprint(model_spec),
            "variant": variant,
            "opset": c.deploy_opset,
            "check_rows": DEPLOY_CHECK_ROWS,
            **({"calibration_rows": DEPLOY_CALIBRATION_ROWS} if static else {}),
            # the quantiser's settings: changing them re-exports instead of reusing an export made with others
            **({"quantizer": quantizer_settings(variant)} if quantizer_settings(variant) else {}),
        }

        def work(tmp: Path) -> dict:
            check = list(self.raw["eval"][c.text_column][:DEPLOY_CHECK_ROWS])
            calibration = list(self.labelled_raw_train[c.text_column][:DEPLOY_CALIBRATION_ROWS]) if static else None
            result = export_student(model_dir, tmp / "model", opset=c.deploy_opset, check_texts=check,
                                    quantize="none" if variant == "onnx" else variant,
                                    calibration_texts=calibration)  # fmt: skip
            diff = result.max_abs_diff if variant == "onnx" else result.quantized[variant]["max_abs_diff_vs_fp32"]
            return {"max_abs_diff_vs_fp32": diff, "fp32_onnx_max_abs_diff": result.max_abs_diff}

        result = run_stage(self.out / "deploy" / f"{row}-{variant}", spec, work)
        self.stages.append(result)
        return Path(result.path) / "model", spec, result.info

    @property
    def labelled_raw_train(self):
        from .data import labelled_rows

        return labelled_rows(self.raw["train"])

    # ------------------------------------------------------------------ eval/<row>-<variant>
    def deploy_eval_stage(self, name: str, variant: str, export_dir: Path, export_spec: dict) -> dict:
        """Dev accuracy, size and per-row predictions of one deployed variant."""
        from .deploy import load_variant, variant_size_mb

        spec = {
            "stage": f"eval/{name}",
            "export": fingerprint(export_spec),
            "max_eval_samples": self.config.max_eval_samples,
        }

        def work(tmp: Path) -> dict:
            model = load_variant(export_dir, variant)
            logits, labels = predict_logits(model, self.dataset["eval"], self.collator,
                                            batch_size=self.config.eval_batch_size)  # fmt: skip
            predictions = logits.argmax(-1)
            accuracy = load_metric("accuracy").compute(predictions=predictions, references=labels)["accuracy"]
            metrics = {"accuracy": float(accuracy), "size_mb": variant_size_mb(export_dir, variant),
                       "eval_rows": len(labels)}  # fmt: skip
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            stored = {"predictions": predictions.tolist(), "labels": labels.tolist()}
            (tmp / PREDICTIONS_FILE).write_text(json.dumps(stored), encoding="utf-8")
            return {"metrics": metrics}

        result = run_stage(self.out / "eval" / name, spec, work)
        self.stages.append(result)
        return result.info["metrics"] | {"eval_name": name}

    def predictions(self, eval_name: str) -> np.ndarray | None:
        """The predicted labels of the model evaluated as `eval_name`, in dev order (None before they were stored)."""
        stored = self.stored_predictions(eval_name)
        return None if stored is None else np.asarray(stored["predictions"])


def deploy_rows_of(rows, variants, evaluations, variant_evals, exports, latency, predictions) -> list[dict[str, Any]]:
    """The deployment table's rows: the fp32 PyTorch teacher, then per deployed row its fp32 PyTorch student and its
    variants (see the module docstring for the columns). `predictions`: row or (row, variant) -> dev predictions."""
    from .deploy import VARIANT_RUNTIMES

    times = latency["latencies"]
    teacher_times = times["teacher"]

    def timing(name: str) -> dict[str, Any]:
        t = times[name]
        out = {k: v for k, v in t.items() if k.startswith("latency_")}
        for size in LATENCY_BATCH_SIZES:
            key = f"latency_b{size}_ms"
            out[f"speedup_b{size}"] = teacher_times[key] / t[key]
        big = max(LATENCY_BATCH_SIZES)
        out["cpu_s_per_1000"] = t[f"cpu_b{big}_ms"] / big  # ms per forward of `big` rows -> s per 1,000 rows
        return out

    table = [{"name": "teacher", "runtime": FP32_RUNTIME, "accuracy": evaluations["teacher"]["accuracy"],
              "size_mb": evaluations["teacher"]["size_mb"], **timing("teacher")}]  # fmt: skip
    for row in rows:
        fp32 = evaluations[row]
        table.append({"name": row, "runtime": FP32_RUNTIME, "accuracy": fp32["accuracy"], "delta_vs_fp32_pts": 0.0,
                      "size_mb": fp32["size_mb"], "size_pct_of_fp32": 100.0, **timing(row)})  # fmt: skip
        for variant in variants:
            ev = variant_evals[row, variant]
            mine, reference = predictions.get((row, variant)), predictions.get(row)
            agree = None if mine is None or reference is None else float(np.mean(mine == reference))
            table.append(
                {
                    "name": f"{row}-{variant}",
                    "runtime": VARIANT_RUNTIMES[variant],
                    "accuracy": ev["accuracy"],
                    "delta_vs_fp32_pts": 100 * (ev["accuracy"] - fp32["accuracy"]),
                    "agreement_with_fp32": agree,
                    "size_mb": ev["size_mb"],
                    "size_pct_of_fp32": 100 * ev["size_mb"] / fp32["size_mb"],
                    "max_abs_diff_vs_fp32": exports[row, variant][2].get("max_abs_diff_vs_fp32"),
                    **timing(f"{row}-{variant}"),
                }
            )
    return table


def format_deploy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the deployment rows (`deploy_rows_of`); missing figures are shown as "-"."""

    def num(value, pattern: str, suffix: str = "") -> str:
        return "-" if value is None else format(value, pattern) + suffix

    header = (
        "| model | runtime | dev acc (%) | vs fp32 student (pts) | same prediction as fp32 (%) | size (MB) "
        "| size vs fp32 student | latency b1 (ms) | latency b32 (ms) | speed-up vs teacher b1 "
        "| speed-up vs teacher b32 | CPU s / 1,000 predictions (b32) | max abs logit diff vs fp32 |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        agreement = r.get("agreement_with_fp32")
        cells = [
            str(r["name"]),
            r.get("runtime") or "-",
            num(100 * r["accuracy"], ".2f"),
            num(r.get("delta_vs_fp32_pts"), "+.2f"),
            num(None if agreement is None else 100 * agreement, ".1f"),
            num(r.get("size_mb"), ".1f"),
            num(r.get("size_pct_of_fp32"), ".0f", "%"),
            num(r.get("latency_b1_ms"), ".1f"),
            num(r.get("latency_b32_ms"), ".1f"),
            num(r.get("speedup_b1"), ".2f", "×"),
            num(r.get("speedup_b32"), ".2f", "×"),
            num(r.get("cpu_s_per_1000"), ".2f"),
            num(r.get("max_abs_diff_vs_fp32"), ".2g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def deploy_markdown(results: dict[str, Any]) -> str:
    """The deployment section of results.md / a record's table ("" without deployment rows)."""
    if not results.get("deploy"):
        return ""
    return (
        "\nDeployment (exported and quantised students, dev split; latency and CPU time timed round-robin in one "
        "stage, ONNX Runtime on torch's thread count; CPU seconds per 1,000 predictions are process CPU time, a proxy "
        "for energy):\n\n" + format_deploy_table(results["deploy"]) + "\n"
    )
