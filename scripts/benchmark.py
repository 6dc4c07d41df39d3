#!/usr/bin/env python
"""Benchmark distillation recipes against a no-KD baseline on one budget: accuracy, size, CPU latency, speed-up.

    python scripts/benchmark.py                                         # benchmarks/sst2_minilm_l3.yaml, <= 15 min
    python scripts/benchmark.py --config benchmarks/sst2_mpnet_l6.yaml  # the full run, ~2 h on 2 CPU cores
    python scripts/benchmark.py --set max_train_samples=500 --output_dir outputs/benchmarks/quick

It fine-tunes the teacher (or takes a fine-tuned one), builds the student from alternating teacher layers, distils it
with each recipe, fine-tunes it without KD, evaluates everything on the dev split and writes results.json, results.md
and plots under outputs/benchmarks/<name>/. Run it again to resume: finished stages are reused, an interrupted
training stage continues from its last checkpoint. The stages live in `hf_distill.benchmark`.
"""

import argparse
import logging
import os
import sys
import time

import transformers
import yaml

from hf_distill.benchmark import load_benchmark_config, run_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "benchmarks", "sst2_minilm_l3.yaml")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Benchmark YAML (default: %(default)s).")
    parser.add_argument("--output_dir", default=None, help="Output folder (default: outputs/benchmarks/<name>).")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config key, VALUE read as YAML (repeatable), e.g. --set max_train_samples=500.",
    )
    return parser.parse_args(argv)


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}.")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> dict:
    # ------------------------------------------------------------------ args
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir

    # ------------------------------------------------------------------ logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # ------------------------------------------------------------------ config
    config = load_benchmark_config(args.config, overrides)
    print(f"benchmark {config.name!r} from {os.path.relpath(args.config, REPO)}")

    # ------------------------------------------------------------------ run (every stage reused, resumed or run)
    start = time.perf_counter()
    results = run_benchmark(config)  # relative paths: against the repository holding the config file
    elapsed = time.perf_counter() - start

    # ------------------------------------------------------------------ report
    print()
    print(open(results["paths"]["results_md"], encoding="utf-8").read())
    statuses = [s["status"] for s in results["stages"]]
    summary = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    print(f"stages: {summary}; {elapsed:.0f} s in this run")
    print(f"results: {results['paths']['results_json']}")
    print(f"         {results['paths']['results_md']}")
    for name, path in results["plots"].items():
        print(f"plot {name}: {path}")
    return results


if __name__ == "__main__":
    main()
