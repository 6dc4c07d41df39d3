#!/usr/bin/env python
"""Peak memory and time of a token-level LM distillation loss + backward, three ways, side by side.

    python benchmarks/lm_loss_memory.py [--batch 8] [--seq_len 1024] [--vocab 49152] [--hidden 576]
        [--teacher_hidden 576] [--divergence forward_kl] [--chunk_size 1024]
        [--out benchmarks/results/lm_loss_memory.json]

The defaults are SmolLM2-135M's LM head (hidden 576, vocabulary 49,152) over 8 x 1024 tokens. Variants:

    plain    F.linear logits of both models (the teacher's under no_grad), then the hf_distill.losses.lm loss
    chunked  the same materialised logits, then chunked_logit_loss (fp32 softmax intermediates one chunk at a time)
    fused    fused_linear_distill_loss on hidden states and LM-head weights (no full logits at all)

Each variant runs in a fresh subprocess on the same seeded inputs: a warm-up on 8 positions, then once for its peak
memory (and a first time), then --repeats more times for the median time. Peak memory is what the loss + backward
adds on top of the inputs: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set
(VmHWM, reset to the current RSS through /proc/self/clear_refs just before the step; ru_maxrss where that is
unavailable) minus the RSS at that moment. It includes the gradients of the student's hidden states and LM-head
weight, which every variant allocates alike. The record also gives the max relative difference (max |a - b| / max |b|
over each tensor) of the loss and of the gradients w.r.t. the student hidden states and LM-head weight, chunked and
fused against plain, the ratios against plain, and the targets of the issue (fused memory <= 0.2x plain, time <= 1.3x,
differences <= 1e-5). The JSON record is written atomically to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain", "chunked", "fused")
TARGETS = {"fused_over_plain_memory_max": 0.2, "fused_over_plain_time_max": 1.3, "max_rel_diff": 1e-5}
# Flags forwarded to every variant's subprocess (everything that defines the computation).
CONFIG_FLAGS = (
    "batch", "seq_len", "vocab", "hidden", "teacher_hidden", "divergence", "temperature", "chunk_size",
    "masked_fraction", "dtype", "device", "repeats", "seed",
)  # fmt: skip


def import_losses_without_the_package_init():
    """hf_distill.losses without running hf_distill/__init__.py, which imports transformers and datasets: ~10 s and
    a few hundred MB per subprocess that have nothing to do with the loss being measured."""
    if "hf_distill" not in sys.modules:
        package = types.ModuleType("hf_distill")
        package.__path__ = [os.path.join(REPO, "hf_distill")]
        sys.modules["hf_distill"] = package
    from hf_distill.files import write_text_atomic
    from hf_distill.losses.chunked import chunked_logit_loss, fused_linear_distill_loss
    from hf_distill.losses.lm import LM_LOGIT_LOSSES

    return LM_LOGIT_LOSSES, chunked_logit_loss, fused_linear_distill_loss, write_text_atomic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49,152)")
    parser.add_argument("--hidden", type=int, default=576, help="student hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--teacher_hidden", type=int, default=None, help="teacher hidden size (default: --hidden)")
    parser.add_argument("--divergence", default="forward_kl", help="a key of LM_LOGIT_LOSSES")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk_size", type=int, default=1024, help="positions per chunk (chunked and fused)")
    parser.add_argument("--masked_fraction", type=float, default=0.0, help="share of positions left out by the mask")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="warm timed runs per variant after the measured one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "lm_loss_memory.json"))
    parser.add_argument("--_variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.teacher_hidden is None:
        args.teacher_hidden = args.hidden
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --------------------------------------------------------------------------------------------------------------------
# One variant, in its own process
# --------------------------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory added between ``start()`` and ``stop()``, in bytes, and how it was measured."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method, self.base = "torch.cuda.max_memory_allocated", torch.cuda.memory_allocated()
            return
        try:  # Linux: "5" resets the peak resident set (VmHWM) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method, self.base = "VmHWM after clear_refs, minus VmRSS", _status_bytes("VmRSS")
        except OSError:
            self.method, self.base = "ru_maxrss delta", self._maxrss()
        if self.base is None:
            self.method, self.base = "ru_maxrss delta", self._maxrss()

    def stop(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        peak = _status_bytes("VmHWM") if self.method.startswith("VmHWM") else self._maxrss()
        return max(peak - self.base, 0)

    @staticmethod
    def _maxrss() -> int:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def make_inputs(args, torch):
    """Seeded hidden states and LM heads (logits of std ~2) for both models, and the labels-style mask."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq_len)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    inputs = {
        "student_hidden": randn(*shape, args.hidden).requires_grad_(True),
        "student_weight": randn(args.vocab, args.hidden, scale=2 / args.hidden**0.5).requires_grad_(True),
        "teacher_hidden": randn(*shape, args.teacher_hidden),
        "teacher_weight": randn(args.vocab, args.teacher_hidden, scale=2 / args.teacher_hidden**0.5),
    }
    mask = torch.rand(shape, generator=g) >= args.masked_fraction
    inputs["mask"] = mask.to(device) if args.masked_fraction > 0 else None
    return inputs


def loss_step(variant, args, inputs, losses):
    """The loss and its backward, the way each variant would run in a training step."""
    import torch
    import torch.nn.functional as F

    table, chunked_logit_loss, fused_linear_distill_loss = losses
    kw = {"temperature": args.temperature}
    if variant == "fused":
        loss = fused_linear_distill_loss(
            inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
            inputs["mask"], divergence=args.divergence, chunk_size=args.chunk_size, **kw,
        )  # fmt: skip
    else:
        student_logits = F.linear(inputs["student_hidden"], inputs["student_weight"])
        with torch.no_grad():
            teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
        fn = table[args.divergence]
        if variant == "plain":
            loss = fn(student_logits, teacher_logits, inputs["mask"], **kw)
        else:
            loss = chunked_logit_loss(
                fn, student_logits, teacher_logits, inputs["mask"], chunk_size=args.chunk_size, **kw
            )
        del student_logits, teacher_logits
    loss.backward()
    return loss.detach()


def run_variant(args) -> None:
    import torch

    table, chunked_logit_loss, fused_linear_distill_loss, _ = import_losses_without_the_package_init()
    losses = (table, chunked_logit_loss, fused_linear_distill_loss)
    device = torch.device(args.device)
    inputs = make_inputs(args, torch)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # A warm-up on a few positions first, so one-off costs (autograd engine, thread pools, kernels' workspaces) fall
    # outside the measurement; its gradients are dropped so the measured step allocates them like a training step.
    positions = ("student_hidden", "teacher_hidden", "mask")
    warm = {k: v[:1, :8] if k in positions and v is not None else v for k, v in inputs.items()}
    loss_step(args._variant, args, warm, losses)
    for name in ("student_hidden", "student_weight"):
        inputs[name].grad = None
    del warm
    synchronize()

    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    loss = loss_step(args._variant, args, inputs, losses)
    synchronize()
    first_seconds = time.perf_counter() - start
    peak_bytes = memory.stop()
    grads = {name: inputs[name].grad.detach().cpu().clone() for name in ("student_hidden", "student_weight")}
    seconds = []
    for _ in range(args.repeats):
        for name in ("student_hidden", "student_weight"):
            inputs[name].grad = None
        synchronize()
        start = time.perf_counter()
        loss_step(args._variant, args, inputs, losses)
        synchronize()
        seconds.append(time.perf_counter() - start)
    result = {
        "loss": loss.cpu(),
        "grads": grads,
        "peak_memory_bytes": int(peak_bytes),
        "memory_method": memory.method,
        "first_seconds": first_seconds,
        "seconds": seconds,
    }
    torch.save(result, args._result)


# --------------------------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------------------------


def rel_diff(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def git_provenance() -> dict:
    """The commit the measured code is at, and whether the tree had uncommitted changes."""

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": None if status is None else bool(status)}


def markdown_table(record: dict) -> str:
    """The record as BENCHMARKS.md's table: per variant, peak memory and median time of loss + backward, their
    ratios to plain, and the largest relative difference from plain of the loss and the gradients."""
    variants, ratios, diffs = record["variants"], record["ratios"], record["max_rel_diff"]
    lines = [
        "| variant | peak memory, loss + backward (MiB) | × plain | median time (s) | × plain | "
        "max rel. diff vs plain: loss / grad hidden / grad weight |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in variants.items():
        memory = "1.000" if name == "plain" else f"{ratios[f'{name}_over_plain_memory']:.3f}"
        seconds = "1.000" if name == "plain" else f"{ratios[f'{name}_over_plain_time']:.3f}"
        d = diffs.get(name)
        exact = "-" if d is None else " / ".join(f"{v:.1e}" for v in d.values())
        lines.append(
            f"| {name} | {row['peak_memory_mib']:,.1f} | {memory}× | {row['seconds']:.3f} | {seconds}× | {exact} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._variant is not None:
        run_variant(args)
        return {}
    import torch

    table, _, _, write_text_atomic = import_losses_without_the_package_init()
    if args.divergence not in table:
        raise SystemExit(f"--divergence must be one of {sorted(table)}, got {args.divergence!r}.")
    started = git_provenance()  # the code as it was when the measurement started
    forwarded = [item for key in CONFIG_FLAGS for item in (f"--{key}", str(getattr(args, key)))]
    results = {}
    with tempfile.TemporaryDirectory(prefix="lm_loss_memory.") as tmp:
        for variant in VARIANTS:
            path = os.path.join(tmp, f"{variant}.pt")
            command = [sys.executable, os.path.abspath(__file__), *forwarded, "--_variant", variant, "--_result", path]
            print(f"[lm_loss_memory] {variant} ...", flush=True)
            subprocess.run(command, check=True)
            results[variant] = torch.load(path)

    plain = results["plain"]
    variants, differences = {}, {}
    for variant, result in results.items():
        median = statistics.median(result["seconds"]) if result["seconds"] else result["first_seconds"]
        variants[variant] = {
            "peak_memory_bytes": result["peak_memory_bytes"],
            "peak_memory_mib": round(result["peak_memory_bytes"] / 2**20, 1),
            "seconds": round(median, 4),
            "first_seconds": round(result["first_seconds"], 4),
            "seconds_all": [round(s, 4) for s in result["seconds"]],
            "loss": float(result["loss"]),
        }
        if variant != "plain":
            differences[variant] = {
                "loss": rel_diff(result["loss"], plain["loss"]),
                **{f"grad_{n}": rel_diff(g, plain["grads"][n]) for n, g in result["grads"].items()},
            }
    ratios = {}
    for variant in ("chunked", "fused"):
        ratios[f"{variant}_over_plain_memory"] = variants[variant]["peak_memory_bytes"] / max(
            variants["plain"]["peak_memory_bytes"], 1
        )
        ratios[f"{variant}_over_plain_time"] = variants[variant]["seconds"] / max(variants["plain"]["seconds"], 1e-9)
    max_diff = max(max(d.values()) for d in differences.values())
    record = {
        "benchmark": "lm_loss_memory",
        "config": {key: getattr(args, key) for key in CONFIG_FLAGS},
        "tokens": args.batch * args.seq_len,
        "memory_method": results["plain"]["memory_method"],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "variants": variants,
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "max_rel_diff": differences,
        "targets": TARGETS,
        "meets_targets": {
            "memory": ratios["fused_over_plain_memory"] <= TARGETS["fused_over_plain_memory_max"],
            "time": ratios["fused_over_plain_time"] <= TARGETS["fused_over_plain_time_max"],
            "exactness": max_diff <= TARGETS["max_rel_diff"],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
        **started,
    }
    record["markdown"] = markdown_table(record)  # the table BENCHMARKS.md shows (its <!-- results --> block)
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")

    sizes = (
        f"{args.batch} x {args.seq_len} tokens, vocabulary {args.vocab}, hidden {args.hidden}/{args.teacher_hidden}"
    )
    print(f"\n{sizes}, {args.divergence}, {args.dtype} on {args.device} ({record['memory_method']})")
    print(f"{'variant':<10}{'peak MiB':>12}{'seconds':>10}{'loss':>14}")
    for variant, row in variants.items():
        print(f"{variant:<10}{row['peak_memory_mib']:>12.1f}{row['seconds']:>10.3f}{row['loss']:>14.6g}")
    for variant in ("chunked", "fused"):
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in differences[variant].items())
        print(
            f"{variant}/plain: memory {ratios[f'{variant}_over_plain_memory']:.3f}x, "
            f"time {ratios[f'{variant}_over_plain_time']:.3f}x; max rel diff: {diffs}"
        )
    print(f"targets met: {record['meets_targets']}  ->  {args.out}")
    return record


if __name__ == "__main__":
    main()
