#!/usr/bin/env python
"""Benchmark distillation recipes against a no-KD baseline on one budget: accuracy, size, CPU latency, speed-up.

    python scripts/benchmark.py                                         # benchmarks/sst2_minilm_l3.yaml, <= 15 min
    python scripts/benchmark.py --config benchmarks/sst2_mpnet_l6.yaml  # the full run, ~2 h on 2 CPU cores
    python scripts/benchmark.py --set max_train_samples=500 --output_dir outputs/benchmarks/quick
    python scripts/benchmark.py --update-docs   # regenerate BENCHMARKS.md's tables from benchmarks/results/*.json
    python scripts/benchmark.py --combine A.json B.json --into C.json   # one record from runs of one seed each
    python scripts/benchmark.py --config benchmarks/smollm2_lm.yaml     # the LM benchmark (`kind: lm`): perplexity

It fine-tunes the teacher (or takes a fine-tuned one), builds the student from alternating teacher layers, distils it
with each recipe, fine-tunes it without KD, evaluates everything on the dev split and writes results.json, results.md
and plots under outputs/benchmarks/<name>/, and the run's record into the repository (the config's `results_file`,
`benchmarks/results/<name>.json`), from which BENCHMARKS.md's tables are generated. A run changed by `--set` writes
its record into its output folder instead, unless `--set results_file=...` says where: a committed record is always
the run of the committed config. Run it again to resume: finished stages are reused, an interrupted training stage
continues from its last checkpoint. The stages live in `hf_distill.benchmark`.
"""

import argparse
import logging
import os
import sys
import time

import transformers

from hf_distill.benchmark import format_table, run_benchmark, update_results_blocks
from hf_distill.benchmark_combine import combine_records, load_record
from hf_distill.benchmark_report import write_json_atomic
from hf_distill.cli import add_set_argument, parse_set_overrides
from hf_distill.files import write_text_atomic
from hf_distill.lm_benchmark import LMBenchmarkConfig, load_any_benchmark_config, run_lm_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "benchmarks", "sst2_minilm_l3.yaml")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Benchmark YAML (default: %(default)s).")
    parser.add_argument("--output_dir", default=None, help="Output folder (default: outputs/benchmarks/<name>).")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="Regenerate the results tables of BENCHMARKS.md from benchmarks/results/*.json, run nothing.",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="RECORD",
        help="Combine records of one benchmark run under different student_seeds (one seed per session) into the "
        "record of all their seeds (--into), run nothing. See hf_distill.benchmark_combine.",
    )
    parser.add_argument("--into", metavar="RECORD", help="Where --combine writes the combined record.")
    add_set_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    # ------------------------------------------------------------------ args
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.update_docs:
        return update_docs(os.path.join(REPO, "BENCHMARKS.md"))
    if args.combine:
        return combine(args.combine, args.into)
    overrides = parse_set_overrides(args.set)
    changed = bool(overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir

    # ------------------------------------------------------------------ logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # ------------------------------------------------------------------ config
    config = load_any_benchmark_config(args.config, overrides)  # `kind: lm`: the LM benchmark (lm_benchmark.py)
    lm = isinstance(config, LMBenchmarkConfig)
    print(f"benchmark {config.name!r} from {os.path.relpath(args.config, REPO)}")
    if changed and config.results_file and "results_file" not in overrides:
        out = config.output_dir or os.path.join(REPO, "outputs", "benchmarks", config.name)
        config.results_file = os.path.join(out, "record.json")
        print(f"--set changed the benchmark: its record goes to {config.results_file}, not into the repository")

    # ------------------------------------------------------------------ run (every stage reused, resumed or run)
    start = time.perf_counter()
    command = " ".join(["python", "scripts/benchmark.py", *argv])
    run = run_lm_benchmark if lm else run_benchmark
    results = run(config, command=command)  # relative paths: against the repository holding the config
    elapsed = time.perf_counter() - start

    # ------------------------------------------------------------------ report
    print()
    print(open(results["paths"]["results_md"], encoding="utf-8").read())
    statuses = [s["status"] for s in results["stages"]]
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    print(f"stages: {summary}; {elapsed:.0f} s in this run")
    print(f"results: {results['paths']['results_json']}")
    print(f"         {results['paths']['results_md']}")
    if "record" in results["paths"]:
        print(f"record:  {results['paths']['record']}")
    for name, path in results.get("plots", {}).items():
        print(f"plot {name}: {path}")
    return results


def combine(paths: list[str], into: str | None) -> dict:
    """Write the record combining the records `paths` (`hf_distill.benchmark_combine`) to `into`, atomically."""
    if not into:
        raise SystemExit("--combine needs --into PATH, the combined record to write.")
    names = [os.path.relpath(os.path.abspath(p), REPO) for p in paths]
    try:
        record = combine_records([load_record(p) for p in paths], names=names)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"--combine: {error}") from None
    write_json_atomic(into, record)
    print(format_table(record["rows"]))
    print(f"record: {into} (seeds {record['budget']['student_seeds']}, from {len(paths)} records)")
    return record


def update_docs(path: str) -> dict:
    """Rewrite the `<!-- results: ... -->` tables of `path` from the records they name (atomically)."""
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = update_results_blocks(old, REPO)
    if new != old:
        write_text_atomic(path, new)
    print(f"{os.path.relpath(path, REPO)}: {'updated' if new != old else 'already up to date'}")
    return {"updated": new != old}


if __name__ == "__main__":
    main()
