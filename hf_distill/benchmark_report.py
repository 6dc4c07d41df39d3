"""The benchmark's reporting: the results table, paired bootstrap intervals, plots, the results record committed
under `benchmarks/results/`, and the tables of `BENCHMARKS.md`, which are generated from those records.

A table in `BENCHMARKS.md` sits between `<!-- results: benchmarks/results/<name>.json -->` and `<!-- /results -->`
and is exactly `format_table` of that record's rows: `update_results_blocks` rewrites it, `stale_results_blocks`
lists the blocks that differ (a test fails on any), so a figure in the docs is always one the code produced.
Everything here is importable from `hf_distill.benchmark` too.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark_stages import LOG_HISTORY_FILE
from .evaluation import LATENCY_BATCH_SIZES
from .files import write_text_atomic

LOSS_TERMS = ("task", "logits", "hidden", "embeddings", "attention", "relation", "minilm")  # the trainer's TERMS
RESULT_KEYS = (
    "name",
    "recipes",
    "accuracy",
    "accuracy_kept_pct",
    "delta_vs_baseline_pts",
    "params",
    "size_mb",
    "latency_b1_ms",
    "latency_b32_ms",
    "speedup_b1",
    "speedup_b32",
    "train_steps",
    "train_seconds",
    "train_rows_labelled",
    "train_rows_unlabelled",
)
RECORD_FORMAT = 1
# `<!-- results: PATH -->` shows the record's table; `<!-- results: PATH against=ROW -->` every row against ROW.
BLOCK_RE = re.compile(
    r"(<!-- results: (?P<path>[^ ]+?)(?: against=(?P<against>[^ ]+?))? -->\n)(?P<body>.*?)(<!-- /results -->)", re.S
)
BOOTSTRAP_RESAMPLES = 10_000


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of result rows (the keys of `RESULT_KEYS`); missing figures are shown as "-".

    Extra columns appear only when some row has them: with several training seeds, the standard deviation of the dev
    accuracy over the seeds (the accuracy shown is their mean); with paired bootstrap intervals, the 95% interval of
    the points over no-KD; with a transfer set (a row with unlabelled training rows), each row's training rows as
    `labelled + unlabelled`.
    """

    def num(value, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    seeds = any(r.get("seeds") and len(r["seeds"]) > 1 for r in rows)
    interval = any(r.get("delta_ci95") for r in rows)
    transfer = any(r.get("train_rows_unlabelled") for r in rows)
    header = (
        "| model | recipe stages | dev acc (%) |"
        + (" ± std (seeds) |" if seeds else "")
        + " % of teacher | vs no-KD (pts) |"
        + (" 95% CI vs no-KD |" if interval else "")
        + " params (M) | size (MB) | latency b1 (ms) | latency b32 (ms) | speed-up b1 | speed-up b32 | train steps "
        "| train (s) |" + (" train rows (labelled + unlabelled) |" if transfer else "")
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        accuracy = None if r.get("accuracy") is None else 100 * r["accuracy"]
        params = None if r.get("params") is None else r["params"] / 1e6
        cells = [str(r["name"]), " → ".join(r.get("recipes") or []) or "-", num(accuracy, ".2f")]
        if seeds:
            n = len(r.get("seeds") or [])
            cells.append(f"{100 * r['accuracy_std']:.2f} ({n})" if n > 1 else "-")
        cells += [num(r.get("accuracy_kept_pct"), ".1f"), num(r.get("delta_vs_baseline_pts"), "+.2f")]
        if interval:
            ci = r.get("delta_ci95")
            cells.append(f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-")
        cells += [
            num(params, ".1f"),
            num(r.get("size_mb"), ".1f"),
            num(r.get("latency_b1_ms"), ".1f"),
            num(r.get("latency_b32_ms"), ".1f"),
            num(r.get("speedup_b1"), ".2f") + ("×" if r.get("speedup_b1") is not None else ""),
            num(r.get("speedup_b32"), ".2f") + ("×" if r.get("speedup_b32") is not None else ""),
            num(r.get("train_steps"), "d"),
            num(r.get("train_seconds"), ".0f"),
            *([_train_rows_cell(r)] if transfer else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _train_rows_cell(row: dict[str, Any]) -> str:
    labelled, unlabelled = row.get("train_rows_labelled"), row.get("train_rows_unlabelled")
    if labelled is None:
        return "-"
    return f"{labelled:,} + {unlabelled or 0:,}"


def add_relative_metrics(rows: list[dict[str, Any]], baseline: str) -> None:
    """Fill in % of the teacher's accuracy kept, points over the baseline and speed-ups over the teacher, in place."""
    teacher = next(r for r in rows if r["name"] == "teacher")
    base = next((r for r in rows if r["name"] == baseline), None)
    for r in rows:
        r["accuracy_kept_pct"] = 100 * r["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None
        r["delta_vs_baseline_pts"] = None if base is None or r is teacher else 100 * (r["accuracy"] - base["accuracy"])
        for b in LATENCY_BATCH_SIZES:
            r[f"speedup_b{b}"] = teacher[f"latency_b{b}_ms"] / r[f"latency_b{b}_ms"]


def paired_bootstrap(
    correct: np.ndarray, baseline_correct: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% paired bootstrap interval of `100 * (accuracy - baseline accuracy)`, in points, over the eval rows.

    Args:
        correct: `(N,)` or `(seeds, N)` booleans, whether a model got eval row i right (one line per training seed).
        baseline_correct: the same for the baseline, `(N,)` or `(seeds', N)`, on the same rows in the same order.
        resamples: bootstrap resamples; seed: their seed (the interval is reproducible).

    Each resample draws N row indices with replacement and takes, on those rows, the mean accuracy over the model's
    seeds minus the mean over the baseline's: the rows are paired (both models are scored on the same drawn rows), so
    what the interval measures is how much the difference could move with another sample of sentences of the same
    kind. The 2.5th and 97.5th percentiles are returned.
    """
    a = np.atleast_2d(np.asarray(correct, dtype=np.float64)).mean(0)
    b = np.atleast_2d(np.asarray(baseline_correct, dtype=np.float64)).mean(0)
    if a.shape != b.shape:
        raise ValueError(f"the two models were scored on different rows: {a.shape[0]} vs {b.shape[0]}.")
    diff = a - b
    low, high = bootstrap_percentiles(lambda drawn: diff[drawn].mean(1), len(diff), resamples=resamples, seed=seed)
    return 100 * low, 100 * high


def bootstrap_percentiles(
    statistic: Callable[[np.ndarray], np.ndarray], n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of a bootstrap statistic: `resamples` draws of `n` indices with replacement
    (seeded, so reproducible), `statistic` mapping a `(draws, n)` index matrix to one value per draw."""
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks bound the (chunk, n) index matrix's memory
        stop = min(start + 1000, resamples)
        values[start:stop] = statistic(rng.integers(0, n, size=(stop - start, n)))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def git_state(root: str | os.PathLike) -> dict[str, Any]:
    """The commit a run was made from, and whether tracked files differed from it (`dirty`)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def results_record(
    results: dict[str, Any],
    *,
    command: str,
    root: str | os.PathLike,
    invocation_seconds: float | None = None,
    started: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run writes into the repository (`benchmarks/results/<name>.json`): the command, the commit, the machine,
    the budget, the configuration and every row's figures, without a path of the machine it ran on.

    `started`: `git_state` when the run began (a run of hours can outlive several commits); the record's `commit` and
    `dirty` are those, and `commit_at_end` / `dirty_at_end` are added when the repository changed during the run."""
    import torch
    import transformers

    root = Path(root).resolve()
    rows = []
    for row in results["rows"]:
        kept = {k: v for k, v in row.items() if k not in ("stages", "path")}
        if row.get("stages"):
            kept["stages"] = [{k: v for k, v in s.items() if k != "path"} for s in row["stages"]]
        rows.append(kept)
    config = {k: v for k, v in results["config"].items() if k != "output_dir"}
    ended = git_state(root)
    state = dict(started or ended)
    if started is not None and ended != started:
        state.update(commit_at_end=ended["commit"], dirty_at_end=ended["dirty"])
    return {
        "format": RECORD_FORMAT,
        "benchmark": results["benchmark"],
        "command": command,
        **state,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "invocation_seconds": None if invocation_seconds is None else round(invocation_seconds, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": results.get("torch_threads"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
        },
        "budget": portable_paths(results["budget"], root),
        "config": portable_paths(config, root),
        "rows": portable_paths(rows, root),
        **({"deploy": results["deploy"]} if results.get("deploy") else {}),
        "stage_seconds": {os.path.relpath(s["path"], results["output_dir"]): s["seconds"] for s in results["stages"]},
    }


def portable_paths(value: Any, root: Path) -> Any:
    """`value` with every absolute path string made relative to `root` (the repository; `../shared/...` for its
    sibling folders), or reduced to `<elsewhere>/<name>` when it lies outside both: a record must not carry the
    folders of the machine it was made on."""
    if isinstance(value, dict):
        return {k: portable_paths(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)):
        path = Path(os.path.expanduser(value)).resolve()
        for base in (root, root.parent):
            if path.is_relative_to(base):
                return os.path.relpath(path, root)
        return f"<elsewhere>/{path.name}"
    return value


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def is_teacher_row(row: dict[str, Any]) -> bool:
    """The teacher's row, or an extra teacher's (`extra_teacher_seeds`: marked by `teacher_seed`)."""
    return row["name"] == "teacher" or row.get("teacher_seed") is not None


def correct_by_seed(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """A row's `dev_correct` ("1" / "0" per dev row, per training seed) as boolean arrays, seed -> `(N,)`."""
    return {s: np.frombuffer(b.encode(), dtype=np.uint8) == ord("1") for s, b in row["dev_correct"].items()}


def comparison_table(rows: list[dict[str, Any]], against: str, seed: int = 0) -> str:
    """Markdown table of every student row against the row `against` (e.g. plain KD in a table of methods): points
    of dev accuracy over it and their 95% paired bootstrap interval (`paired_bootstrap`, seeds pooled), from the
    rows' per-dev-row correctness. Teachers are left out."""
    by_name = {r["name"]: r for r in rows}
    if against not in by_name:
        raise ValueError(
            f"against={against!r} is not a row of this record; its rows are {list(by_name)}. Use one of them."
        )

    def correct(row: dict[str, Any]) -> np.ndarray:
        if not row.get("dev_correct"):
            raise ValueError(f"row {row['name']!r} has no dev_correct (per-dev-row correctness) to compare.")
        return np.stack(list(correct_by_seed(row).values()))

    reference = correct(by_name[against])
    lines = [
        f"| model | recipe stages | dev acc (%) | vs {against} (pts) | 95% CI vs {against} | train steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if is_teacher_row(r):
            continue
        mine = correct(r)
        delta = 100 * (mine.mean() - reference.mean())
        low, high = (None, None) if r["name"] == against else paired_bootstrap(mine, reference, seed=seed)
        ci = "-" if low is None else f"[{low:+.2f}, {high:+.2f}]"
        steps = "-" if r.get("train_steps") is None else str(r["train_steps"])
        recipes = " → ".join(r.get("recipes") or []) or "-"
        lines.append(f"| {r['name']} | {recipes} | {100 * r['accuracy']:.2f} | {delta:+.2f} | {ci} | {steps} |")
    return "\n".join(lines) + "\n"


def record_table(record_path: str | os.PathLike, against: str | None = None) -> str:
    """The results table of a committed record, as `BENCHMARKS.md` shows it; with `against`, its rows' comparison
    with that row (`comparison_table`)."""
    record = json.loads(Path(record_path).read_text(encoding="utf-8"))
    if against is not None:
        return comparison_table(record["rows"], against, seed=record.get("config", {}).get("seed", 0))
    if "markdown" in record:  # a benchmark script's record that carries its own table (benchmarks/lm_loss_memory.py)
        return record["markdown"]
    if record.get("kind") == "lm":  # the LM benchmark's record: perplexities (hf_distill.lm_benchmark)
        from .lm_benchmark import format_lm_table

        return format_lm_table(record["rows"], record["config"]["baseline_name"]) + "\n"
    from .benchmark_deploy import deploy_markdown  # the deployment rows, when the run had deploy_rows

    return format_table(record["rows"]) + "\n" + deploy_markdown(record)


def update_results_blocks(markdown: str, root: str | os.PathLike) -> str:
    """`markdown` with every `<!-- results: PATH -->` block's table regenerated from PATH (relative to `root`)."""
    root = Path(root)

    def render(match: re.Match) -> str:
        path = root / match["path"]
        if not path.is_file():
            raise FileNotFoundError(f"BENCHMARKS.md names {match['path']}, which does not exist under {root}.")
        return match.group(1) + record_table(path, match["against"]) + match.group(5)

    return BLOCK_RE.sub(render, markdown)


def stale_results_blocks(markdown: str, root: str | os.PathLike) -> list[str]:
    """The record paths whose block in `markdown` differs from the table the record gives (empty: all up to date)."""
    root = Path(root)
    return [
        m["path"] for m in BLOCK_RE.finditer(markdown) if m["body"] != record_table(root / m["path"], m["against"])
    ]


def budget_text(results: dict[str, Any]) -> str:
    """One paragraph on what every row trained on and for how long, from a results dict or record."""
    budget = results["budget"]
    transfer = budget.get("transfer_set")
    students = [r for r in results["rows"][1:] if r.get("teacher_seed") is None]  # not the extra teachers
    kd = next((r for r in students if r.get("train_rows_unlabelled")), None)
    steps = sorted({r["train_steps"] for r in students if r.get("train_steps") is not None})
    steps_text = (
        f"every student row {steps[0]} optimizer steps"
        if len(steps) == 1
        else f"{'/'.join(map(str, steps))} optimizer steps ({budget['num_train_epochs']} epoch(s) of each row's rows)"
    )
    if transfer and kd is not None:
        source = next(f"{k}={v!r}" for k, v in transfer.items() if v and k != "max_unlabelled_samples")
        labelled_only = [r["name"] for r in students if not r.get("train_rows_unlabelled")]
        text = (
            f"Transfer set ({source}): the distilled rows train on {kd['train_rows_labelled']:,} labelled + "
            f"{kd['train_rows_unlabelled']:,} unlabelled rows (the unlabelled ones add teacher terms only); the "
            f"teacher and {', '.join(labelled_only)} on the {kd['train_rows_labelled']:,} labelled rows alone: "
            f"without a teacher, unlabelled text teaches nothing. Budget: {steps_text}"
        )
    else:
        text = f"Every student row: {budget['train_rows']} training rows; {steps_text}"
    seeds = budget.get("student_seeds") or []
    if len(seeds) > 1:
        text += f"; training seeds {seeds} (mean ± std over seeds)"
    if budget.get("mutual_rows"):  # hf_distill.benchmark_rows
        text += (
            f"; {', '.join(budget['mutual_rows'])}: deep mutual learning of {budget['mutual_num_peers']} copies of "
            "student_init, no teacher, on the labelled rows alone like no-KD (peer 0 shown)"
        )
    if budget.get("extra_teacher_seeds"):
        text += f"; extra teachers fine-tuned like the teacher under seeds {budget['extra_teacher_seeds']}"
    batch, length = budget["per_device_train_batch_size"], budget["max_length"]
    return f"{text}, batch {batch}, max_length {length} ({budget['stage_split']})."


def results_markdown(results: dict[str, Any]) -> str:
    from .benchmark_deploy import deploy_markdown

    return (
        f"# Benchmark `{results['benchmark']}`\n\n"
        f"Teacher: `{results['teacher']}`. {budget_text(results)} Accuracy on {results['rows'][0]['eval_rows']} dev "
        f"rows (points over no-KD with a 95% paired bootstrap interval over them); latency: median of CPU forward "
        f"passes on real dev batches, {results['torch_threads']} threads.\n\n"
        + format_table(results["rows"])
        + "\n"
        + deploy_markdown(results)
    )


# ---------------------------------------------------------------------------------------------------- plots
def loss_curves(results: dict[str, Any]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """term -> run name -> (steps, values), from each stage's log_history; a row's later stages continue its steps."""
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for row in results["rows"]:
        offset = 0
        for stage_dir in [s["path"] for s in row.get("stages", [])]:
            history = json.loads((Path(stage_dir) / LOG_HISTORY_FILE).read_text(encoding="utf-8"))
            for term in LOSS_TERMS:
                points = [(offset + h["step"], h[f"loss_{term}"]) for h in history if f"loss_{term}" in h]
                if points:
                    steps, values = curves.setdefault(term, {}).setdefault(row["name"], ([], []))
                    steps.extend(p[0] for p in points)
                    values.extend(p[1] for p in points)
            offset += max((h.get("step", 0) for h in history), default=0)
    return curves


def make_plots(results: dict[str, Any], plot_dir: Path, teacher_history: Path | None = None) -> dict[str, str]:
    """PNG plots: accuracy against latency (batch 1 and 32), and each loss term over training steps."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the benchmark's plots need matplotlib: pip install -e '.[bench]' (or '.[demo]').") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = {}

    fig, axes = plt.subplots(1, len(LATENCY_BATCH_SIZES), figsize=(11, 4.2))
    for ax, b in zip(axes, LATENCY_BATCH_SIZES):
        for r in results["rows"]:
            marker = "*" if r["name"] == "teacher" else "o"
            ax.scatter(r[f"latency_b{b}_ms"], 100 * r["accuracy"], marker=marker, s=120 if marker == "*" else 50)
            ax.annotate(r["name"], (r[f"latency_b{b}_ms"], 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)  # fmt: skip
        ax.set_xlabel(f"CPU latency, batch {b} (ms, median)")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['benchmark']}: accuracy against latency")
    fig.tight_layout()
    paths["accuracy_vs_latency"] = str(plot_dir / "accuracy_vs_latency.png")
    fig.savefig(paths["accuracy_vs_latency"], dpi=110)
    plt.close(fig)

    curves = loss_curves(results)
    teacher_curve = None
    if teacher_history is not None and teacher_history.is_file():
        history = json.loads(teacher_history.read_text(encoding="utf-8"))
        teacher_curve = ([h["step"] for h in history if "loss" in h], [h["loss"] for h in history if "loss" in h])
    terms = [t for t in LOSS_TERMS if t in curves]
    fig, axes = plt.subplots(1, max(1, len(terms)), figsize=(4.2 * max(1, len(terms)), 3.8), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, (steps, values) in curves[term].items():
            ax.plot(steps, values, label=name, linewidth=1.2)
        if term == "task" and teacher_curve is not None:
            ax.plot(*teacher_curve, label="teacher fine-tune", linestyle="--", color="gray", linewidth=1)
        ax.set_title(f"loss_{term}")
        ax.set_xlabel("optimizer step (a row's stages in sequence)")
        ax.set_yscale("log" if term in ("hidden", "embeddings", "attention") else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["loss_terms"] = str(plot_dir / "loss_terms.png")
    fig.savefig(paths["loss_terms"], dpi=110)
    plt.close(fig)
    return paths
