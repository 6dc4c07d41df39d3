#!/usr/bin/env python
"""Tune a recipe's temperature, task/logit balance, intermediate weights and learning rate (optuna).

    python scripts/tune.py --config recipes/minilm-sst2_to_minilm-l3/vanilla_kd.yaml --n_trials 20 [--field value ...]

The recipe and its `--field value` overrides are those of `scripts/distill.py`; the tuning flags are the fields of
`hf_distill.tune_config.TuneConfig` (`--n_trials`, `--temperature_range 1,8`, `--validation_samples 400`, ...). Trials
are selected on a validation slice of the labelled training rows, never on the dev split. The study is kept in
`<tune_dir>/study.db`: rerunning the same command continues it. Writes `<tune_dir>/trials.json` and the tuned recipe
(`--tuned_recipe`, default `<tune_dir>/tuned.yaml`), ready for `scripts/distill.py --config`.
"""

import logging
import sys

import transformers

from hf_distill.tune import tune_distillation
from hf_distill.tune_recipe import parse_tune_args, write_tuning_outputs

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None):
    # ------------------------------------------------------------------ args (recipe, overrides, tuning flags)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_tune_args(argv)  # unknown flags and bad search spaces are refused here, before any load

    # ------------------------------------------------------------------ logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(args.distill.training.get_process_log_level())

    # ------------------------------------------------------------------ search (data, teacher cache, trials)
    distill = args.distill
    result = tune_distillation(distill.model, distill.data, distill.training, args.tune)

    # ------------------------------------------------------------------ save: tuned recipe and trials (atomic)
    recipe, trials = write_tuning_outputs(result, args, argv)
    best = result.best
    logger.info("best: trial %d, %s %.4f, values %s", best["number"], result.settings["metric"], best["objective"],
                best["values"])  # fmt: skip
    logger.info("tuned recipe: %s; trials: %s", recipe, trials)
    return result


if __name__ == "__main__":
    main()
