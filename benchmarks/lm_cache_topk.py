#!/usr/bin/env python
"""Bytes per token and KL error of the sparse LM teacher cache (top-k log-probabilities + tail mass) on real text.

    python benchmarks/lm_cache_topk.py [--model smollm2] [--data ../shared/data/sst2/train.tsv]
        [--num_sequences 8] [--seq_len 128] [--top_k 8 32 128] [--temperature 1.0] [--student_layers 15]
        [--out benchmarks/results/lm_cache_topk.json]

Teacher: `--model` (default SmolLM2-135M-Instruct, installed by `../shared/tools/offline_models.py smollm2`; a local
folder also works). Student: `hf_distill.make_student(teacher, num_layers=--student_layers)`, untrained: its blocks
are copies of evenly spaced teacher blocks, so its distributions are near the teacher's but not equal, as at the
start of distillation. Text: the first sentences of `--data` (SST-2's train split, real movie-review phrases) joined
by newlines, tokenized and cut into `--num_sequences` rows of `--seq_len` tokens (no padding; every position counts).

For each k the sparse cache is built with `build_teacher_cache(..., spec=TeacherCacheSpec(top_k=k, top_k_tail=True,
temperature=T))`, and the record gives its size (the Arrow file on disk, per token; the payload is 8k + 4 bytes per
token: int32 ids, float32 log-probabilities, one float32 tail) against the full logits' 4·V. Then, batch by batch,
the student's logits are compared with the teacher's in three ways, all normalised to the mean over every token:

    full         kl_div_loss(student, live teacher logits): full-vocabulary KD, the reference
    sparse       sparse_kl_loss(student, cached ids, log-probs, tail), read from the cache through
                 TeacherCacheCollator / cached_teacher_features as training reads it
    renormalised the KL to the teacher's top-k renormalised (what TeacherCacheSpec(top_k=k) without the tail trains
                 on; equal to kl_div_loss on densify_top_k, computed here from the same cached numbers)

with the relative error of the loss, (full − x) / full (non-negative for sparse: a lower bound), and of its gradient
w.r.t. the student logits, ‖g_x − g_full‖ / ‖g_full‖ over all tokens, plus their cosine. Also: the teacher's tail
mass per token, the largest difference between the cached and the live teacher's log-probabilities, and how much the
sparse loss moves if the log-probabilities were stored in float16. The JSON record is written atomically to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
sys.path.insert(0, REPO)  # run as a script from anywhere: the hf_distill of this checkout

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from hf_distill import make_student  # noqa: E402
from hf_distill.cache import (  # noqa: E402
    ARROW_NAME,
    TeacherCacheCollator,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    cached_teacher_features,
)
from hf_distill.files import write_text_atomic  # noqa: E402
from hf_distill.losses import kl_div_loss  # noqa: E402
from hf_distill.losses.sparse import sparse_kl_loss  # noqa: E402
from hf_distill.recipes import display_path  # noqa: E402

WAYS = ("sparse", "renormalised")
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct, de-quantised from its 4-bit GGUF (../shared/tools/offline_models.py)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (installed by offline_models.py) or a folder")
    parser.add_argument("--data", default=os.path.join(SHARED, "data", "sst2", "train.tsv"), help="sentence TSV")
    parser.add_argument("--num_sequences", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--top_k", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass and per loss")
    parser.add_argument("--cache_dir", default=None, help="where to build the caches (default: a temporary folder)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "lm_cache_topk.json"))
    return parser.parse_args(argv)


def resolve_model(name: str) -> str:
    if name != "smollm2":
        return name
    out = subprocess.run(
        [sys.executable, os.path.join(SHARED, "tools", "offline_models.py"), "smollm2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1].split("\t")[-1]


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_distill", "benchmarks/lm_cache_topk.py"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + (" (with uncommitted changes)" if dirty else "")


def text_rows(path: str, tokenizer, num_sequences: int, seq_len: int) -> tuple[Dataset, int]:
    """`num_sequences` rows of `seq_len` tokens of the file's first sentences, joined by newlines; and how many."""
    sentences = load_dataset("csv", data_files=path, delimiter="\t", quoting=3, split="train")["sentence"]
    ids: list[int] = []
    used = 0
    while len(ids) < num_sequences * seq_len and used < len(sentences):
        chunk = sentences[used : used + 256]
        ids += tokenizer("\n".join(chunk) + "\n", add_special_tokens=False)["input_ids"]
        used += len(chunk)
    if len(ids) < num_sequences * seq_len:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than --num_sequences x --seq_len. Ask for fewer.")
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(num_sequences)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]}), used


def renormalised_top_k_kl(student_logits, ids, logprobs, mask, *, temperature, num_items_in_batch):
    """KL to the teacher's top-k renormalised, T²·Σ_top-k p̃ (log p̃ − log q): `kl_div_loss` on `densify_top_k`
    logits (what a top-k cache without the tail trains on), from the k log-probabilities alone."""
    log_q = torch.log_softmax(student_logits.float() / temperature, -1).gather(-1, ids.long())
    log_p = logprobs - torch.logsumexp(logprobs, -1, keepdim=True)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    return torch.where(mask, per_position, 0.0).sum() / num_items_in_batch


class Totals:
    """Sums over batches: the losses, and the inner products of each gradient with itself and the reference's."""

    def __init__(self):
        self.loss = 0.0
        self.sq = self.diff_sq = self.dot = 0.0

    def add(self, loss: torch.Tensor, grad: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        self.loss += float(loss)
        self.sq += float(grad.double().square().sum())
        if reference is not None:
            self.diff_sq += float((grad.double() - reference.double()).square().sum())
            self.dot += float((grad.double() * reference.double()).sum())


def value_and_grad(fn, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = student_logits.detach().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    commit = git_commit()  # at the start: what runs is what was checked out then
    T = args.temperature

    # ---------------------------------------------------------------- models
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # rows are never padded here, but the collator wants a pad token
        tokenizer.pad_token = tokenizer.eos_token
    teacher = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    student = make_student(teacher, num_layers=args.student_layers, verbose=False).eval()
    vocab = teacher.config.vocab_size

    # ---------------------------------------------------------------- data
    data, sentences_used = text_rows(args.data, tokenizer, args.num_sequences, args.seq_len)
    tokens = args.num_sequences * args.seq_len
    collator = DataCollatorWithPadding(tokenizer)

    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or scratch
        # ------------------------------------------------------------ caches
        caches, sizes = {}, {}
        for k in args.top_k:
            spec = TeacherCacheSpec(top_k=k, top_k_tail=True, temperature=T)
            cache = build_teacher_cache(
                teacher, data, collator, cache_dir=cache_dir, spec=spec, tokenizer=tokenizer,
                max_length=args.seq_len, batch_size=args.batch_size,
            )  # fmt: skip
            arrow_bytes = os.path.getsize(os.path.join(cache.path, ARROW_NAME))
            caches[k] = (attach_teacher_cache(data, cache, verify=False), cache)
            sizes[k] = {
                "arrow_bytes": arrow_bytes,
                "bytes_per_token_on_disk": round(arrow_bytes / tokens, 2),
                "payload_bytes_per_token": 8 * k + 4,
                "full_logits_bytes_per_token": 4 * vocab,
                "full_over_on_disk": round(4 * vocab * tokens / arrow_bytes, 1),
                "build_seconds": round(cache.build_seconds, 2),
            }

        # ------------------------------------------------------------ losses, batch by batch
        full = Totals()
        totals = {k: {way: Totals() for way in WAYS} for k in args.top_k}
        fp16_loss = dict.fromkeys(args.top_k, 0.0)
        tails = {k: [] for k in args.top_k}
        live_diff = dict.fromkeys(args.top_k, 0.0)
        for first in range(0, len(data), args.batch_size):
            rows = range(first, min(first + args.batch_size, len(data)))
            plain = collator([data[i] for i in rows])
            inputs = {"input_ids": plain["input_ids"], "attention_mask": plain["attention_mask"]}
            with torch.inference_mode():
                teacher_logits, student_logits = teacher(**inputs).logits, student(**inputs).logits
                live_log_p = torch.log_softmax(teacher_logits / T, -1)
            teacher_logits, student_logits = teacher_logits.clone(), student_logits.clone()  # out of inference mode
            mask = plain["attention_mask"].bool()
            per_token = dict(mask=mask, temperature=T, num_items_in_batch=tokens)
            ref_loss, ref_grad = value_and_grad(
                functools.partial(kl_div_loss, teacher_logits=teacher_logits, **per_token), student_logits
            )
            full.add(ref_loss, ref_grad)
            for k, (attached, cache) in caches.items():
                batch = TeacherCacheCollator(collator, cache.layouts, cache.padding_side)([attached[i] for i in rows])
                sparse = cached_teacher_features(batch, num_classes=vocab).outputs.sparse_logits
                live = live_log_p.gather(-1, sparse.ids.long())
                live_diff[k] = max(live_diff[k], float((live - sparse.logprobs).abs().max()))
                tails[k].append(sparse.tail_logprob[mask].exp())
                teacher_k = dict(teacher_ids=sparse.ids, teacher_logprobs=sparse.logprobs)
                loss, grad = value_and_grad(
                    functools.partial(
                        sparse_kl_loss, **teacher_k, teacher_tail_logprob=sparse.tail_logprob, **per_token
                    ),
                    student_logits,
                )
                totals[k]["sparse"].add(loss, grad, ref_grad)
                loss, grad = value_and_grad(
                    functools.partial(renormalised_top_k_kl, ids=sparse.ids, logprobs=sparse.logprobs, **per_token),
                    student_logits,
                )
                totals[k]["renormalised"].add(loss, grad, ref_grad)
                with torch.no_grad():
                    fp16 = (sparse.ids, sparse.logprobs.half().float(), sparse.tail_logprob.half().float())
                    fp16_loss[k] += float(sparse_kl_loss(student_logits, *fp16, **per_token))

    # ---------------------------------------------------------------- record
    results = {}
    for k in args.top_k:
        tail = torch.cat(tails[k])
        row = {
            "size": sizes[k],
            "teacher_tail_mass": {
                "mean": round(float(tail.mean()), 6),
                "median": round(float(tail.median()), 6),
                "max": round(float(tail.max()), 6),
                "share_of_tokens_above_0.1": round(float((tail > 0.1).float().mean()), 4),
            },
            "cached_vs_live_logprob_max_abs_diff": live_diff[k],
        }
        for way in WAYS:
            t = totals[k][way]
            row[way] = {
                "loss": t.loss,
                "loss_rel_error": (full.loss - t.loss) / full.loss,
                "grad_rel_error": math.sqrt(t.diff_sq / full.sq),
                "grad_cosine": t.dot / math.sqrt(t.sq * full.sq),
            }
        row["sparse"]["lower_bound_holds"] = row["sparse"]["loss"] <= full.loss * (1 + 1e-6)
        row["sparse"]["fp16_logprobs_loss_rel_change"] = abs(fp16_loss[k] - totals[k]["sparse"].loss) / abs(
            totals[k]["sparse"].loss
        )
        results[str(k)] = row

    record = {
        "command": " ".join(["python", "benchmarks/lm_cache_topk.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": {
            "model": args.model if args.model == "smollm2" else display_path(os.path.abspath(args.model), REPO),
            "data": display_path(os.path.abspath(args.data), REPO),
            "num_sequences": args.num_sequences,
            "seq_len": args.seq_len,
            "top_k": args.top_k,
            "temperature": T,
            "student_layers": args.student_layers,
            "batch_size": args.batch_size,
        },
        "teacher": {
            "checkpoint": SMOLLM2 if args.model == "smollm2" else None,
            "class": type(teacher).__name__,
            "layers": teacher.config.num_hidden_layers,
            "vocab_size": vocab,
        },
        "student": {
            "layers": student.config.num_hidden_layers,
            "copied_from_teacher_layers": list(student.config.distillation_teacher_layers),
            "trained": False,
        },
        "data": {"sentences_used": sentences_used, "tokens": tokens, "counted_positions": tokens},
        "full_kl": full.loss,
        "top_k": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print_summary(record)
    return record


def print_summary(record: dict) -> None:
    print(f"full-vocabulary KL {record['full_kl']:.5f} over {record['data']['tokens']} tokens ({record['seconds']} s)")
    print(f"{'k':>5} {'B/token':>9} {'tail mass':>10} {'sparse: loss err':>17} {'grad err':>9} "
          f"{'renorm: loss err':>17} {'grad err':>9}")  # fmt: skip
    for k, row in record["top_k"].items():
        s, r = row["sparse"], row["renormalised"]
        print(
            f"{k:>5} {row['size']['bytes_per_token_on_disk']:>9.1f} {row['teacher_tail_mass']['mean']:>10.4f} "
            f"{s['loss_rel_error']:>17.4%} {s['grad_rel_error']:>9.4f} {r['loss_rel_error']:>17.4%} "
            f"{r['grad_rel_error']:>9.4f}"
        )


if __name__ == "__main__":
    main()
