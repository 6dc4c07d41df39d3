#!/usr/bin/env python
"""Deep mutual learning (Zhang et al. 2018, https://arxiv.org/abs/1706.00384): train two or more students together,
each on the labels and on the others' predictions, with no pre-trained teacher (`hf_distill.mutual`).

    accelerate launch scripts/mutual.py --config recipes/minilm-sst2_to_minilm-l3/mutual/mutual_learning.yaml

Recipe keys are fields of `PeerArguments`, `DataArguments` and `MutualLearningConfig`; flags override them. Every
peer is saved, with the tokenizer, as a plain transformers model in `<output_dir>/peer<k>/`; `--resume_from_checkpoint
<output_dir>/checkpoint-<step>` continues an interrupted run.
"""

import json
import logging
import os
import sys

import transformers
from transformers import DataCollatorWithPadding, set_seed

from hf_distill import apply_label_info, check_max_length, load_task_dataset, num_labels_of, tokenize_dataset
from hf_distill.mutual import MutualLearningTrainer
from hf_distill.mutual_config import load_peers, parse_mutual_args

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict[str, float]:
    # ------------------------------------------------------------------ args (recipe, then command-line overrides)
    peer_args, data_args, training_args, recipe_path = parse_mutual_args(sys.argv[1:] if argv is None else argv)

    # ------------------------------------------------------------------ logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    logger.info("recipe: %s", recipe_path)

    # ------------------------------------------------------------------ data
    raw = load_task_dataset(data_args, seed=training_args.seed)
    logger.info("data: %s", {split: len(d) for split, d in raw.items()})

    # ------------------------------------------------------------------ models (the peers, one tokenizer)
    peers, tokenizer = load_peers(peer_args, num_labels=num_labels_of(raw, data_args.label_column))
    check_max_length(data_args.max_length, **{f"peer {k}": peer for k, peer in enumerate(peers)})
    for peer in peers[1:]:  # class names -> every peer's id2label (peer 0 decides the order)
        raw = apply_label_info(raw, data_args.label_column, peers[0], peer)

    # ------------------------------------------------------------------ tokenize (once, for every peer)
    with training_args.main_process_first(desc="tokenize"):
        ds = tokenize_dataset(raw, tokenizer, data_args)

    # ------------------------------------------------------------------ trainer
    trainer = MutualLearningTrainer(
        model=peers,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )  # compute_metrics: each peer's accuracy and the ensemble's

    # ------------------------------------------------------------------ train
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # ------------------------------------------------------------------ save every peer (<output_dir>/peer<k>/)
    trainer.save_model(training_args.output_dir)
    logger.info("peers saved to %s/peer0 .. peer%d", training_args.output_dir, len(peers) - 1)

    # ------------------------------------------------------------------ evaluate (each peer, and their ensemble)
    metrics: dict[str, float] = {}
    if "eval" in ds:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            accuracy = {k: v for k, v in metrics.items() if "accuracy" in k}
            with open(os.path.join(training_args.output_dir, "peers.json"), "w", encoding="utf-8") as f:
                json.dump({"recipe": recipe_path, "accuracy": accuracy}, f, indent=2)
            logger.info("accuracy: %s", accuracy)
    return metrics


if __name__ == "__main__":
    main()
