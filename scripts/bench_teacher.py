#!/usr/bin/env python
"""The teacher's forward pass in distillation: `no_grad` against `inference_mode`, float32 against bfloat16.

    PYTHONPATH=. python scripts/bench_teacher.py --teacher DIR --rows 512 --threads 1

The teacher (a fine-tuned MiniLM-L6 classifier given by `--teacher`, else all-MiniLM-L6-v2 with an untrained head)
runs `forward_with_features` as `DistillationTrainer` runs it for logits + hidden + attention matching with a 3-layer
student (`uniform` mapping: teacher blocks 1, 3, 5 <-> student blocks 0, 1, 2), on SST-2 training rows
(`../shared/data/sst2/train.tsv`, shuffled with seed 0, as `scripts/bench_speed.py` takes them), batch 32, max length
64.

Speed: the teacher forward alone in four variants (float32 / bfloat16 x no_grad / inference_mode). For each of
`--rounds` rounds and each of the first `--timing-batches` batches, the four run back to back (in an order rotated
every time), so each pair of variants is compared on the same batch within about a second: the reported speed-ups
are medians of those paired ratios, robust to a neighbour's load that comes and goes.

Accuracy of the bfloat16 teacher against the float32 one, over `--rows` rows: agreement of the predicted classes, the
KL divergence between their output distributions at T = 1 and T = 2, the relative error of the matched hidden states
and the largest error of the attention maps; the distillation terms a student (`make_student(teacher, 3)`, eval mode,
its weights fixed) gets against either teacher (KL at T = 2, hidden MSE, attention MSE, as the trainer computes them),
and the cosine between the student gradients of the summed loss (0.5 task + 0.5 KL + hidden + attention) under
either.

Writes everything to `--output` (JSON; temp file, then rename).
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from bench_speed import SHARED, git_commit, load_data, minilm_dir, sst2_train_file, uncommitted_paths, write_json
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import LayerMatch, forward_with_features, make_student
from hf_distill.layer_mapping import build_layer_matches
from hf_distill.losses import ATTENTION_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES
from hf_distill.losses.task import task_loss
from hf_distill.recipes import display_path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = {"task": 0.5, "logits": 0.5, "hidden": 1.0, "attention": 1.0}
TEMPERATURE = 2.0
VARIANTS = [  # (name, dtype, context)
    ("float32, no_grad", torch.float32, torch.no_grad),
    ("float32, inference_mode", torch.float32, torch.inference_mode),
    ("bfloat16, no_grad", torch.bfloat16, torch.no_grad),
    ("bfloat16, inference_mode", torch.bfloat16, torch.inference_mode),
]
SPEED_UPS = [  # (name, slower variant, faster variant)
    ("inference_mode over no_grad, float32", "float32, no_grad", "float32, inference_mode"),
    ("inference_mode over no_grad, bfloat16", "bfloat16, no_grad", "bfloat16, inference_mode"),
    ("bfloat16 over float32, no_grad", "float32, no_grad", "bfloat16, no_grad"),
    ("bfloat16 over float32, inference_mode", "float32, inference_mode", "bfloat16, inference_mode"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="a fine-tuned MiniLM-L6 classifier (default: untrained head)")
    parser.add_argument("--rows", type=int, default=512, help="rows for the accuracy comparison")
    parser.add_argument("--timing-batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--shared-dir", default=str(SHARED))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_teacher.json"))
    return parser.parse_args(argv)


def layer_pairs(teacher, student) -> list[LayerMatch]:
    """The trainer's pairings for hidden + attention matching with `layer_mapping="uniform"`."""
    teacher_layers, student_layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    return build_layer_matches("uniform", teacher_layers, student_layers, hidden_loss="mse", attention_loss="mse")


def features(model, batch, pairs: list[LayerMatch], side: str):
    layers = sorted({getattr(m, f"{side}_layer") for m in pairs})
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return forward_with_features(model, inputs, hidden_layers=layers, attention_layers=layers)


def distillation_terms(student, teacher, batch, pairs: list[LayerMatch]) -> dict[str, torch.Tensor]:
    """The trainer's terms for one batch (task CE, logit KL at T = 2, hidden MSE, attention MSE), each a per-item mean
    (hidden and attention: the weighted mean over their pairings, as `DistillationTrainer.compute_loss` takes it)."""
    mask = batch["attention_mask"].bool()
    terms = {
        "task": task_loss(student.outputs.logits, batch["labels"]),
        "logits": LOGIT_LOSSES["kl"](student.outputs.logits, teacher.outputs.logits, None, temperature=TEMPERATURE),
    }
    for feature, table, source in (
        ("hidden", HIDDEN_LOSSES, "hidden_states"),
        ("attention", ATTENTION_LOSSES, "attentions"),
    ):
        matches = [m for m in pairs if m.feature == feature]
        values = [
            table[m.loss](getattr(student, source)[m.student_layer], getattr(teacher, source)[m.teacher_layer], mask)
            for m in matches
        ]
        terms[feature] = sum(m.weight * v for m, v in zip(matches, values)) / sum(m.weight for m in matches)
    return terms


def student_gradient(student_model, batch, teacher, pairs) -> tuple[dict[str, float], torch.Tensor]:
    """The terms against `teacher`'s features, and the student's flattened gradient of their weighted sum."""
    student_model.zero_grad(set_to_none=True)
    terms = distillation_terms(features(student_model, batch, pairs, "student"), teacher, batch, pairs)
    sum(WEIGHTS[name] * value for name, value in terms.items()).backward()
    grad = torch.cat([p.grad.flatten() for p in student_model.parameters() if p.grad is not None])
    return {k: v.item() for k, v in terms.items()}, grad


def describe_teacher(path: str | None) -> dict:
    """Where the teacher came from: its training stage record (`scripts/benchmark.py` writes stage.json), if any."""
    if path is None:
        return {"model": "sentence-transformers/all-MiniLM-L6-v2", "head": "untrained (seed 0)"}
    stage = Path(path) / "stage.json"
    spec = json.loads(stage.read_text())["spec"] if stage.is_file() else None
    return {"model": "fine-tuned all-MiniLM-L6-v2 classifier", "folder": display_path(path, REPO), "training": spec}


def time_variants(teachers, batches, pairs, rounds: int) -> dict[str, list[float]]:
    """Per (round, batch): each variant's forward time in seconds, the variants back to back in a rotated order."""
    for _, dtype, context in VARIANTS:  # warm-up
        with context():
            features(teachers[dtype], batches[0], pairs, "teacher")
    times = {name: [] for name, _, _ in VARIANTS}
    turn = 0
    for _ in range(rounds):
        for batch in batches:
            order = VARIANTS[turn % len(VARIANTS) :] + VARIANTS[: turn % len(VARIANTS)]
            turn += 1
            for name, dtype, context in order:
                start = time.perf_counter()
                with context():
                    features(teachers[dtype], batch, pairs, "teacher")
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    # ------------------------------------------------------------------ args
    args = parse_args(sys.argv[1:] if argv is None else argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    # ------------------------------------------------------------------ models and data
    base = minilm_dir(args)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher or base, num_labels=2).eval()
    teachers = {torch.float32: teacher, torch.bfloat16: copy.deepcopy(teacher).to(torch.bfloat16)}
    student = make_student(teacher, num_layers=3, verbose=False).eval()  # eval: no dropout, the same student each time
    pairs = layer_pairs(teacher, student)
    accuracy_batches = -(-args.rows // args.batch_size)
    n_batches = max(args.timing_batches, accuracy_batches)
    train = load_data(tokenizer, sst2_train_file(args), n_batches * args.batch_size, args.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    batches = [
        collator([train[j] for j in range(i * args.batch_size, min((i + 1) * args.batch_size, len(train)))])
        for i in range(n_batches)
    ]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load_start[0]:.2f} at start"
    )
    print(f"teacher {describe_teacher(args.teacher)['model']}; {len(train)} SST-2 rows; {[m.key for m in pairs]}")

    # ------------------------------------------------------------------ speed: paired, rotated
    times = time_variants(teachers, batches[: args.timing_batches], pairs, args.rounds)
    speed = {
        name: {"forward_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3}
        for name, v in times.items()
    }
    speed_ups = {}
    for name, slow, fast in SPEED_UPS:
        paired = [a / b for a, b in zip(times[slow], times[fast])]
        speed_ups[name] = {
            "median_paired_ratio": statistics.median(paired),
            "share_faster": sum(r > 1 for r in paired) / len(paired),
            "pairs": len(paired),
        }
    print(f"\nteacher forward, median ms per batch of {args.batch_size} ({len(times['float32, no_grad'])} samples)")
    for name, row in speed.items():
        print(f"  {name:<26} {row['forward_ms']:8.1f}  ({row['min_ms']:.1f}-{row['max_ms']:.1f})")
    for name, row in speed_ups.items():
        print(
            f"  {name:<38} {row['median_paired_ratio']:.3f}x (median of paired ratios; faster in "
            f"{row['share_faster']:.0%} of {row['pairs']} pairs)"
        )

    # ------------------------------------------------------------------ accuracy: bfloat16 against float32
    agree = rows = correct32 = correct16 = 0
    kl1, kl2, max_prob, attn_max = [], [], 0.0, 0.0
    hidden_rel = {m.teacher_layer: [] for m in pairs if m.feature == "hidden"}
    terms32, terms16, cosines, norm_ratio = [], [], [], []
    for batch in batches[:accuracy_batches]:
        with torch.inference_mode():
            f32 = features(teachers[torch.float32], batch, pairs, "teacher")
            f16 = features(teachers[torch.bfloat16], batch, pairs, "teacher")
        l32, l16 = f32.outputs.logits.float(), f16.outputs.logits.float()
        agree += int((l32.argmax(-1) == l16.argmax(-1)).sum())
        correct32 += int((l32.argmax(-1) == batch["labels"]).sum())
        correct16 += int((l16.argmax(-1) == batch["labels"]).sum())
        rows += l32.shape[0]
        for t, out in ((1.0, kl1), (2.0, kl2)):
            p32 = (l32 / t).log_softmax(-1)
            out += (p32.exp() * (p32 - (l16 / t).log_softmax(-1))).sum(-1).tolist()
        max_prob = max(max_prob, float((l32.softmax(-1) - l16.softmax(-1)).abs().max()))
        real = batch["attention_mask"].bool()
        for layer, errors in hidden_rel.items():
            h32, h16 = f32.hidden_states[layer][real], f16.hidden_states[layer][real].float()
            errors.append(float((h16 - h32).norm() / h32.norm()))
            attn_max = max(attn_max, float((f16.attentions[layer].float() - f32.attentions[layer]).abs().max()))
        t32, g32 = student_gradient(student, batch, f32, pairs)
        t16, g16 = student_gradient(student, batch, f16, pairs)
        terms32.append(t32)
        terms16.append(t16)
        cosines.append(float(torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0)))
        norm_ratio.append(float(g16.norm() / g32.norm()))

    terms = {
        name: {
            "float32": statistics.fmean(t[name] for t in terms32),
            "bfloat16": statistics.fmean(t[name] for t in terms16),
            "max_rel_diff_per_batch": max(
                abs(a[name] - b[name]) / max(abs(a[name]), 1e-12) for a, b in zip(terms32, terms16)
            ),
        }
        for name in terms32[0]
    }
    accuracy = {
        "rows": rows,
        "argmax_agreement": agree / rows,
        "label_accuracy_float32": correct32 / rows,
        "label_accuracy_bfloat16": correct16 / rows,
        "kl_float32_to_bfloat16_T1_mean": statistics.fmean(kl1),
        "kl_float32_to_bfloat16_T1_max": max(kl1),
        "kl_float32_to_bfloat16_T2_mean": statistics.fmean(kl2),
        "max_abs_probability_diff": max_prob,
        "hidden_relative_error_mean": {str(k): statistics.fmean(v) for k, v in hidden_rel.items()},
        "attention_max_abs_diff": attn_max,
        "student_terms": terms,
        "student_gradient_cosine_min": min(cosines),
        "student_gradient_cosine_mean": statistics.fmean(cosines),
        "student_gradient_norm_ratio_mean": statistics.fmean(norm_ratio),
    }
    print(f"\nbfloat16 teacher against float32 over {rows} rows:")
    for key, value in accuracy.items():
        print(f"  {key}: {value}")

    # ------------------------------------------------------------------ save
    load_end = os.getloadavg()
    write_json(
        Path(args.output),
        {
            "command": " ".join(["python", *[display_path(a, REPO) or a for a in sys.argv]]),
            "commit": git_commit(),
            "uncommitted_changes": uncommitted_paths(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threads": torch.get_num_threads(),
            "load_average_start": list(load_start),
            "load_average_end": list(load_end),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "teacher": describe_teacher(args.teacher),
            "pairs": [m.key for m in pairs],
            "batches": {"timing": args.timing_batches, "rounds": args.rounds, "batch_size": args.batch_size},
            "speed": speed,
            "speed_ups": speed_ups,
            "accuracy": accuracy,
        },
    )
    print(f"\nwrote {display_path(str(Path(args.output).resolve()), REPO)}; load average {load_end[0]:.2f} at end")


if __name__ == "__main__":
    main()
