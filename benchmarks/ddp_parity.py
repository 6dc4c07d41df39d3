#!/usr/bin/env python
"""Distributed parity on real data: a 2-process CPU run (torchrun, gloo) against the 1-process run.

Both runs distil the same teacher into the same 3-layer student with `scripts/distill.py`, on the same SST-2 rows, at
the same global batch (16 = 1 x 16 = 2 x 8), for the same number of steps. The teacher is all-MiniLM-L6-v2 fine-tuned
here on other SST-2 rows and saved with dropout 0, so the student (`make_student` copies the teacher's config) has no
dropout either and the two runs see exactly the same computation up to floating-point reduction order. Compared:
the logged training loss at every step (max absolute and relative difference) and the accuracy on the full 872-row
dev split. The same pair is run again with the teacher cache on.

    python benchmarks/ddp_parity.py [--work_dir outputs/ddp_parity] [--out benchmarks/ddp_parity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TRAIN = os.path.join(SHARED, "data", "sst2", "train.tsv")
DEV = os.path.join(SHARED, "data", "sst2", "dev.tsv")


def minilm_dir() -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(SHARED, "tools", "offline_models.py"), "minilm"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1].split("\t")[-1]


def finetune_teacher(out_dir: str, rows: int, epochs: int, seed: int) -> dict:
    """MiniLM + a classification head, `epochs` epochs on `rows` shuffled SST-2 rows taken from the end of the train
    split (the distillation samples all of it); saved with dropout 0, its dev accuracy measured here. Reused when
    already there with the same settings."""
    meta_path = os.path.join(out_dir, "parity_teacher.json")
    if os.path.isfile(meta_path):
        meta = json.load(open(meta_path))
        if (meta.get("rows"), meta.get("epochs"), meta.get("seed")) == (rows, epochs, seed):
            return meta
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    base = minilm_dir()
    torch.manual_seed(seed)
    data = load_dataset("csv", data_files={"train": TRAIN}, delimiter="\t", quoting=3)["train"]
    data = data.select(range(len(data) - 20000, len(data))).shuffle(seed=seed).select(range(rows))
    tok = AutoTokenizer.from_pretrained(base)
    data = data.map(lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True)
    data = data.rename_column("label", "labels").remove_columns(["sentence"])
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    args = TrainingArguments(
        output_dir=out_dir + ".tmp", per_device_train_batch_size=32, num_train_epochs=epochs, learning_rate=5e-5,
        use_cpu=True, report_to=[], save_strategy="no", seed=seed, logging_steps=10,
    )  # fmt: skip
    start = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    seconds = round(time.perf_counter() - start, 1)
    dev = load_dataset("csv", data_files={"dev": DEV}, delimiter="\t", quoting=3)["dev"]
    dev = dev.map(lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True)
    dev = dev.rename_column("label", "labels").remove_columns(["sentence"])
    predictions = trainer.predict(dev)
    dev_accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    model.config.hidden_dropout_prob = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    meta = {"rows": rows, "epochs": epochs, "seed": seed, "seconds": seconds, "dev_accuracy": dev_accuracy}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def distill(name: str, teacher: str, work: str, nproc: int, a, cache: bool) -> dict:
    out = os.path.join(work, name)
    common = [
        os.path.join(REPO, "scripts", "distill.py"),
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "3",
        "--train_file", TRAIN, "--validation_file", DEV, "--text_column", "sentence", "--label_column", "label",
        "--max_length", "64", "--max_train_samples", str(a.train_rows),
        "--task_weight", "0.5", "--logits_weight", "0.5", "--temperature", "2.0", "--learning_rate", "1e-4",
        "--max_steps", str(a.steps), "--per_device_train_batch_size", str(a.global_batch // nproc),
        "--per_device_eval_batch_size", "64", "--logging_steps", "1", "--save_strategy", "steps",
        "--save_steps", str(a.steps), "--seed", str(a.seed), "--use_cpu", "true", "--report_to", "none",
        "--output_dir", out, "--overwrite_output_dir", "true", "--use_teacher_cache", str(cache).lower(),
    ]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [*common, "--ddp_backend", "gloo"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"ok": False, "seconds": seconds, "error": (proc.stdout + proc.stderr)[-4000:]}
    state = json.load(open(os.path.join(out, f"checkpoint-{a.steps}", "trainer_state.json")))
    history = [h for h in state["log_history"] if "loss" in h]
    terms = sorted({k for h in history for k in h if k.startswith("loss_")})
    evals = json.load(open(os.path.join(out, "eval_results.json")))
    return {
        "ok": True,
        "seconds": seconds,
        "steps": [h["step"] for h in history],
        "loss": [h["loss"] for h in history],
        **{t: [h.get(t) for h in history] for t in terms},
        "eval_accuracy": evals.get("eval_accuracy"),
        "eval_loss": evals.get("eval_loss"),
        "eval_samples": evals.get("eval_samples"),
        "command": portable(" ".join(cmd[1:]), a.work_dir),
    }


def portable(text: str, work_dir: str) -> str:
    """`text` without this machine's paths: the repository as `.`, the shared data as `../shared`, work as `$WORK`."""
    text = text.replace(os.path.abspath(work_dir), "$WORK").replace(SHARED, "../shared").replace(REPO + os.sep, "")
    return text.replace(REPO, ".")


def compare(one: dict, two: dict) -> dict:
    if not (one.get("ok") and two.get("ok")):
        return {"ok": False}
    pairs = list(zip(one["loss"], two["loss"]))
    result = {
        "ok": one["steps"] == two["steps"],
        "loss_max_abs_diff": max(abs(x - y) for x, y in pairs),
        "loss_max_rel_diff": max(abs(x - y) / abs(x) for x, y in pairs),
        "accuracy_diff_points": round(100 * abs(one["eval_accuracy"] - two["eval_accuracy"]), 3),
    }
    for term in [k for k in one if k.startswith("loss_") and k in two]:
        vals = [(x, y) for x, y in zip(one[term], two[term]) if x is not None and y is not None]
        if vals:
            result[f"{term}_max_abs_diff"] = max(abs(x - y) for x, y in vals)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=os.path.join(REPO, "outputs", "ddp_parity"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "ddp_parity.json"))
    p.add_argument("--teacher_rows", type=int, default=2000)
    p.add_argument("--teacher_epochs", type=int, default=2)
    p.add_argument("--train_rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--abs_tolerance", type=float, default=1e-4, help="Max abs difference of the per-step loss.")
    a = p.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    start = time.perf_counter()
    teacher_dir = os.path.join(a.work_dir, "teacher")
    teacher = finetune_teacher(teacher_dir, a.teacher_rows, a.teacher_epochs, a.seed)
    runs = {}
    for cache in (False, True):
        suffix = "_cache" if cache else ""
        for nproc in (1, 2):
            name = f"{nproc}proc{suffix}"
            runs[name] = distill(name, teacher_dir, a.work_dir, nproc, a, cache)
            print(name, {k: v for k, v in runs[name].items() if k in ("ok", "seconds", "eval_accuracy", "error")})
    comparisons = {
        "no_cache": compare(runs["1proc"], runs["2proc"]),
        "cache": compare(runs["1proc_cache"], runs["2proc_cache"]),
    }
    for c in comparisons.values():
        if c.get("ok"):
            c["within_tolerance"] = c["loss_max_abs_diff"] <= a.abs_tolerance and c["accuracy_diff_points"] <= 0.5
    result = {
        "what": "scripts/distill.py on SST-2: 1 process (batch 16) vs torchrun --nproc_per_node 2, gloo (2 x 8)",
        "settings": {k: v for k, v in vars(a).items() if k not in ("work_dir", "out")},
        "teacher": {**teacher, "base": "offline_models.py minilm (sentence-transformers/all-MiniLM-L6-v2)"},
        "tolerance": {"loss_max_abs_diff": a.abs_tolerance, "accuracy_diff_points": 0.5},
        "comparisons": comparisons,
        "runs": runs,
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{os.cpu_count()} CPU cores",
    }
    with open(a.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(json.dumps(comparisons, indent=1))


if __name__ == "__main__":
    main()
