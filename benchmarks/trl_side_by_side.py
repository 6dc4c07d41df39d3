#!/usr/bin/env python
"""TRL's GKD trainer and hf-distill's DistillationTrainer side by side: the generalised JSD, step time, peak memory.

    python benchmarks/trl_side_by_side.py [--batch 4] [--seq_len 256] [--vocab 8192] [--hidden 128]
        [--teacher_layers 4] [--student_layers 2] [--beta 0.5] [--repeats 5] [--smollm2] [--write [--out PATH]]

The real run, on a quiet machine (nothing else on the CPU), from the repository root:

    OMP_NUM_THREADS=2 python benchmarks/trl_side_by_side.py --smollm2 --batch 4 --seq_len 512 --repeats 5 --write

Measured at that size (2026-12-02, BENCHMARKS.md "Side by side with TRL"): about 8 GB at TRL's step's peak, 6 GB at
ours, 25-30 s a step on 2 cores, 8 minutes in all. `--smollm2` takes SmolLM2-135M (30 layers, vocabulary 49,152;
`../shared/tools/offline_models.py smollm2`) as the teacher and 15 of its layers, evenly spaced with the first and
the last (`make_student`'s default), as the student; without it both are small Llamas built here.
Nothing is written unless `--write` is given; then the record goes atomically to
`benchmarks/results/trl_side_by_side.json` (or `--out`).

**(a) Equality of the loss functions**, on seeded random logits (std 3) with labels of -100 at about a third of the
positions, for every (beta, T) of `--betas` x `--temperatures`: TRL's ``GKDTrainer.generalized_jsd_loss`` (the static
method of ``trl.experimental.gkd``) against ``hf_distill.losses.generalized_jsd_loss``, loss and gradient w.r.t. the
student logits, as max |a - b| / max |b|. Conventions, and how like is compared with like:

- beta: the same in both (the teacher's weight: ``m = beta p_T + (1 - beta) p_S``; 0 forward KL, 1 reverse KL).
- reduction: TRL's ``reduction="batchmean"`` with labels is the sum over labelled positions (``labels != -100``) and
  the vocabulary divided by the number of labelled positions: a mean per labelled token, not per sequence. Ours is the
  same sum divided by the number of counted positions of the mask we pass (``labels != -100``). With
  ``num_items_in_batch`` both divide the sum by it. Without labels TRL divides by the batch size B, ours by B x L: the
  record's ``no_labels`` row checks ``TRL == ours x L``.
- temperature: ours is multiplied by T² (like every logit loss of the package), TRL's is not; we compare ours / T².
- dtype: ours upcasts to fp32, TRL computes in the input dtype (equal here: fp32 inputs).

The same comparison is made with the loss of TRL's newest trainer (``trl.DistillationTrainer``, which projects hidden
states through the LM heads in chunks, ``_chunked_divergence_loss``) against ours on ``F.linear(hidden, W)``.

**(b) One optimizer step of each trainer** on the same batches: the same teacher (one frozen object, shared), two
copies of the same student, AdamW with the same learning rate, no scheduler, no gradient clipping, fp32, no gradient
checkpointing (TRL's configs default to bf16 and gradient checkpointing: both switched off), batches with a masked
prompt (about a quarter of each row), real tokens and right padding. GKDTrainer runs with ``lmbda=0`` and
``seq_kd=False`` (no generation: every step is the supervised JSD on the batch), ours with
``logits_loss="generalized_jsd"``, ``jsd_beta=beta``, ``logits_weight=1``, ``task_weight=0``, ``temperature=1``.
GKDTrainer's loss ignores ``GKDConfig.temperature`` (it only samples with it) and uses T = 1, so T = 1 for both.
A step is ``trainer.training_step`` (forward, loss, backward) with the window's ``num_items_in_batch``, then
``optimizer.step()`` and ``zero_grad(set_to_none=True)``. The first step of both (same weights, same batch) is the
loss check: the two losses and every student gradient must agree. Then ``--warmup`` untimed steps, then ``--repeats``
timed steps round-robin (TRL then ours, then ours then TRL, ...; each pair on the same batch): medians and ratios.

Peak memory: torch's profiler with ``profile_memory=True`` on one further step each (after the timed ones, so the
optimizer state exists), the peak of the running sum of every CPU-allocator allocation and free in the step (bytes
of tensors added on top of what the step starts with). tracemalloc cannot see tensor memory (torch allocates
storage outside Python's allocator), and resident-set deltas depend on glibc's arenas and page reuse (noisy at these
sizes); the profiler's counts are exact and deterministic. Its overhead is why memory and time are measured in
separate steps. Reported: the whole step's peak and the peak before the optimizer step (forward + loss + backward;
at few tokens both are the gradients of the end of backward, alike in both trainers, and only at many tokens x a
large vocabulary do the losses' (tokens x vocabulary) tensors set it), and the step's net bytes (about 0 when the
profiler saw every free). On CUDA, ``torch.cuda.max_memory_allocated`` is used instead (not tried yet).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "trl_side_by_side.json")
NAMES = ("trl_gkd", "hf_distill")
OPTIMIZER_MARK = "trl_side_by_side.optimizer_step"  # a profiler range: where the optimizer step begins
TOLERANCE = 1e-5  # max relative difference between the two generalised JSDs
CONFIG_FLAGS = (
    "batch", "seq_len", "vocab", "hidden", "teacher_layers", "student_layers", "beta", "learning_rate", "warmup",
    "repeats", "betas", "temperatures", "seed", "smollm2",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the built models (not --smollm2)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the built models (not --smollm2)")
    parser.add_argument("--teacher_layers", type=int, default=4, help="teacher depth (not --smollm2)")
    parser.add_argument(
        "--student_layers", type=int, default=None, help="student depth (default 2; 15 with --smollm2)"
    )
    parser.add_argument("--beta", type=float, default=0.5, help="jsd_beta / GKDConfig.beta of the trainers")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (checked) one")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per trainer")
    parser.add_argument("--betas", default="0,0.1,0.5,0.9,1", help="comma-separated betas of the equality check")
    parser.add_argument("--temperatures", default="1,2,0.5", help="comma-separated temperatures of the check")
    parser.add_argument("--equality_only", action="store_true", help="only part (a), no trainers")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M teacher, 15 alternating layers student")
    parser.add_argument(
        "--shared_dir", default=os.path.join(REPO, "..", "shared"), help="holds tools/offline_models.py"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write the JSON record (default: print only)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where --write puts the record")
    args = parser.parse_args(argv)
    if args.student_layers is None:
        args.student_layers = 15 if args.smollm2 else 2
    return args


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b| over the tensor."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------------------
# (a) The loss functions on the same logits
# --------------------------------------------------------------------------------------------------------------------


def loss_and_grad(fn, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fn(inputs)` (its first element if a tuple) and its gradient w.r.t. `inputs`."""
    leaf = inputs.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss.detach(), leaf.grad


def ours_over_t2(student, teacher, mask, beta, temperature):
    """Our generalised JSD without its T² factor (TRL's has none), on the positions of `mask`."""
    from hf_distill.losses import generalized_jsd_loss

    return generalized_jsd_loss(student, teacher, mask, temperature=temperature, beta=beta) / temperature**2


def ours_from_hidden(hidden, weight, teacher, mask, beta, temperature):
    return ours_over_t2(F.linear(hidden, weight), teacher, mask, beta, temperature)


def equality(args) -> dict:
    from trl.experimental.gkd import GKDTrainer

    from hf_distill.losses import generalized_jsd_loss

    g = torch.Generator().manual_seed(args.seed)
    b, length, vocab = 3, 17, 257
    student = torch.randn(b, length, vocab, generator=g) * 3
    teacher = torch.randn(b, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[torch.rand(b, length, generator=g) < 0.35] = -100
    mask = labels != -100
    trl_jsd = GKDTrainer.generalized_jsd_loss
    rows = []
    for beta in floats(args.betas):
        for t in floats(args.temperatures):
            theirs = loss_and_grad(
                partial(trl_jsd, teacher_logits=teacher, labels=labels, beta=beta, temperature=t), student
            )
            ours = loss_and_grad(partial(ours_over_t2, teacher=teacher, mask=mask, beta=beta, temperature=t), student)
            rows.append(
                {"beta": beta, "temperature": t, "trl": float(theirs[0]), "ours_over_t2": float(ours[0]),
                 "loss": rel_diff(ours[0], theirs[0]), "grad": rel_diff(ours[1], theirs[1])}
            )  # fmt: skip
    beta = args.beta
    n = int(mask.sum()) * 2  # as if this were half of a gradient-accumulation window
    theirs = trl_jsd(student, teacher, labels, beta=beta, num_items_in_batch=torch.tensor(n))
    ours = generalized_jsd_loss(student, teacher, mask, beta=beta, num_items_in_batch=torch.tensor(n))
    window = {"beta": beta, "num_items_in_batch": n, "loss": rel_diff(ours, theirs)}
    theirs = trl_jsd(student, teacher, None, beta=beta)  # sum / B
    ours = generalized_jsd_loss(student, teacher, None, beta=beta)  # sum / (B x L)
    no_labels = {"beta": beta, "trl_over_ours": float(theirs / ours), "expected": length}
    no_labels["loss"] = rel_diff(ours * length, theirs)
    return {
        "gkd_generalized_jsd_loss": rows,
        "num_items_in_batch": window,
        "no_labels": no_labels,
        "distillation_trainer_chunked": chunked_equality(args, g),
        "max_rel_diff": max(max(r["loss"], r["grad"]) for r in rows),
        "tolerance": TOLERANCE,
        "meets_tolerance": max(max(r["loss"], r["grad"]) for r in rows) <= TOLERANCE,
    }


def chunked_equality(args, g) -> dict | None:
    """TRL's newest trainer's loss (hidden states x LM heads, in tiles) against ours on the logits."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as error:  # private: may move in another TRL version
        return {"skipped": str(error)}

    b, length, hs, ht, vocab = 2, 9, 16, 24, 300
    hidden_s, hidden_t = torch.randn(b, length, hs, generator=g), torch.randn(b, length, ht, generator=g)
    weight_s, weight_t = torch.randn(vocab, hs, generator=g), torch.randn(vocab, ht, generator=g)
    mask = torch.rand(b, length, generator=g) > 0.3
    rows = []
    for beta in floats(args.betas):
        for t in floats(args.temperatures):
            theirs = loss_and_grad(
                partial(_chunked_divergence_loss, teacher_hidden_states=hidden_t, student_lm_head_weight=weight_s,
                        teacher_lm_head_weight=weight_t, completion_mask=mask, beta=beta, temperature=t),
                hidden_s,
            )  # fmt: skip
            ours = loss_and_grad(
                partial(ours_from_hidden, weight=weight_s, teacher=F.linear(hidden_t, weight_t), mask=mask, beta=beta,
                        temperature=t),
                hidden_s,
            )  # fmt: skip
            rows.append(
                {
                    "beta": beta,
                    "temperature": t,
                    "loss": rel_diff(ours[0], theirs[0]),
                    "grad": rel_diff(ours[1], theirs[1]),
                }
            )
    return {"rows": rows, "max_rel_diff": max(max(r["loss"], r["grad"]) for r in rows)}


# --------------------------------------------------------------------------------------------------------------------
# (b) The trainers on the same batches
# --------------------------------------------------------------------------------------------------------------------


def build_models(args):
    """(teacher, student, tokenizer, vocabulary size)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if args.smollm2:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_distill import make_student

        tool = os.path.join(args.shared_dir, "tools", "offline_models.py")
        out = subprocess.run([sys.executable, tool, "smollm2"], capture_output=True, text=True, check=True)
        path = out.stdout.strip().split()[-1]
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        student = make_student(teacher, num_layers=args.student_layers, verbose=False)
        return teacher, student, tokenizer, teacher.config.vocab_size
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, args.vocab)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(words, unk_token="<eos>")), pad_token="<pad>", eos_token="<eos>"
    )

    def llama(layers: int, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=max(args.seq_len, 64), pad_token_id=0, eos_token_id=1, bos_token_id=1,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    return llama(args.teacher_layers, args.seed), llama(args.student_layers, args.seed + 1), tokenizer, args.vocab


def make_batches(args, vocab: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Rows of 3/4 to all of seq_len real tokens (right padding), the first ~quarter a prompt (label -100)."""
    g = torch.Generator().manual_seed(args.seed + 1000)
    batches = []
    for _ in range(count):
        ids = torch.randint(2, vocab, (args.batch, args.seq_len), generator=g)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row in range(args.batch):
            length = int(torch.randint(max(2, 3 * args.seq_len // 4), args.seq_len + 1, (1,), generator=g))
            prompt = int(torch.randint(1, max(2, length // 4 + 1), (1,), generator=g))
            attention[row, :length] = 1
            labels[row, prompt:length] = ids[row, prompt:length]
            ids[row, length:] = 0
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return batches


def build_trainers(args, teacher, student, tokenizer, batch, output_dir: str) -> dict:
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from hf_distill import DistillationConfig, DistillationTrainer

    common = dict(
        output_dir=output_dir, report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed,
        per_device_train_batch_size=args.batch, learning_rate=args.learning_rate, optim="adamw_torch",
        weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1, save_strategy="no",
        bf16=False, logging_steps=1,
    )  # fmt: skip
    # Both trainers get the same rows as a dataset (SFTTrainer requires one); the steps are given their batches.
    from datasets import Dataset

    dataset = Dataset.from_dict({key: batch[key].tolist() for key in ("input_ids", "attention_mask", "labels")})
    gkd = GKDTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        # TRL's configs default to gradient checkpointing (and bf16): off, as in ours.
        args=GKDConfig(
            **common, lmbda=0.0, seq_kd=False, beta=args.beta, temperature=1.0, gradient_checkpointing=False
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=lambda rows: rows,  # unused: the batches are handed to training_step
    )
    ours = DistillationTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=DistillationConfig(
            **common,
            logits_loss="generalized_jsd",
            jsd_beta=args.beta,
            logits_weight=1.0,
            task_weight=0.0,
            temperature=1.0,
            distill_on="labels",
        ),  # fmt: skip
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainers = {"trl_gkd": gkd, "hf_distill": ours}
    for trainer in trainers.values():
        trainer.create_optimizer()
        trainer.model.train()
    return trainers


def backward(trainer, batch) -> torch.Tensor:
    """Forward, loss and backward of one step, as Trainer's loop runs it (the window is this one batch)."""
    batch = dict(batch)  # GKD's training_step may replace entries
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    return trainer.training_step(trainer.model, batch, counts)


def optimizer_step(trainer) -> None:
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def timed_step(trainer, batch, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    backward(trainer, batch)
    optimizer_step(trainer)
    sync()
    return time.perf_counter() - start


def peak_step_memory(trainer, batch, device) -> dict:
    """Bytes of tensors one step adds at its peak on top of those alive when it starts: the whole step, and the
    forward + loss + backward alone (before the optimizer step, which is the same in both trainers).

    On CPU also the net bytes the step's recorded events leave allocated: near 0 in a steady step, it bounds what the
    profiler misses (it drops the frees of blocks allocated before it started, so the peak is an upper bound by at
    most their size)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        backward(trainer, batch)
        torch.cuda.synchronize()
        loss_backward = torch.cuda.max_memory_allocated() - base
        optimizer_step(trainer)
        torch.cuda.synchronize()
        whole = torch.cuda.max_memory_allocated() - base
        return {"peak_memory_bytes": whole, "peak_loss_backward_bytes": loss_backward, "net_memory_bytes": None}
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backward(trainer, batch)
        with record_function(OPTIMIZER_MARK):
            optimizer_step(trainer)
    events = prof.profiler.kineto_results.events()
    boundary = min(e.start_ns() for e in events if e.name() == OPTIMIZER_MARK)
    current = whole = loss_backward = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        current += event.nbytes()
        whole = max(whole, current)
        if event.start_ns() < boundary:
            loss_backward = max(loss_backward, current)
    return {"peak_memory_bytes": whole, "peak_loss_backward_bytes": loss_backward, "net_memory_bytes": current}


def compare_trainers(args) -> dict:
    import tempfile

    teacher, student, tokenizer, vocab = build_models(args)
    batches = make_batches(args, vocab, 1 + args.warmup + args.repeats + 1)
    with tempfile.TemporaryDirectory(prefix="trl_side_by_side.") as tmp:
        trainers = build_trainers(args, teacher, student, tokenizer, batches[0], tmp)
        device = trainers["hf_distill"].args.device

        # First step: same weights, same batch -> the same loss and gradients.
        first = {name: backward(trainer, batches[0]) for name, trainer in trainers.items()}
        grads = {
            name: {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
            for name, trainer in trainers.items()
        }
        assert grads["trl_gkd"].keys() == grads["hf_distill"].keys()
        grad_diffs = {n: rel_diff(grads["hf_distill"][n], g) for n, g in grads["trl_gkd"].items()}
        worst = max(grad_diffs, key=grad_diffs.get)
        first_step = {
            "loss_trl_gkd": float(first["trl_gkd"]), "loss_hf_distill": float(first["hf_distill"]),
            "loss_rel_diff": rel_diff(first["hf_distill"], first["trl_gkd"]),
            "grad_max_rel_diff": grad_diffs[worst], "grad_worst_parameter": worst,
            "grad_median_rel_diff": statistics.median(grad_diffs.values()),
        }  # fmt: skip
        del grads
        for trainer in trainers.values():
            optimizer_step(trainer)
        for batch in batches[1 : 1 + args.warmup]:
            for trainer in trainers.values():
                backward(trainer, batch)
                optimizer_step(trainer)

        seconds = {name: [] for name in NAMES}
        for i, batch in enumerate(batches[1 + args.warmup : 1 + args.warmup + args.repeats]):
            order = NAMES if i % 2 == 0 else NAMES[::-1]
            for name in order:
                seconds[name].append(timed_step(trainers[name], batch, device))
        memory = {name: peak_step_memory(trainers[name], batches[-1], device) for name in NAMES}

    rows = {
        name: {
            "seconds": round(statistics.median(seconds[name]), 4),
            "seconds_all": [round(s, 4) for s in seconds[name]],
            **memory[name],
            "peak_memory_mib": round(memory[name]["peak_memory_bytes"] / 2**20, 1),
            "peak_loss_backward_mib": round(memory[name]["peak_loss_backward_bytes"] / 2**20, 1),
        }
        for name in NAMES
    }
    ratios = {
        "hf_distill_over_trl_time": round(rows["hf_distill"]["seconds"] / max(rows["trl_gkd"]["seconds"], 1e-9), 4),
        **{
            f"hf_distill_over_trl_{key}": round(
                rows["hf_distill"][f"{field}_bytes"] / max(rows["trl_gkd"][f"{field}_bytes"], 1), 4
            )
            for key, field in (("memory", "peak_memory"), ("loss_backward_memory", "peak_loss_backward"))
        },
    }
    models = {
        "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers,
        "vocab": vocab, "hidden": teacher.config.hidden_size,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "tokens_per_step": args.batch * args.seq_len,
        "labelled_tokens_first_step": int((batches[0]["labels"][:, 1:] != -100).sum()),
    }  # fmt: skip
    return {"device": str(device), "models": models, "first_step": first_step, "trainers": rows, "ratios": ratios}


# --------------------------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------------------------


def provenance() -> dict:
    import transformers
    import trl

    def git(*command: str) -> str | None:
        try:
            return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "hf_distill", "benchmarks/trl_side_by_side.py")
    return {
        "commit": commit.strip() if commit else None,
        "uncommitted_changes": bool(dirty and dirty.strip()),
        "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },  # fmt: skip
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },  # fmt: skip
    }


def markdown_table(record: dict) -> str:
    """The record as BENCHMARKS.md's tables: the loss-equality checks, then (unless `--equality_only`) the two
    trainers' median step time and peak memory side by side, and ours over TRL's."""
    eq = record["equality"]
    lines = [
        "| check | max rel. diff |",
        "|---|---|",
        "| generalised JSD, TRL GKDTrainer vs ours / T², loss and gradient, every (beta, T) | "
        f"{eq['max_rel_diff']:.1e} |",
        f"| the same with num_items_in_batch | {eq['num_items_in_batch']['loss']:.1e} |",
    ]
    chunked = eq["distillation_trainer_chunked"]
    if "max_rel_diff" in chunked:
        lines.append(f"| TRL DistillationTrainer's chunked loss vs ours / T² | {chunked['max_rel_diff']:.1e} |")
    if "trainers" in record:
        f = record["first_step"]
        lines.append(f"| first optimizer step: loss | {f['loss_rel_diff']:.1e} |")
        lines.append(f"| first optimizer step: gradients (worst parameter) | {f['grad_max_rel_diff']:.1e} |")
        lines += [
            "",
            "| trainer | median s / step | peak memory (MiB) | peak in forward + backward (MiB) |",
            "|---|---|---|---|",
        ]
        for name, row in record["trainers"].items():
            memory = f"{row['peak_memory_mib']:,.1f} | {row['peak_loss_backward_mib']:,.1f}"
            lines.append(f"| {name} | {row['seconds']:.3f} | {memory} |")
        r = record["ratios"]
        lines.append(
            f"| ours / TRL | {r['hf_distill_over_trl_time']:.3f}× | {r['hf_distill_over_trl_memory']:.3f}× | "
            f"{r['hf_distill_over_trl_loss_backward_memory']:.3f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hf_distill.files import write_text_atomic

    record = {"benchmark": "trl_side_by_side", "config": {key: getattr(args, key) for key in CONFIG_FLAGS}}
    record.update(provenance())
    record["equality"] = equality(args)
    if not args.equality_only:
        record["memory_method"] = (
            "torch.cuda.max_memory_allocated"
            if torch.cuda.is_available()
            else "torch.profiler profile_memory: peak of the running sum of CPU allocator events"
        )
        record.update(compare_trainers(args))
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    eq = record["equality"]
    print("generalized JSD, TRL GKDTrainer.generalized_jsd_loss vs ours / T^2 (labels != -100, mean per label):")
    for row in eq["gkd_generalized_jsd_loss"]:
        print(f"  beta {row['beta']:<4} T {row['temperature']:<4} loss {row['loss']:.2e}  grad {row['grad']:.2e}")
    print(f"  max rel diff {eq['max_rel_diff']:.2e}; with num_items_in_batch {eq['num_items_in_batch']['loss']:.2e}")
    print(
        f"  no labels: TRL / ours = {eq['no_labels']['trl_over_ours']:.4f} (TRL divides by B, ours by B x L; "
        f"L = {eq['no_labels']['expected']})"
    )
    chunked = eq["distillation_trainer_chunked"]
    if "max_rel_diff" in chunked:
        print(
            "TRL DistillationTrainer's _chunked_divergence_loss vs ours / T^2: "
            f"max rel diff {chunked['max_rel_diff']:.2e}"
        )
    if not args.equality_only:
        m, f = record["models"], record["first_step"]
        print(
            f"\ntrainers: teacher {m['teacher_layers']} layers, student {m['student_layers']}, "
            f"vocabulary {m['vocab']}, "
            f"{args.batch} x {args.seq_len} tokens, beta {args.beta}, {record['device']} ({record['memory_method']})"
        )
        print(
            f"first step: loss TRL {f['loss_trl_gkd']:.6g}, ours {f['loss_hf_distill']:.6g} "
            f"(rel diff {f['loss_rel_diff']:.2e}); gradients: max rel diff {f['grad_max_rel_diff']:.2e} "
            f"({f['grad_worst_parameter']}), median {f['grad_median_rel_diff']:.2e}"
        )
        print(f"{'trainer':<12}{'median s':>10}{'peak MiB':>10}{'(fwd+bwd)':>11}   all seconds")
        for name, row in record["trainers"].items():
            print(
                f"{name:<12}{row['seconds']:>10.4f}{row['peak_memory_mib']:>10.1f}{row['peak_loss_backward_mib']:>11.1f}"
                f"   {row['seconds_all']}"
            )
        r = record["ratios"]
        print(
            f"ours / TRL: time {r['hf_distill_over_trl_time']:.3f}x, "
            f"peak memory {r['hf_distill_over_trl_memory']:.3f}x"
            f" (forward + backward {r['hf_distill_over_trl_loss_backward_memory']:.3f}x)"
        )
    if args.write:
        record["markdown"] = markdown_table(record)  # BENCHMARKS.md's <!-- results --> block is checked against it
        write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
        print(f"-> {args.out}")
    return record


if __name__ == "__main__":
    main()
