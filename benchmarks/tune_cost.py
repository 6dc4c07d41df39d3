#!/usr/bin/env python
"""What a tuning trial costs: trials per hour with the teacher cache, without it, and for the student alone.

    python benchmarks/tune_cost.py [--rows 700] [--validation_samples 100] [--out benchmarks/results/tune_cost.json]

One process runs the same trials (the same three parameter sets, enqueued) of `hf_distill.tune.tune_distillation` on
the same SST-2 rows (`../shared/data/sst2/train.tsv`, the recipe's seeded shuffle, a validation slice held out) with
the recipe `recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml` (MiniLM-L6 teacher, 3-layer student, 1 epoch, batch
32, max length 64) in three modes:

    live teacher    use_teacher_cache=False: the teacher runs in every training step and on every validation batch
    teacher cache   use_teacher_cache=True: the teacher runs once (training rows + validation slice), before trial 1
    student alone   task_weight=1, logits_weight=0 (no teacher term), learning rate searched: the floor

The modes take turns trial by trial (each a study in its own folder, continued one trial at a time), so background
load on a shared machine falls on all three alike. A trial's seconds are optuna's (model_init, training, evaluation);
trials per hour = 3600 / the median trial's seconds (and, apart, 3600 x trials / their total seconds). Each trial's
CPU seconds (this process, all threads, from its setup to its evaluation) are recorded too: on a machine shared with
other work they change far less than the wall time, so the ratios are also given in CPU seconds. The cache's one-off
build is reported apart.

The teacher is the fine-tuned MiniLM at `outputs/expA/teacher` when it is there (written by another benchmark run);
otherwise the pretrained all-MiniLM-L6-v2 with a fresh classification head (fine for a cost measurement: the cost of a
forward pass does not depend on what the weights learned), and the record says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")
RECIPE = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3", "vanilla_kd.yaml")
FINE_TUNED = os.path.join(REPO, "outputs", "expA", "teacher")
# The same three trials in every mode (the student-alone mode uses their learning rates only).
TRIALS = [
    {"temperature": 2.0, "alpha": 0.5, "learning_rate": 1.0e-4},
    {"temperature": 4.0, "alpha": 0.7, "learning_rate": 5.0e-5},
    {"temperature": 1.5, "alpha": 0.3, "learning_rate": 2.0e-4},
]
MODES = {
    "live teacher": ["--use_teacher_cache", "false"],
    "teacher cache": ["--use_teacher_cache", "true"],
    "student alone": ["--use_teacher_cache", "false", "--task_weight", "1", "--logits_weight", "0",
                      "--temperature_range", "none", "--alpha_range", "none"],
}  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=700, help="labelled SST-2 rows (validation slice included)")
    parser.add_argument("--validation_samples", type=int, default=100)
    parser.add_argument("--work_dir", default=os.path.join(REPO, "outputs", "tune_cost"))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "tune_cost.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args(argv)


def minilm_dir() -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(SHARED, "tools", "offline_models.py"), "minilm"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1].split("\t")[-1]


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_distill", "benchmarks/tune_cost.py"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + (" (with uncommitted changes)" if dirty else "")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commit = git_commit()  # at the start: what runs is what was checked out then
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import optuna
    import torch
    import transformers

    from hf_distill import ModelArguments, load_teacher
    from hf_distill.files import write_text_atomic
    from hf_distill.recipes import display_path
    from hf_distill.tune import tune_distillation
    from hf_distill.tune_recipe import parse_tune_args

    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    fine_tuned = os.path.isfile(os.path.join(FINE_TUNED, "model.safetensors"))
    teacher_path = FINE_TUNED if fine_tuned else minilm_dir()
    teacher, tokenizer = load_teacher(ModelArguments(teacher_model_name_or_path=teacher_path), num_labels=2)
    shutil.rmtree(args.work_dir, ignore_errors=True)  # a fresh measurement: the cache is built here, and timed

    common = [
        "--config", RECIPE, "--teacher_model_name_or_path", teacher_path, "--max_train_samples", str(args.rows),
        "--validation_samples", str(args.validation_samples), "--enqueue_base", "false", "--disable_tqdm", "true",
        "--logging_steps", "1000", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    results = {mode: [] for mode in MODES}
    load = [round(os.getloadavg()[0], 2)]
    for n in range(1, len(TRIALS) + 1):
        for mode, flags in MODES.items():
            folder = os.path.join(args.work_dir, mode.replace(" ", "_"))
            parsed = parse_tune_args([*common, *flags, "--output_dir", folder, "--tune_dir", folder,
                                      "--n_trials", str(n)])  # fmt: skip
            d = parsed.distill
            keep = [k for k in TRIALS[0] if parsed.tune.ranges[k] is not None]
            enqueue = [{k: trial[k] for k in keep} for trial in TRIALS]
            start = time.perf_counter()
            result = tune_distillation(
                d.model, d.data, d.training, parsed.tune, teacher=teacher, tokenizer=tokenizer, enqueue=enqueue
            )
            trial = result.trials[-1]  # the one this call ran
            cache = result.teacher_cache
            results[mode].append({
                "params": trial["params"], "seconds": round(trial["seconds"], 2), "cpu_seconds": trial["cpu_seconds"],
                "accuracy": trial["objective"],
                "call_seconds": round(time.perf_counter() - start, 2),
                "cache_build_seconds": round(cache["build_seconds"], 2) if cache and cache["built"] else None,
            })  # fmt: skip
            load.append(round(os.getloadavg()[0], 2))
            print(f"{mode:14s} trial {n}: {trial['seconds']:.1f}s ({trial['cpu_seconds']:.1f} CPU s), accuracy "
                  f"{trial['objective']:.4f}", flush=True)  # fmt: skip

    # Trials per hour from the median trial (robust to a trial slowed down by other work on a shared machine), and
    # from all trials' total.
    summary = {}
    for mode, trials in results.items():
        seconds = [t["seconds"] for t in trials]
        cpu = [t["cpu_seconds"] for t in trials]
        summary[mode] = {
            "trial_seconds": seconds,
            "median_trial_seconds": statistics.median(seconds),
            "trial_cpu_seconds": cpu,
            "median_trial_cpu_seconds": statistics.median(cpu),
            "trials_per_hour": round(3600 / statistics.median(seconds), 1),
            "trials_per_hour_from_total": round(3600 * len(seconds) / sum(seconds), 1),
            "cache_build_seconds": next((t["cache_build_seconds"] for t in trials if t["cache_build_seconds"]), None),
        }
    tph = {mode: s["trials_per_hour"] for mode, s in summary.items()}
    cpu = {mode: s["median_trial_cpu_seconds"] for mode, s in summary.items()}
    record = {
        "command": " ".join(["python", "benchmarks/tune_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit,
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min": load,  # before the first trial, then after each: the machine is shared
        },
        "versions": {
            name: module.__version__
            for name, module in (("torch", torch), ("transformers", transformers), ("optuna", optuna))
        },  # fmt: skip
        "teacher": display_path(teacher_path, REPO) if fine_tuned else "pretrained all-MiniLM-L6-v2, fresh head",
        "teacher_fine_tuned": fine_tuned,
        "recipe": display_path(RECIPE, REPO),
        "data": {
            "labelled_rows": args.rows,
            "validation_samples": args.validation_samples,
            "train_rows": args.rows - args.validation_samples,
            "epochs": 1,
            "batch_size": 32,
        },
        "modes": summary,
        "ratios": {
            "teacher cache / live teacher": round(tph["teacher cache"] / tph["live teacher"], 2),
            "teacher cache / student alone": round(tph["teacher cache"] / tph["student alone"], 2),
            # The same comparison in CPU seconds per trial (inverted: trials per CPU hour), less sensitive to load.
            "cpu: teacher cache / live teacher": round(cpu["live teacher"] / cpu["teacher cache"], 2),
            "cpu: teacher cache / student alone": round(cpu["student alone"] / cpu["teacher cache"], 2),
        },
        "trials": results,
    }
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print(f"\n{'mode':14s} {'median s/trial':>15s} {'trials/hour':>12s} {'median CPU s/trial':>19s}")
    for mode, s in summary.items():
        print(f"{mode:14s} {s['median_trial_seconds']:15.1f} {s['trials_per_hour']:12.1f} "
              f"{s['median_trial_cpu_seconds']:19.1f}")  # fmt: skip
    for name, value in record["ratios"].items():
        print(f"{name}: {value}x")
    build = summary["teacher cache"]["cache_build_seconds"]
    print(f"teacher cache built once in {build}s (training rows + validation slice); written {args.out}")


if __name__ == "__main__":
    main()
