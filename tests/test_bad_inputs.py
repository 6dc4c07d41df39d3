"""The bad-input catalogue: one table of things users get wrong, each refused with a clear error before any training.

Every row is run in a fresh temporary directory (also the working directory); the test checks the exception type, a
pattern naming the field and the bad value, that the message suggests a fix, that nothing half-written is left
(no `*.tmp*` file or folder, no `student` folder), and that the message is exactly the one `docs/bad_inputs.md`
shows. What the rows run (tiny models, files, a previous run's folder) lives in `tests/bad_input_triggers.py`. The doc
is generated from this table:

    python tests/test_bad_inputs.py --write-docs
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest sets these under pytest; --write-docs runs without it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, bad_input_triggers: also as a script
from bad_input_triggers import (  # noqa: E402
    bare_peft_student,
    cache_for_other_data,
    cache_with_random_collator,
    comparison,
    config,
    data,
    distill,
    given_student,
    headless_trainer,
    jsonl,
    lm_benchmark,
    other_tokenizer,
    previous_run,
    recipe,
    student,
    student_folder,
    teacher,
    tokenizer,
    trainer,
    tsv,
)

from hf_distill import (  # noqa: E402
    DataArguments,
    DistillationTrainer,
    ModelArguments,
    RunArguments,
    apply_label_info,
    load_or_make_student,
    load_recipe,
    load_teacher,
    make_student,
    parse_distill_args,
    prepare_output_dir,
    publishable_files,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"
# A message suggests a fix when it says what to do (an imperative) or what a valid value looks like (the valid
# values, an example, the closest valid name).
FIX = re.compile(
    r"\b(use|set|pass|drop|add|give|rename|remove|leave|fill|fix|keep|load|build|choose|point|delete|evaluate|"
    r"train|distil|pad|write|resume|start|tokenize|call|lower|raise|install|rerun|run|push|save)\b|did you mean|"
    r"one of|must be|e\.g\.|like '|such as",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Row:
    """One bad input: `trigger(tmp)` must raise `exc` whose message names `field` and matches `match`."""

    id: str
    category: str
    what: str
    trigger: Callable[[Path], object]
    exc: type[BaseException]
    field: str
    match: str


# ---------------------------------------------------------------------- the table
# The table. One row per bad input; kept one row to a few lines (ruff would give each argument its own line).
# fmt: off
ROWS = [
    # ------------------------------------------------------------ configuration (DistillationConfig)
    Row("temperature-zero", "config", "temperature: 0", lambda p: config(p, temperature=0), ValueError,
        "temperature", r"temperature must be > 0, got 0"),
    Row("negative-weight", "config", "hidden_weight: -1", lambda p: config(p, hidden_weight=-1.0), ValueError,
        "hidden_weight", r"hidden_weight must be >= 0, got -1"),
    Row("all-weights-zero", "config", "task_weight: 0 and logits_weight: 0 (every term off)",
        lambda p: config(p, task_weight=0, logits_weight=0), ValueError, "task_weight", r"all loss weights are 0"),
    Row("unknown-logits-loss", "config", "logits_loss: kld (no such loss)", lambda p: config(p, logits_loss="kld"),
        ValueError, "logits_loss", r"logits_loss must be one of .*got 'kld'"),
    Row("layer-mapping-syntax", "config", "layer_mapping: 1-0 (not teacher->student)",
        lambda p: config(p, layer_mapping="1-0"), ValueError, "layer_mapping", r"layer_mapping must be .*'1-0'"),
    Row("teacher-dtype", "config", "teacher_dtype: fp16 (not a torch dtype name)",
        lambda p: config(p, teacher_dtype="fp16"), ValueError, "teacher_dtype", r"must be one of.*'fp16'"),
    Row("eval-batch-size-zero", "config", "per_device_eval_batch_size: 0 (found only after training before)",
        lambda p: config(p, per_device_eval_batch_size=0), ValueError, "per_device_eval_batch_size",
        r"per_device_eval_batch_size must be >= 1, got 0"),
    Row("train-batch-size-zero", "config", "per_device_train_batch_size: 0",
        lambda p: config(p, per_device_train_batch_size=0), ValueError, "per_device_train_batch_size",
        r"per_device_train_batch_size must be >= 1, got 0"),
    Row("jsd-beta-out-of-range", "config", "jsd_beta: 1.5 (generalized_jsd's teacher weight)",
        lambda p: config(p, logits_loss="generalized_jsd", jsd_beta=1.5), ValueError, "jsd_beta",
        r"jsd_beta must be in \[0, 1\], got 1.5"),
    Row("skew-alpha-one", "config", "skew_alpha: 1 (the skew KL would compare a distribution with itself)",
        lambda p: config(p, logits_loss="skew_kl", skew_alpha=1.0), ValueError, "skew_alpha",
        r"skew_alpha must be in \[0, 1\), got 1.0"),
    Row("logits-chunk-size-zero", "config", "logits_chunk_size: 0", lambda p: config(p, logits_chunk_size=0),
        ValueError, "logits_chunk_size", r"logits_chunk_size must be an int >= 1 or None, got 0"),
    Row("fused-lm-head-mse", "config", "fused_lm_head: true with logits_loss: mse (not a softmax divergence)",
        lambda p: config(p, fused_lm_head=True, logits_loss="mse"), ValueError, "fused_lm_head",
        r"fused_lm_head=True computes the logit term from the LM heads with a softmax divergence"),
    Row("fused-lm-head-with-cache", "config", "fused_lm_head: true with use_teacher_cache: true",
        lambda p: config(p, fused_lm_head=True, use_teacher_cache=True), ValueError, "fused_lm_head",
        r"fused_lm_head=True needs the teacher's last hidden states"),
    # ------------------------------------------------------------ methods (MiniLM relations, several teachers, EMA)
    Row("minilm-unknown-relation", "methods", "minilm_relations: qq,qk (qk is not a relation)",
        lambda p: config(p, minilm_weight=1.0, minilm_relations="qq,qk"), ValueError, "minilm_relations",
        r"minilm_relations must be comma-separated names .*got 'qq,qk'"),
    Row("minilm-with-cache", "methods", "minilm_weight: 1 with use_teacher_cache: true (no projections cached)",
        lambda p: config(p, minilm_weight=1.0, use_teacher_cache=True), ValueError, "minilm_weight",
        r"minilm_weight=1.0 needs the teacher's query / key / value projections"),
    Row("teacher-weights-negative", "methods", "teacher_weights: [1, -0.5]",
        lambda p: config(p, teacher_weights=[1.0, -0.5]), ValueError, "teacher_weights",
        r"teacher_weights must be finite and >= 0, got \[1.0, -0.5\]"),
    Row("multi-teacher-average", "methods", "multi_teacher_average: geometric",
        lambda p: config(p, multi_teacher_average="geometric"), ValueError, "multi_teacher_average",
        r"multi_teacher_average must be one of .*got 'geometric'"),
    Row("multi-teacher-with-cache", "methods", "two teacher_weights with use_teacher_cache: true",
        lambda p: config(p, teacher_weights=[1.0, 1.0], use_teacher_cache=True), ValueError, "use_teacher_cache",
        r"use_teacher_cache=True stores one teacher's outputs, but teacher_weights=\[1.0, 1.0\]"),
    Row("ema-decay-one", "methods", "ema_decay: 1 (the EMA teacher would never change)",
        lambda p: config(p, ema_teacher=True, ema_decay=1.0), ValueError, "ema_decay",
        r"ema_decay must be in \[0, 1\), got 1.0"),
    Row("ema-with-cache", "methods", "ema_teacher: true with use_teacher_cache: true",
        lambda p: config(p, ema_teacher=True, use_teacher_cache=True), ValueError, "use_teacher_cache",
        r"use_teacher_cache=True cannot be used with ema_teacher=True"),
    # ------------------------------------------------------------ deployment (scripts/distill.py --deploy_variants)
    Row("deploy-torch-int8", "deploy", "--deploy_variants torch-int8 (a .pt file a student folder does not carry)",
        lambda p: distill(p, "--deploy_variants", "torch-int8"), ValueError, "deploy_variants",
        r"deploy_variants must be distinct variants from .*got \['torch-int8'\]"),
    Row("deploy-adapter-only", "deploy", "--deploy_variants onnx with a LoRA student saved as an adapter",
        lambda p: distill(p, "--deploy_variants", "onnx", "--peft", '{"r": 2}', "--save_merged", "false"),
        ValueError, "deploy_variants", r"deploy_variants=\['onnx'\] exports a plain model, but this LoRA student"),
    # ------------------------------------------------------------ teacher cache
    Row("cache-top-k-tail-without-k", "cache", "teacher_cache_top_k_tail: true without teacher_cache_top_k",
        lambda p: config(p, use_teacher_cache=True, teacher_cache_top_k_tail=True), ValueError,
        "teacher_cache_top_k", r"teacher_cache_top_k_tail=True .* but teacher_cache_top_k is None"),
    Row("cache-top-k-zero", "cache", "teacher_cache_top_k: 0", lambda p: config(p, teacher_cache_top_k=0),
        ValueError, "teacher_cache_top_k", r"teacher_cache_top_k must be >= 1 or None, got 0"),
    Row("cache-dtype", "cache", "teacher_cache_dtype: int8", lambda p: config(p, teacher_cache_dtype="int8"),
        ValueError, "teacher_cache_dtype", r"teacher_cache_dtype must be one of .*'int8'"),
    Row("cache-top-k-reverse-kl", "cache", "teacher cache with top-k logits and logits_loss: reverse_kl",
        lambda p: config(p, use_teacher_cache=True, teacher_cache_top_k=8, logits_loss="reverse_kl"), ValueError,
        "teacher_cache_top_k", r"teacher_cache_top_k=8 .*logits_loss='reverse_kl' is not defined"),
    Row("cache-attention-not-cached", "cache", "attention_weight: 1 with the teacher cache, attentions not cached",
        lambda p: config(p, use_teacher_cache=True, attention_weight=1.0), ValueError, "teacher_cache_attentions",
        r"attention_weight=1.0 with use_teacher_cache=True needs the teacher's attention maps"),
    Row("cache-untokenized-data", "cache", "use_teacher_cache with a train_dataset of raw text (not tokenized)",
        lambda p: DistillationTrainer(model=student(), teacher_model=teacher(), args=config(p, use_teacher_cache=True),
                                      train_dataset=data(train_file=tsv(p, ["a good film\t1"]))["train"]),
        ValueError, "input_ids", r"input_ids"),
    Row("cache-of-other-data", "cache", "a teacher cache attached to a dataset it was not built for",
        cache_for_other_data, ValueError, "build_teacher_cache", r"was built for another dataset"),
    Row("cache-random-collator", "cache", "use the teacher cache with DataCollatorForLanguageModeling(mlm=True)",
        cache_with_random_collator, ValueError, "use_teacher_cache", r"DataCollatorForLanguageModeling\(mlm=True\)"),
    # ------------------------------------------------------------ recipes
    Row("recipe-missing", "recipe", "--config pointing at a file that does not exist",
        lambda p: load_recipe(str(p / "missing.yaml")), FileNotFoundError, "--config", r"--config .*missing\.yaml"),
    Row("recipe-not-a-mapping", "recipe", "a recipe that is a YAML list, not field: value pairs",
        lambda p: load_recipe(recipe(p, "- temperature\n- 2.0\n")), ValueError, "recipe", r"must be a mapping"),
    Row("recipe-misspelt-key", "recipe", "temprature: 2.0 in a recipe (misspelt key)",
        lambda p: load_recipe(recipe(p, "temprature: 2.0\n")), ValueError, "temprature",
        r"'temprature' \(did you mean 'temperature'\?\)"),
    # ------------------------------------------------------------ data arguments
    Row("max-length-zero", "data", "max_length: 0", lambda p: DataArguments(max_length=0), ValueError, "max_length",
        r"max_length must be >= 1, got 0"),
    Row("max-train-samples-zero", "data", "max_train_samples: 0", lambda p: DataArguments(max_train_samples=0),
        ValueError, "max_train_samples", r"max_train_samples must be >= 1 or unset, got 0"),
    Row("problem-type-unknown", "data", "problem_type: classification (not a transformers problem_type)",
        lambda p: DataArguments(problem_type="classification"), ValueError, "problem_type",
        r"problem_type must be one of .*'classification'"),
    # ------------------------------------------------------------ datasets
    Row("no-data", "dataset", "neither dataset_name nor train_file / validation_file", lambda p: data(),
        ValueError, "dataset_name", r"no data"),
    Row("train-file-missing", "dataset", "train_file pointing at a file that does not exist",
        lambda p: data(train_file=str(p / "nope.tsv")), FileNotFoundError, "train_file", r"nope\.tsv.*does not exist"),
    Row("train-file-extension", "dataset", "train_file with an unsupported extension (.txt)",
        lambda p: data(train_file=tsv(p, ["a\t1"], "train.txt")), ValueError, "train_file", r"extension '\.txt'"),
    Row("train-file-no-rows", "dataset", "a train file with a header and no rows",
        lambda p: data(train_file=tsv(p, [])), ValueError, "train_file", r"has no data rows"),
    Row("text-column-missing", "dataset", "text_column: text, but the file's column is 'sentence'",
        lambda p: data(train_file=tsv(p, ["a good film\t1"]), text_column="text"), ValueError, "text_column",
        r"text_column='text' is not a column"),
    Row("label-column-missing", "dataset", "label_column: score, but the file's column is 'label'",
        lambda p: data(train_file=tsv(p, ["a good film\t1"]), label_column="score"), ValueError, "label_column",
        r"label_column='score' is not a column"),
    Row("label-empty", "dataset", "a row whose label cell is empty",
        lambda p: data(train_file=tsv(p, ["a good film\t1", "bad\t", "fun\t0"])), ValueError, "label_column",
        r"label_column='label' is empty in row 2"),
    Row("labels-mixed", "dataset", "a label column mixing ids and names ('1', 'World')",
        lambda p: data(train_file=tsv(p, ["a good film\t1", "bad\tWorld"])), ValueError, "label_column",
        r"mixes label kinds.*'1' in row 1 and 'World' in row 2"),
    Row("labels-kind-differs", "dataset", "class names in the train file, integer ids in the dev file",
        lambda p: data(train_file=tsv(p, ["a\tWorld"]), validation_file=tsv(p, ["b\t0"], "dev.tsv")), ValueError,
        "label_column", r"holds class names in the train split .* but integer ids in the eval split"),
    Row("eval-label-unseen", "dataset", "a dev label ('Art') that no train row has",
        lambda p: data(train_file=tsv(p, ["a\tWorld", "b\tSports"]), validation_file=tsv(p, ["c\tArt"], "dev.tsv")),
        ValueError, "label_column", r"label 'Art' .*eval split \(validation_file\) never occurs in the train"),
    Row("label-negative", "dataset", "label -1 (an unlabelled test split) in the dev file",
        lambda p: data(train_file=tsv(p, ["a\t0", "b\t1"]), validation_file=tsv(p, ["c\t-1"], "dev.tsv")),
        ValueError, "label_column", r"has -1 in row 1 of the eval split"),
    Row("multi-hot-ragged", "dataset", "multi-hot label lists of different lengths",
        lambda p: data(train_file=jsonl(p, [{"sentence": "a", "label": [0, 1, 1]}, {"sentence": "b", "label": [1]}])),
        ValueError, "label_column", r"list of 1 values in row 2 .* but 3 in row 1"),
    Row("multi-label-without-lists", "dataset", "problem_type: multi_label_classification on a tsv of single ids",
        lambda p: data(train_file=tsv(p, ["a\t1"]), problem_type="multi_label_classification"), ValueError,
        "problem_type", r"problem_type='multi_label_classification' needs a list label column"),
    Row("regression-on-names", "dataset", "problem_type: regression on class names",
        lambda p: data(train_file=tsv(p, ["a\tWorld"]), problem_type="regression"), ValueError, "problem_type",
        r"problem_type='regression' needs numeric labels"),
    # ------------------------------------------------------------ models
    Row("teacher-missing", "models", "teacher_model_name_or_path pointing at a folder that does not exist",
        lambda p: load_teacher(ModelArguments(teacher_model_name_or_path=str(p / "no-such-teacher"))),
        FileNotFoundError, "teacher_model_name_or_path", r"no-such-teacher.* does not exist"),
    Row("student-missing", "models", "student_model_name_or_path pointing at a folder that does not exist",
        lambda p: load_or_make_student(ModelArguments(student_model_name_or_path=str(p / "nope")), teacher()),
        FileNotFoundError, "student_model_name_or_path", r"nope.* does not exist"),
    Row("student-layers-syntax", "models", "student_layers: '0;2' (not comma-separated)",
        lambda p: load_or_make_student(ModelArguments(student_layers="0;2"), teacher()), ValueError,
        "student_layers", r"student_layers must be comma-separated .*'0;2'"),
    Row("student-deeper-than-teacher", "models", "a student of 8 layers from a 4-layer teacher",
        lambda p: make_student(teacher(), num_layers=8, verbose=False), ValueError, "num_layers",
        r"num_layers=8 but a student cannot be deeper than its teacher \(4 layers\)"),
    Row("teacher-label-names-differ", "models", "data labels World/Sports, a teacher whose id2label is "
        "negative/positive", lambda p: apply_label_info(data(train_file=tsv(p, ["a\tWorld", "b\tSports"])), "label",
                                                     teacher(id2label={0: "negative", 1: "positive"}), student()),
        ValueError, "id2label", r"\['Sports', 'World'\] .* differ from the teacher's id2label \['negative', 'pos"),
    Row("data-classes-vs-head", "models", "3 classes in the data for a teacher head of 2",
        lambda p: apply_label_info(data(train_file=tsv(p, ["a\tArts", "b\tWorld", "c\tSports"])), "label", teacher(),
                                   student()), ValueError, "num_labels", r"the data has 3 label\(s\).* num_labels=2"),
    Row("max-length-over-positions", "models", "max_length: 100 for models with 64 position embeddings",
        lambda p: distill(p, "--max_length", "100"), ValueError, "max_length",
        r"max_length=100 is longer than the teacher .*64 tokens"),
    Row("given-student-other-classes", "models", "a given student whose trained head has 3 classes, teacher 2",
        lambda p: load_or_make_student(ModelArguments(student_model_name_or_path=given_student(p, num_labels=3)),
                                       teacher()), ValueError, "student_model_name_or_path",
        r"the student's trained head has 3 classes but the teacher's has 2"),
    Row("student-layers-vs-num-layers", "models", "student_layers: 0,2 with student_num_layers: 3",
        lambda p: ModelArguments(student_layers="0,2", student_num_layers=3), ValueError, "student_num_layers",
        r"student_layers='0,2' picks 2 teacher layers but student_num_layers=3"),
    Row("given-student-and-layers", "models", "student_model_name_or_path together with student_layers",
        lambda p: ModelArguments(student_model_name_or_path="some/student", student_layers="0,2"), ValueError,
        "student_layers", r"loads an existing student, but student_layers='0,2' asks to build one"),
    # ------------------------------------------------------------ trainer preflight (before any step)
    Row("args-not-distillation-config", "trainer", "DistillationTrainer given plain TrainingArguments",
        lambda p: DistillationTrainer(model=student(), teacher_model=teacher(),
                                      args=TrainingArguments(str(p / "out"), report_to="none")),
        ValueError, "args", r"args must be a DistillationConfig, got TrainingArguments"),
    Row("mapping-teacher-layer-range", "trainer", "layer_mapping 9->0 with a 4-layer teacher",
        lambda p: trainer(p, hidden_weight=1.0, layer_mapping="9->0"), ValueError, "layer_mapping",
        r"teacher layer 9, outside the teacher's layers 0\.\.3"),
    Row("mapping-student-layer-range", "trainer", "layer_mapping 3->5 with a 2-layer student",
        lambda p: trainer(p, hidden_weight=1.0, layer_mapping="3->5"), ValueError, "layer_mapping",
        r"student layer 5, outside the student's layers 0\.\.1"),
    Row("vocab-mismatch", "trainer", "a student with another vocabulary size than the teacher",
        lambda p: trainer(p, student(vocab_size=100)), ValueError, "vocab_size", r"vocab_size differs: teacher 64"),
    Row("tokenizer-mismatch", "trainer", "teacher and student tokenizers that split text differently",
        lambda p: DistillationTrainer(model=student(), teacher_model=teacher(), args=config(p),
                                      processing_class=tokenizer(), teacher_processing_class=other_tokenizer()),
        ValueError, "teacher_processing_class", r"tokenize .* differently"),
    Row("attention-head-mismatch", "trainer", "attention_weight: 1 with 4 teacher heads and 2 student heads",
        lambda p: trainer(p, student(heads=2), attention_weight=1.0), ValueError, "attention_weight",
        r"(?s)4.*2.*attention_weight=0"),
    Row("num-labels-mismatch", "trainer", "a given student with 3 classes for a 2-class teacher",
        lambda p: trainer(p, student(num_labels=3)), ValueError, "num_labels",
        r"num_labels differs: teacher 2, student 3"),
    Row("regression-with-softmax-kd", "trainer", "a regression pair (num_labels=1) with the default logits_loss kl",
        lambda p: trainer(p, student(num_labels=1), teacher(num_labels=1)), ValueError, "logits_loss",
        r"logits_loss='kl' with a regression head .*identically 0"),
    Row("multi-label-with-jsd", "trainer", "a multi-label pair with logits_loss: jsd (a softmax divergence)",
        lambda p: trainer(p, student(problem_type="multi_label_classification"),
                          teacher(problem_type="multi_label_classification"), logits_loss="jsd"), ValueError,
        "logits_loss", r"logits_loss='jsd' with a multi-label head"),
    Row("problem-type-differs", "trainer", "a multi-label teacher with a single-label student",
        lambda p: trainer(p, student(problem_type="single_label_classification"),
                          teacher(problem_type="multi_label_classification")), ValueError, "problem_type",
        r"problem_type differs: teacher 'multi_label_classification', student 'single_label_classification'"),
    Row("headless-student-task-loss", "trainer", "a bare body (BertModel, no head) with task_weight: 0.5",
        lambda p: headless_trainer(p, task_weight=0.5, logits_weight=0.0, hidden_weight=1.0), ValueError,
        "task_weight", r"task_weight=0.5 needs a student with a head, got BertModel"),
    Row("peft-misspelt-key", "models", "peft: {lora_alpah: 16} (misspelt LoRA key)",
        lambda p: ModelArguments(teacher_model_name_or_path="t", peft={"lora_alpah": 16}), ValueError, "peft",
        r"peft has unknown LoRA key\(s\): 'lora_alpah' \(did you mean 'lora_alpha'\?\)"),
    Row("peft-rank-zero", "models", "peft: {r: 0}",
        lambda p: ModelArguments(teacher_model_name_or_path="t", peft={"r": 0}), ValueError, "peft.r",
        r"peft.r must be an integer >= 1 \(the LoRA rank\), got 0"),
    Row("save-merged-without-peft", "models", "save_merged: true without a peft config",
        lambda p: ModelArguments(teacher_model_name_or_path="t", save_merged=True), ValueError, "save_merged",
        r"save_merged=True merges a LoRA adapter into the student, but peft is unset"),
    Row("bare-peft-student", "trainer", "a LoRA student made without task_type (a bare PeftModel)",
        lambda p: trainer(p, bare_peft_student()), ValueError, "task_type", r"the student is a bare PeftModel"),
    # ------------------------------------------------------------ publishing
    Row("push-checkpoint-files", "publish", "pushing a folder that holds training_args.bin and optimizer.pt",
        lambda p: publishable_files(student_folder(p, "training_args.bin", "optimizer.pt")), ValueError,
        "training_args.bin", r"holds files a student push never uploads: \['optimizer\.pt', 'training_args\.bin'\]"),
    Row("push-token-in-a-file", "publish", "pushing a folder whose README.md contains the Hub token",
        lambda p: publishable_files(student_folder(p, token="hf_abcdefgh"), token="hf_abcdefgh"), ValueError,
        "README.md", r"\['README\.md'\] contain the Hub token; refusing to push"),
    Row("push-not-a-model", "publish", "pushing a folder without config.json (e.g. output_dir's parent)",
        lambda p: publishable_files(p), FileNotFoundError, "config.json", r"has no config\.json"),
    # ------------------------------------------------------------ command line (scripts/distill.py)
    Row("cli-float-labels-2-class-teacher", "command line", "float (regression) labels for a 2-class teacher",
        lambda p: distill(p, train_rows=("a good film\t0.5", "bad\t1.5"), dev_rows=("fun\t1.0",)), ValueError,
        "teacher_model_name_or_path", r"the teacher's trained head has 2 classes but the data has 1"),
    Row("cli-regression-softmax-kd", "command line", "float labels, a regression teacher, default logits_loss kl",
        lambda p: distill(p, train_rows=("a good film\t0.5", "bad\t1.5"), dev_rows=("fun\t1.0",), num_labels=1),
        ValueError, "logits_loss", r"logits_loss='kl' with a regression head"),
    Row("cli-misspelt-flag", "command line", "--learning_rat 1e-3 (misspelt flag)",
        lambda p: distill(p, "--learning_rat", "1e-3"), ValueError, "--learning_rat",
        r"'--learning_rat' \(did you mean '--learning_rate'\?\)"),
    Row("cli-config-without-path", "command line", "--config as the last argument, without a recipe path",
        lambda p: parse_distill_args(["--output_dir", str(p / "out"), "--config"]), ValueError, "--config",
        r"--config needs a recipe path"),
    Row("cli-student-layers-and-depth", "command line", "--student_layers 0,2 --student_num_layers 3",
        lambda p: distill(p, "--student_layers", "0,2", "--student_num_layers", "3"), ValueError, "student_layers",
        r"picks 2 teacher layers but student_num_layers=3"),
    Row("cli-eval-batch-size-zero", "command line", "--per_device_eval_batch_size 0",
        lambda p: distill(p, "--per_device_eval_batch_size", "0"), ValueError, "per_device_eval_batch_size",
        r"per_device_eval_batch_size must be >= 1, got 0"),
    Row("cli-string-label-unseen", "command line", "distill.py on World/Sports train labels, 'Science' in dev",
        lambda p: distill(p, train_rows=("a good film\tWorld", "bad\tSports"), dev_rows=("fun\tScience",)),
        ValueError, "label_column", r"label 'Science' .* never occurs in the train split"),
    # ------------------------------------------------------------ benchmarks
    Row("lm-prompt-tokens-range", "benchmark", "LM benchmark prompt_tokens: 128 with block_size: 128 (no completion)",
        lambda p: lm_benchmark(p, prompt_tokens=128), ValueError, "prompt_tokens",
        r"prompt_tokens must be an int in \[1, block_size - 1\] = \[1, 127\], got 128"),
    Row("lm-on-policy-without-prompts", "benchmark", "an LM benchmark row with lmbda: 0.5 and no prompt_tokens",
        lambda p: lm_benchmark(p, {"task_weight": 0.0, "logits_weight": 1.0, "lmbda": 0.5}), ValueError,
        "prompt_tokens", r"row 'row' is on-policy .* but prompt_tokens is not set"),
    Row("results-against-unknown-row", "benchmark", "<!-- results: PATH against=vanilla --> naming no row",
        lambda p: comparison(p, "vanilla"), ValueError, "against", r"against='vanilla' is not a row of this record"),
    # ------------------------------------------------------------ resume
    Row("resume-other-settings", "resume", "rerun into an output_dir whose checkpoint has temperature 2.0, now 4.0",
        lambda p: prepare_output_dir(previous_run(p, temperature=2.0), {"temperature": 4.0}), ValueError,
        "temperature", r"(?s)refusing to resume from .*checkpoint-2.*temperature: 2\.0 -> 4\.0"),
    Row("resume-never-with-checkpoints", "resume", "resume: never into an output_dir that holds checkpoints",
        lambda p: prepare_output_dir(previous_run(p, temperature=2.0), {"temperature": 2.0}, resume="never"),
        ValueError, "resume", r"resume='never' but output_dir=.* already holds checkpoints \(checkpoint-2\)"),
    Row("resume-missing-checkpoint", "resume", "resume_from_checkpoint pointing at a folder that does not exist",
        lambda p: prepare_output_dir(str(p / "out"), {}, resume_from_checkpoint=str(p / "out" / "checkpoint-9")),
        FileNotFoundError, "resume_from_checkpoint", r"checkpoint-9.* does not exist"),
    Row("resume-and-overwrite", "resume", "resume_from_checkpoint together with overwrite_output_dir",
        lambda p: prepare_output_dir(str(p / "out"), {}, overwrite_output_dir=True,
                                     resume_from_checkpoint=str(p / "out" / "checkpoint-2")),
        ValueError, "overwrite_output_dir", r"asks to resume but overwrite_output_dir=true asks to start from"),
    Row("resume-choice", "resume", "resume: yes (not auto or never)", lambda p: RunArguments(resume="yes"),
        ValueError, "resume", r"resume must be one of \('auto', 'never'\), got 'yes'"),
]
# fmt: on


# ---------------------------------------------------------------------- running a row, the doc
def normalise(message: str, tmp: Path) -> str:
    """The message with this run's temporary directory shown as `<tmp>` and the repository as `<repo>`."""
    for path in sorted({str(tmp), os.path.realpath(tmp)}, key=len, reverse=True):
        message = message.replace(path, "<tmp>")
    message = message.replace(str(REPO), "<repo>")
    return re.sub(r"\b[0-9a-f]{32,64}\b", "<hash>", message)  # cache fingerprints change with what they cover


def run_row(row: Row, tmp: Path) -> BaseException:
    """Run `row.trigger` with `tmp` as the working directory; return what it raised."""
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        row.trigger(tmp)
    except (Exception, SystemExit) as e:  # SystemExit: argparse's exit on a bad command line
        return e
    finally:
        os.chdir(cwd)
    raise AssertionError(f"{row.id}: {row.what!r} raised nothing")


def half_written(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if ".tmp" in p.name or p.name == "student")


def rendered_error(error: BaseException, tmp: Path) -> str:
    return f"{type(error).__name__}: {normalise(str(error), tmp)}"


def render_doc(errors: dict[str, str]) -> str:
    lines = [
        "# Bad inputs and the errors they give",
        "",
        "Every input below is refused before any training step, with an error that names the field and the bad value",
        "and says what to do; none leaves anything half-written (no `*.tmp*`, no `student` folder). The list is",
        "generated from the table `ROWS` in `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py",
        "--write-docs`), and `pytest tests/test_bad_inputs.py` fails when a message below is no longer the one the",
        "code raises. Paths under the test's temporary folder are shown as `<tmp>`, hex digests as `<hash>`.",
        "",
        f"{len(ROWS)} bad inputs:",
        "",
        "| # | id | category | what the user did | error |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(ROWS, 1):
        what = row.what.replace("|", "\\|")
        lines.append(f"| {i} | [`{row.id}`](#{i}-{row.id}) | {row.category} | {what} | `{row.exc.__name__}` |")
    for i, row in enumerate(ROWS, 1):
        lines += ["", f"## {i}. {row.id}", "", f"*{row.category}*: {row.what}", "", "```text", errors[row.id], "```"]
    return "\n".join(lines) + "\n"


def documented_errors(text: str) -> dict[str, str]:
    """`id -> error` as written in the doc."""
    return dict(re.findall(r"^## \d+\. (\S+)\n\n.*?\n\n```text\n(.*?)\n```$", text, flags=re.MULTILINE | re.DOTALL))


def write_docs() -> None:
    errors = {}
    for row in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            errors[row.id] = rendered_error(run_row(row, Path(tmp)), Path(tmp))
    DOC.parent.mkdir(exist_ok=True)
    tmp_doc = DOC.with_name(DOC.name + ".tmp")
    tmp_doc.write_text(render_doc(errors), encoding="utf-8")
    os.replace(tmp_doc, DOC)
    print(f"wrote {len(errors)} bad inputs to {DOC}")


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def doc_errors() -> dict[str, str]:
    return documented_errors(DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_refused_clearly(row: Row, tmp_path: Path, doc_errors):
    error = run_row(row, tmp_path)
    message = str(error)
    assert isinstance(error, row.exc), f"{row.id}: expected {row.exc.__name__}, got {type(error).__name__}: {message}"
    assert re.search(row.match, message), f"{row.id}: {message!r} does not match {row.match!r}"
    assert row.field in message, f"{row.id}: the message does not name {row.field!r}: {message!r}"
    assert FIX.search(message), f"{row.id}: the message suggests no fix: {message!r}"
    assert half_written(tmp_path) == [], f"{row.id} left {half_written(tmp_path)}"
    assert doc_errors.get(row.id) == rendered_error(error, tmp_path), (
        f"docs/bad_inputs.md is stale for {row.id}; run `python tests/test_bad_inputs.py --write-docs`"
    )


def test_catalogue_has_30_distinct_rows_and_the_doc_lists_them_all(doc_errors):
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)) >= 30
    assert len({(row.trigger, row.match) for row in ROWS}) == len(ROWS)
    categories = {row.category for row in ROWS}
    assert {"config", "recipe", "dataset", "models", "command line", "cache", "resume", "publish"} <= categories
    # The whole doc is what the table renders (ids, order, categories, what, exception types), not only the messages.
    assert DOC.read_text(encoding="utf-8") == render_doc(doc_errors)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help=f"(re)write {DOC.relative_to(REPO)}")
    if parser.parse_args().write_docs:
        write_docs()
    else:
        parser.print_help()
