#!/usr/bin/env python
"""Multi-stage distillation: teacher-assistant chains and born-again networks (`hf_distill.chain`).

    python scripts/chain.py --config recipes/mpnet-sst2_to_mpnet-6l/chains/ta_chain_12-6-3.yaml
    python scripts/chain.py --config recipes/mpnet-sst2_to_mpnet-6l/chains/born_again_6l.yaml
    python scripts/chain.py --config CHAIN.yaml --set max_train_samples=500 --output_dir outputs/chains/quick

Each stage builds its student from the current teacher and distils it; its saved student (a plain transformers model
with its tokenizer, in `<output_dir>/stage<k>-<name>/`) teaches the next stage. Every stage's student is evaluated
on the eval split (if the config has one) and `<output_dir>/chain.json` sums the chain up. Run it again to resume:
finished stages are reused, an interrupted stage continues from its last checkpoint, a stage whose settings changed
is refused.
"""

import argparse
import logging
import os
import sys

import transformers

from hf_distill.chain import load_chain_config, run_chain
from hf_distill.cli import add_set_argument, parse_set_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="Chain YAML (keys: hf_distill.chain.ChainConfig fields).")
    parser.add_argument("--output_dir", default=None, help="Output folder (default: outputs/chains/<name>).")
    add_set_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    # ------------------------------------------------------------------ args
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = parse_set_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir

    # ------------------------------------------------------------------ logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # ------------------------------------------------------------------ config (every stage checked before training)
    config = load_chain_config(args.config, overrides)
    where = os.path.relpath(os.path.abspath(args.config), REPO)
    print(f"chain {config.name!r} from {where}: {len(config.stages)} stages")

    # ------------------------------------------------------------------ run (every stage reused, resumed or run)
    results = run_chain(config)  # relative paths: against the repository holding the config

    # ------------------------------------------------------------------ report
    teacher = results["teacher"]
    print(f"\nteacher: {teacher['layers']} layers, accuracy {_pct(teacher.get('accuracy'))}")
    for row in results["stages"]:
        print(
            f"stage {row['stage']} {row['name']}: {row['teacher_layers']} -> {row['num_layers']} layers "
            f"({row['init']}), {row['params']:,} params, {row['steps']} steps, accuracy {_pct(row['accuracy'])}, "
            f"{row['status']}"
        )
    print(f"summary: {results['paths']['chain_json']}")
    print(f"final student: {results['paths']['final']}")
    return results


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


if __name__ == "__main__":
    main()
