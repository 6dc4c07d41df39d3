#!/usr/bin/env python
"""Speed and memory of one training step: the student alone against six ways of distilling into it.

    PYTHONPATH=. python scripts/bench_speed.py --steps 4 --rounds 7

Configurations, all on the same batches (SST-2 rows, batch 32, max length 64; MiniLM-L6 teacher, 3-layer student):

    (a) the student fine-tuned alone (task loss, no teacher)
    (b) distillation on logits
    (c) (b) + hidden states of the matched layers
    (d) (c) + attention maps captured for the matched layers only (SDPA everywhere else)
    (e) (d) with the teacher's outputs read from the teacher cache (the cache is built first; its one-off build
        time is reported apart)
    (f) (d) with both models running eager attention throughout and returning every layer's maps and states
        (`output_attentions=True, output_hidden_states=True`), the usual way to get attention maps (TextBrewer's and
        TinyBERT's code do it so)
    (g) (d) with the teacher in bfloat16 (`teacher_dtype="bfloat16"`)
    (t) (f)'s work done by TextBrewer's `GeneralDistiller` (`train_on_batch`, backward, optimizer step), when the
        `textbrewer` package is installed (`pip install --no-deps textbrewer`); skipped otherwise

Speed: each timed step is what the Trainer's loop does for one batch: fetch the rows from the prepared dataset (the
cache columns included), collate, move to device, forward + backward (`training_step`), optimizer step, zero grads.
The configurations run in rounds (abcdefgt abcdefgt ...), `--steps` batches each per round, after one untimed warm-up
step each; the medians over rounds are reported, so background load hits every configuration alike.

Memory: each configuration runs again in a subprocess of its own for `--memory-steps` steps. "peak +MiB" is the
highest resident set size (psutil, sampled every 2 ms by a thread) during those steps minus the resident set size
just before them, i.e. the steps' own working memory: activations, gradients, optimizer state, teacher outputs (and,
for (e), the pages of the memory-mapped cache that were read). "peak MiB" is that highest resident set size itself,
models and data included. (`getrusage`'s ru_maxrss is no use here: a child started by `subprocess` reports the
parent's high-water mark from before its exec.)

Targets (issue 8, item 6), from ratios measured side by side in this one run: (e) at >= 0.97x the speed of (a), and
(d) >= 1.2x faster than (f). Everything printed is also written to `--output` (JSON; temp file, then rename): the
command, commit, date, threads, load averages, versions, each configuration's figures, the ratios and the verdicts.
On a shared machine (1-minute load average above 1) run with `--threads 1`: with several threads each step waits for
whichever thread another process pre-empted, which measures the neighbours, not the code. Under heavy load even one
thread's wall-clock time stretches by however long the scheduler leaves it waiting; `--clock cpu` counts the process's
CPU time instead (`time.process_time`), which that waiting does not add to. Both clocks are recorded either way.
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

import hf_distill.trainer
from hf_distill import (
    DataArguments,
    DistillationConfig,
    DistillationTrainer,
    Features,
    load_task_dataset,
    make_student,
    tokenize_dataset,
)
from hf_distill.files import write_text_atomic
from hf_distill.recipes import display_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the shared data and tools sit next to the checkout (../shared/README.md)
OUTPUTS = REPO / "outputs" / "bench_speed"
DISTILL = dict(task_weight=0.5, logits_weight=0.5)
HIDDEN = dict(DISTILL, hidden_weight=1.0)
ATTENTION = dict(HIDDEN, attention_weight=1.0)

# (key, label, DistillationConfig overrides, how the step runs: our capture, eager everywhere, or TextBrewer)
CAPTURED, EAGER, TEXTBREWER = "captured", "eager", "textbrewer"
CONFIGS = [
    ("a", "student alone", dict(task_weight=1.0, logits_weight=0.0), CAPTURED),
    ("b", "KD: logits", DISTILL, CAPTURED),
    ("c", "KD: logits + hidden", HIDDEN, CAPTURED),
    ("d", "KD: logits + hidden + attention (captured)", ATTENTION, CAPTURED),
    (
        "e",
        "(d) from the teacher cache",
        dict(ATTENTION, use_teacher_cache=True, teacher_cache_attentions=True),
        CAPTURED,
    ),
    ("f", "(d) with eager attention everywhere", ATTENTION, EAGER),
    ("g", "(d) with the teacher in bfloat16", dict(ATTENTION, teacher_dtype="bfloat16"), CAPTURED),
    ("t", "(f) done by TextBrewer 0.2.1", ATTENTION, TEXTBREWER),
]
# (name, ratio of the per-step medians, op, limit, what the ratio is); "x faster" = the other's step time / ours.
TARGETS = [
    ("(e) speed >= 0.97x (a)", lambda t: t["a"] / t["e"], ">=", 0.97, "speed of (e) / speed of (a)"),
    ("(d) >= 1.2x faster than (f)", lambda t: t["f"] / t["d"], ">=", 1.2, "step time (f) / step time (d)"),
]
# Reported, no target.
RATIOS = [
    ("d_over_b", lambda t: t["d"] / t["b"], "step time (d) / step time (b): what attention capture costs"),
    ("f_over_g", lambda t: t["f"] / t["g"], "step time (f) / step time (g): (g) faster than (f) by"),
    ("g_over_d", lambda t: t["g"] / t["d"], "step time (g) / step time (d): bfloat16 teacher against float32"),
    ("t_over_d", lambda t: t["t"] / t["d"], "step time (t) / step time (d): (d) faster than TextBrewer by"),
    ("t_over_f", lambda t: t["t"] / t["f"], "step time (t) / step time (f): TextBrewer against (f)"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed batches per configuration per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds over all configurations (medians reported)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess (0: skip memory)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--configs", default="abcdefgt", help="which configurations to run, e.g. 'abde'")
    parser.add_argument("--shared-dir", default=str(SHARED), help="the shared folder (data/sst2, tools/)")
    parser.add_argument("--cache-dir", default=str(OUTPUTS / "teacher_cache"))
    parser.add_argument("--rebuild-cache", action="store_true", help="delete the teacher cache first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what the step times and targets count: wall-clock time, or the process's CPU time, which a "
        "neighbour's load does not stretch (use it with --threads 1 on a shared machine); both are recorded",
    )
    parser.add_argument("--profile", default=None, help="profile this configuration's steps with torch.profiler")
    parser.add_argument(
        "--output",
        default=str(REPO / "benchmarks" / "results" / "bench_speed.json"),
        help="where to write the results as JSON ('' for nowhere)",
    )
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one memory subprocess
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- setup
def sst2_train_file(args) -> str:
    return str(Path(args.shared_dir) / "data" / "sst2" / "train.tsv")


def minilm_dir(args) -> str:
    tool = Path(args.shared_dir) / "tools" / "offline_models.py"
    out = subprocess.run([sys.executable, str(tool), "minilm"], capture_output=True, text=True, check=True)
    return out.stdout.strip().split()[-1]


def load_data(tokenizer, train_file: str, rows: int, max_length: int):
    data_args = DataArguments(train_file=train_file, max_train_samples=rows, max_length=max_length)
    raw = load_task_dataset(data_args, seed=0)
    return tokenize_dataset(raw, tokenizer, data_args)["train"]


def eager_forward_with_features(model, inputs, *, hidden_layers=(), attention_layers=(), embeddings=False):
    """(f): every layer's states and maps from a plain eager forward, in the shape `forward_with_features` returns."""
    outputs = model(**inputs, output_hidden_states=True, output_attentions=bool(list(attention_layers)))
    return Features(
        outputs=outputs,
        hidden_states={i: outputs.hidden_states[i + 1] for i in hidden_layers},
        embeddings=outputs.hidden_states[0] if embeddings else None,
        attentions={i: outputs.attentions[i] for i in attention_layers},
    )


@contextlib.contextmanager
def eager_features(enabled: bool):
    # The trainer calls `forward_with_features` by its module-level name; (f) swaps it for the eager outputs.
    original = hf_distill.trainer.forward_with_features
    if enabled:
        hf_distill.trainer.forward_with_features = eager_forward_with_features
    try:
        yield
    finally:
        hf_distill.trainer.forward_with_features = original


def make_config(key, overrides, args) -> DistillationConfig:
    return DistillationConfig(
        output_dir=str(OUTPUTS / key),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=5e-5,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        teacher_cache_dir=args.cache_dir,
        **overrides,
    )


def make_trainer(key, overrides, kind, teacher, student, tokenizer, train, args):
    if kind == EAGER:
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")
    if "teacher_dtype" in overrides:
        teacher = copy.deepcopy(teacher)  # the trainer casts the teacher it is given in place
    config = make_config(key, overrides, args)
    start = time.perf_counter()
    trainer = DistillationTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.setup_seconds = time.perf_counter() - start
    trainer.create_optimizer()
    trainer.eager = kind == EAGER
    trainer.prepared = trainer._remove_unused_columns(trainer.train_dataset)  # as get_train_dataloader does
    return trainer


def make_runners(configs, teacher, student, tokenizer, train, args) -> dict:
    """One trainer per configuration ((t): a `TextBrewerRunner`), in order."""
    # (t) uses the optimizer the Trainer makes (same class and arguments), read from a config made before any trainer:
    # creating a TrainingArguments resets accelerate's shared state, which the trainers built before it rely on.
    optimizer = Trainer.get_optimizer_cls_and_kwargs(make_config("t", ATTENTION, args))
    runners = {}
    for key, _, overrides, kind in configs:
        if kind == TEXTBREWER:
            from bench_speed_textbrewer import TextBrewerRunner, import_textbrewer  # next to this script

            textbrewer = import_textbrewer()
            runners[key] = TextBrewerRunner(textbrewer, teacher, student, tokenizer, train, optimizer, OUTPUTS / key)
        else:
            runners[key] = make_trainer(key, overrides, kind, teacher, student, tokenizer, train, args)
    return runners


def train_step(trainer, indices: list[int]) -> None:
    """One batch as the Trainer's loop runs it: fetch rows, collate, forward/backward, optimizer step."""
    if not isinstance(trainer, DistillationTrainer):  # (t)
        trainer.step(indices)
        return
    rows = trainer.prepared.__getitems__(indices)
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    with eager_features(trainer.eager):
        trainer.training_step(trainer.model, batch, num_items_in_batch=counts)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


class RssSampler:
    """Highest resident set size seen by a thread polling every 2 ms, minus the size when it started."""

    def __init__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return (self.peak - self.start) / 2**20


# ---------------------------------------------------------------------------------------------------- main
def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def uncommitted_paths() -> list[str]:
    """Files of the package and scripts that differ from the commit (the checkout is shared: maybe not ours)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "hf_distill", "scripts"], cwd=REPO, capture_output=True, text=True
    ).stdout
    return sorted(line[3:] for line in status.splitlines())


def write_json(path: Path, payload: dict) -> None:
    """Write `payload` as JSON to `path` whole or not at all (temp file, then rename). The JSON is made first, so a
    payload that cannot be serialised leaves the old file untouched."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def verdicts(step: dict[str, float], rounds: dict[str, list[float]] | None = None) -> tuple[list[dict], dict]:
    """The targets and the reported ratios that this run's configurations allow.

    Each ratio is taken of the per-configuration medians `step` (the verdict), and, given the per-round times
    `rounds`, also round by round: the configurations of one round ran back to back, so the median and range of those
    paired ratios show how much of a verdict the machine's load could have made.
    """

    def paired(value) -> dict:
        if rounds is None:
            return {}
        count = len(next(iter(rounds.values())))
        per_round = [value({key: times[i] for key, times in rounds.items()}) for i in range(count)]
        return {"per_round_median": statistics.median(per_round), "per_round_range": [min(per_round), max(per_round)]}

    targets, ratios = [], {}
    for name, value, op, limit, what in TARGETS:
        try:
            v = value(step)
        except KeyError:
            continue
        met = v >= limit if op == ">=" else v <= limit
        targets.append(
            {"target": name, "ratio": what, "value": v, "limit": f"{op} {limit}", "met": met, **paired(value)}
        )
    for name, value, what in RATIOS:
        try:
            ratios[name] = {"value": value(step), "what": what, **paired(value)}
        except KeyError:
            continue
    return targets, ratios


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
    configs = [c for c in CONFIGS if c[0] in (args.memory_of or args.configs)]
    if any(kind == TEXTBREWER for *_, kind in configs) and importlib.util.find_spec("textbrewer") is None:
        print("(t) skipped: textbrewer is not installed (pip install --no-deps textbrewer)")
        configs = [c for c in configs if c[3] != TEXTBREWER]
    batches = [
        list(range(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(max(args.steps, args.memory_steps))
    ]

    # ------------------------------------------------------------------ models and data
    path = minilm_dir(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # untrained head: fine for speed
    student = make_student(teacher, num_layers=3, verbose=False)
    train = load_data(tokenizer, sst2_train_file(args), len(batches) * args.batch_size, args.max_length)

    if args.memory_of:  # ---------------------------------------- one memory subprocess
        trainer = next(iter(make_runners(configs[:1], teacher, student, tokenizer, train, args).values()))
        sampler = RssSampler()
        for indices in batches[: args.memory_steps]:
            train_step(trainer, indices)
        delta = sampler.stop()
        print(json.dumps({"peak_delta_mib": delta, "peak_mib": sampler.peak / 2**20}))
        return

    if args.rebuild_cache and os.path.isdir(args.cache_dir):
        import shutil

        shutil.rmtree(args.cache_dir)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start"
    )
    if load_start[0] > 1 and torch.get_num_threads() > 1:
        print("the 1-minute load average is above 1: the step times will measure the neighbours; use --threads 1")
    lengths = [max(len(train[i]["input_ids"]) for i in b) for b in batches[: args.steps]]
    sizes = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (teacher, student)]
    print(
        f"teacher MiniLM-L6 ({sizes[0]:.1f}M), student 3 layers ({sizes[1]:.1f}M); {args.steps} batches of "
        f"{args.batch_size} SST-2 rows, padded lengths {lengths}; {args.rounds} rounds"
    )

    # ------------------------------------------------------------------ trainers (the cache is built here, once)
    trainers, cache_info = make_runners(configs, teacher, student, tokenizer, train, args), None
    for key, trainer in trainers.items():
        cache = trainer.teacher_cache
        if cache is not None:
            how = "built now" if cache.built else "found on disk, built earlier"
            size = sum(os.path.getsize(os.path.join(cache.path, f)) for f in os.listdir(cache.path)) / 2**20
            cache_info = {
                "config": key,
                "how": how,
                "build_seconds": cache.build_seconds,
                "rows": len(train),
                "mib": size,
                "columns": sorted(cache.layouts),
            }
            print(
                f"teacher cache for ({key}): {how} in {cache.build_seconds:.1f}s for {len(train)} rows, "
                f"{size:.1f} MiB, columns {sorted(cache.layouts)}"
            )

    # ------------------------------------------------------------------ timing: rounds of abcdefgt
    for trainer in trainers.values():  # warm-up: first-step allocations, optimizer state
        train_step(trainer, batches[0])
    clocks = {"wall": {key: [] for key in trainers}, "cpu": {key: [] for key in trainers}}
    for _ in range(args.rounds):
        for key, trainer in trainers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for indices in batches[: args.steps]:
                train_step(trainer, indices)
            clocks["cpu"][key].append((time.process_time() - cpu) / args.steps)
            clocks["wall"][key].append((time.perf_counter() - wall) / args.steps)
    medians = {clock: {key: statistics.median(v) for key, v in per.items()} for clock, per in clocks.items()}
    other = "wall" if args.clock == "cpu" else "cpu"
    times, step = clocks[args.clock], medians[args.clock]

    # ------------------------------------------------------------------ memory: one subprocess per configuration
    memory = {}
    if args.memory_steps:
        for key in trainers:
            cmd = [sys.executable, __file__, "--memory-of", key]
            for flag in ("memory_steps", "steps", "batch_size", "max_length", "shared_dir", "cache_dir", "threads"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[key] = json.loads(out.stdout.strip().splitlines()[-1])

    # ------------------------------------------------------------------ report
    print()
    print(f"step times by the {args.clock} clock ({other} clock in the last column but memory's)")
    print(
        f"{'config':<47} {'samples/s':>9} {'x (a)':>6} {'step ms':>8} {'min-max ms':>12} {'peak +MiB':>9} "
        f"{'x (a)':>6} {'peak MiB':>9} {other + ' ms':>8}"
    )
    results = {}
    for key, label, _, _ in configs:
        sps = args.batch_size / step[key]
        spread = f"{min(times[key]) * 1e3:.0f}-{max(times[key]) * 1e3:.0f}"
        line = f"({key}) {label:<43} {sps:>9.1f} {step['a'] / step[key] if 'a' in step else float('nan'):>6.2f}"
        line += f" {step[key] * 1e3:>8.0f} {spread:>12}"
        results[key] = {
            "label": label,
            "samples_per_s": sps,
            "step_ms": step[key] * 1e3,
            "wall_ms": medians["wall"][key] * 1e3,
            "cpu_ms": medians["cpu"][key] * 1e3,
            "wall_ms_per_round": [t * 1e3 for t in clocks["wall"][key]],
            "cpu_ms_per_round": [t * 1e3 for t in clocks["cpu"][key]],
        }
        if key in memory:
            ratio = memory[key]["peak_delta_mib"] / memory["a"]["peak_delta_mib"] if "a" in memory else float("nan")
            line += f" {memory[key]['peak_delta_mib']:>9.0f} {ratio:>6.2f} {memory[key]['peak_mib']:>9.0f}"
            results[key].update(memory[key])
        else:
            line += " " * 27
        print(line + f" {medians[other][key] * 1e3:>8.0f}")
    print()
    targets, ratios = verdicts(step, times)
    other_targets, _ = verdicts(medians[other], clocks[other])
    for t, o in zip(targets, other_targets):
        verdict = "MET" if t["met"] else "MISSED"
        print(
            f"target {t['target']:<30} {t['ratio']} = {t['value']:.2f}  {verdict}  ({other} clock: {o['value']:.2f}); "
            f"round by round median {t['per_round_median']:.2f}, range {t['per_round_range'][0]:.2f}-"
            f"{t['per_round_range'][1]:.2f}"
        )
    for r in ratios.values():
        low, high = r["per_round_range"]
        print(
            f"ratio  {r['what']} = {r['value']:.2f}; round by round median {r['per_round_median']:.2f}, "
            f"range {low:.2f}-{high:.2f}"
        )
    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end")

    # ------------------------------------------------------------------ save
    if args.output:
        threads = torch.get_num_threads()
        write_json(
            Path(args.output),
            {
                "command": " ".join(["python", *[display_path(a, REPO) or a for a in sys.argv]]),
                "commit": git_commit(),
                "uncommitted_changes": uncommitted_paths(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "threads": threads,
                "threads_note": (
                    "one thread: the 1-minute load average was above 1 at the start (a shared machine)"
                    if threads == 1 and load_start[0] > 1
                    else "torch's default"
                    if not args.threads
                    else "set by --threads"
                ),
                "load_average_start": list(load_start),
                "load_average_end": list(load_end),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "textbrewer": getattr(sys.modules.get("textbrewer"), "__version__", None),
                "batches": {"count": args.steps, "batch_size": args.batch_size, "padded_lengths": lengths},
                "rounds": args.rounds,
                "clock": args.clock,
                "teacher_cache": cache_info,
                "configs": results,
                "targets": targets,
                f"targets_by_{other}_clock": other_targets,
                "ratios": ratios,
            },
        )
        print(f"wrote {display_path(str(Path(args.output).resolve()), REPO)}")

    # ------------------------------------------------------------------ profile (optional)
    if args.profile:
        trainer = trainers[args.profile]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for indices in batches[: args.steps]:
                train_step(trainer, indices)
        print(f"\nprofile of ({args.profile}), {args.steps} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
