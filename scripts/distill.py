#!/usr/bin/env python
"""Distil a fine-tuned teacher into a student built from its layers (or a given student).

    accelerate launch scripts/distill.py --config recipes/bert-base_to_bert-6l/distilbert.yaml [--field value ...]

Values given on the command line override those of the recipe. Everything but the order of the stages lives in the
`hf_distill` package.
"""

import logging
import os
import sys

import transformers
from transformers import DataCollatorWithPadding, set_seed

from hf_distill import (
    DistillationTrainer,
    RunConfigCallback,
    apply_label_info,
    check_max_length,
    classification_metrics,
    load_or_make_student,
    load_task_dataset,
    load_teacher,
    num_labels_of,
    parse_distill_args,
    prepare_output_dir,
    push_student,
    run_settings,
    save_student_from_trainer,
    setting_defaults,
    student_card,
    tokenize_dataset,
)
from hf_distill.benchmark_deploy import format_deploy_table
from hf_distill.data import check_transfer_weights
from hf_distill.deploy_run import add_deployment_to_card, check_deploy_variants, deploy_student, texts_for_deployment
from hf_distill.evaluation import evaluate_model, measure_speedup
from hf_distill.multi_teacher import check_teacher_labels, load_extra_teachers
from hf_distill.peft_setup import check_peft_run, check_peft_trainer, export_peft_student, save_peft_student
from hf_distill.placement import SHARDED_PLACEMENTS, teacher_placement

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None):
    # ------------------------------------------------------------------ args (recipe, then command-line overrides)
    args = parse_distill_args(sys.argv[1:] if argv is None else argv)  # unknown flags are refused here
    model_args, data_args, run_args, training_args = args.model, args.data, args.run, args.training
    recipe_path = args.recipe_path
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push the student folder alone, at the end
    hub_token, training_args.hub_token = training_args.hub_token, None  # so no checkpoint's training_args.bin has it
    check_peft_run(model_args, push=push)  # an adapter student is not pushed (its base would be missing)

    # ------------------------------------------------------------------ logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    # ------------------------------------------------------------------ data
    check_transfer_weights(data_args, training_args)  # a transfer set needs a teacher term, checked before loading
    raw = load_task_dataset(data_args, seed=training_args.seed)
    logger.info("data: %s", {split: len(d) for split, d in raw.items()})
    deploy_variants = check_deploy_variants(  # export + int8 after training: refused now if it cannot run then
        run_args.deploy_variants,
        has_eval="eval" in raw,
        text_pairs=bool(data_args.text_pair_column),
        adapter_only=model_args.peft is not None and not model_args.save_merged,
    )

    # ------------------------------------------------------------------ run directory: resume only the same run
    settings = run_settings(
        model_args,
        data_args,
        training_args,
        **{f"{split}_rows": len(d) for split, d in raw.items()},
        num_processes=training_args.world_size,
    )
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="run directory"):
        resume = prepare_output_dir(
            training_args.output_dir,
            settings,
            resume=run_args.resume,
            overwrite_output_dir=run_args.overwrite_output_dir,
            resume_from_checkpoint=training_args.resume_from_checkpoint,
            is_main_process=training_args.should_save,
            defaults=setting_defaults(model_args, data_args, training_args),
        )

    # ------------------------------------------------------------------ models
    teacher, tokenizer = load_teacher(model_args, num_labels=num_labels_of(raw, data_args.label_column))
    extra_teachers = load_extra_teachers(model_args, tokenizer, num_labels=teacher.config.num_labels)  # multi-teacher
    student = load_or_make_student(model_args, teacher)  # a given student keeps its own config and class; LoRA if peft
    extra_roles = {f"teacher {i}": t for i, t in enumerate(extra_teachers, start=1)}
    check_max_length(data_args.max_length, teacher=teacher, student=student, **extra_roles)
    raw = apply_label_info(raw, data_args.label_column, teacher, student)  # class names -> both configs' id2label
    check_teacher_labels(teacher, extra_teachers)  # the teachers number the classes alike

    # ------------------------------------------------------------------ tokenize (once, for both models)
    with training_args.main_process_first(desc="tokenize"):
        ds = tokenize_dataset(raw, tokenizer, data_args)

    # ------------------------------------------------------------------ trainer
    trainer = DistillationTrainer(
        model=student,
        teacher_model=[teacher, *extra_teachers] if extra_teachers else teacher,  # several: hf_distill.multi_teacher
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics(),
    )
    check_peft_trainer(trainer)  # a LoRA student is merged or unloaded at the end: not under FSDP / ZeRO-3
    if deploy_variants and teacher_placement(trainer.accelerator) in SHARDED_PLACEMENTS:
        raise ValueError(
            f"deploy_variants={deploy_variants!r} times the teacher on one process, but it is sharded here "
            "(FSDP / ZeRO-3). Drop deploy_variants and deploy the saved student with scripts/export.py."
        )

    # ------------------------------------------------------------------ train (resume: see the run directory stage)
    trainer.add_callback(RunConfigCallback(settings))  # each checkpoint carries the settings it was trained with
    trainer.train(resume_from_checkpoint=resume)

    # ------------------------------------------------------------------ evaluate (the student, then the teacher)
    card_metrics = {}
    if "eval" in ds:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        card_metrics["student_accuracy"] = metrics.get("eval_accuracy")
        collator = DataCollatorWithPadding(tokenizer)
        # A sharded teacher's forward is collective: every process runs it; its speed is then not a CPU figure.
        sharded = teacher_placement(trainer.accelerator) in SHARDED_PLACEMENTS
        if sharded or trainer.is_world_process_zero():
            card_metrics["teacher_accuracy"] = evaluate_model(teacher, ds["eval"], collator).get("accuracy")
        if trainer.is_world_process_zero():
            if not sharded:
                card_metrics["speedup_batch32"] = measure_speedup(teacher, trainer.model, ds["eval"], collator)
            logger.info("teacher vs student: %s", card_metrics)

    # ------------------------------------------------------------------ save the student alone (allow-list, atomic)
    student_dir = os.path.join(training_args.output_dir, "student")
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    # A LoRA student is saved merged (a plain model), or as its adapter plus the base in <output_dir>/student_base.
    exported = None if model_args.peft is None else export_peft_student(trainer.model, merged=model_args.save_merged)
    card = student_card(
        model_args=model_args,
        data_args=data_args,
        training_args=training_args,
        student=trainer.model if exported is None else exported,
        teacher=teacher,
        metrics=card_metrics,
        recipe_path=recipe_path,
        model_name=repo_id if push else None,
    )
    if exported is None:
        save_student_from_trainer(trainer, student_dir, card)  # weights, config, tokenizer, README.md: nothing else
    else:
        base_dir = os.path.join(training_args.output_dir, "student_base")
        save_peft_student(trainer, exported, student_dir, card, merged=model_args.save_merged, base_folder=base_dir)
    logger.info("student saved to %s", student_dir)

    # ------------------------------------------------------------------ deploy (ONNX + int8 in <student>/onnx/, card)
    if deploy_variants and trainer.is_world_process_zero():
        check_texts, calibration_texts = texts_for_deployment(raw, data_args.text_column)
        rows = deploy_student(student_dir, teacher, ds["eval"], DataCollatorWithPadding(tokenizer), deploy_variants,
                              check_texts=check_texts, calibration_texts=calibration_texts)  # fmt: skip
        add_deployment_to_card(student_dir, rows)
        logger.info("deployed %s into %s/onnx: %s", deploy_variants, student_dir, format_deploy_table(rows))

    # ------------------------------------------------------------------ push (the student folder's files alone)
    if push and trainer.is_world_process_zero():
        url = push_student(student_dir, repo_id, token=hub_token, private=training_args.hub_private_repo)
        logger.info("pushed to %s: %s", repo_id, url)


if __name__ == "__main__":
    main()
