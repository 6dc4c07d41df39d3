"""What the rows of tests/test_bad_inputs.py run: tiny in-process models, tiny data files, a stale run directory.

Kept apart from the table so that the test module is the table and its checks.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import (
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
)

from hf_distill import (
    DataArguments,
    DistillationConfig,
    DistillationTrainer,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    load_task_dataset,
    tokenize_dataset,
)
from hf_distill.resume import write_run_config

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- tiny models, tokenizer, files
@cache
def tokenizer() -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def other_tokenizer() -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "quick", "the", "fox"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def teacher(**kw) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(**{"num_layers": 4, "hidden": 32, **kw})).eval()


def student(**kw) -> BertForSequenceClassification:
    torch.manual_seed(1)
    return BertForSequenceClassification(tiny_bert_config(**{"num_layers": 2, "hidden": 16, **kw}))


def config(tmp: Path, **kw) -> DistillationConfig:
    return DistillationConfig(output_dir=str(tmp / "out"), report_to="none", use_cpu=True, **kw)


def headless_trainer(tmp: Path, **kw) -> DistillationTrainer:
    """Bare bodies (BertModel, no head) as teacher and student: feature terms only (general distillation)."""
    from transformers import BertModel

    torch.manual_seed(0)
    body = lambda: BertModel(tiny_bert_config(num_layers=2, hidden=16))  # noqa: E731
    return DistillationTrainer(model=body(), teacher_model=body(), args=config(tmp, **kw))


def trainer(tmp: Path, student_model=None, teacher_model=None, **kw) -> DistillationTrainer:
    return DistillationTrainer(
        model=student_model or student(), teacher_model=teacher_model or teacher(), args=config(tmp, **kw)
    )


def tsv(tmp: Path, rows: list[str], name: str = "train.tsv", header: str = "sentence\tlabel") -> str:
    path = tmp / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def jsonl(tmp: Path, rows: list[dict], name: str = "train.jsonl") -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def data(**kw):
    return load_task_dataset(DataArguments(**kw))


def recipe(tmp: Path, text: str) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(text)
    return str(path)


def tokenized(tmp: Path, rows: list[str], name: str = "train.tsv") -> Dataset:
    return tokenize_dataset(data(train_file=tsv(tmp, rows, name)), tokenizer(), DataArguments())["train"]


def saved_teacher(tmp: Path, **kw) -> str:
    path = tmp / "teacher"
    teacher(**kw).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


@cache
def distill_main() -> Callable:
    spec = importlib.util.spec_from_file_location("distill_script", REPO / "scripts" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def distill(tmp: Path, *argv: str, train_rows=("a good film\t1", "bad\t0"), dev_rows=("fun\t1",), **teacher_kw):
    """`scripts/distill.py` in-process on a saved tiny teacher and tiny train/dev files; `argv` overrides."""
    base = [
        "--teacher_model_name_or_path",
        saved_teacher(tmp, **teacher_kw),
        "--train_file",
        tsv(tmp, list(train_rows)),
        "--validation_file",
        tsv(tmp, list(dev_rows), "dev.tsv"),
        "--output_dir",
        str(tmp / "out"),
        "--max_length",
        "16",
        "--max_steps",
        "1",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
    ]
    return distill_main()([*base, *argv])


def cache_for_other_data(tmp: Path):
    train = tokenized(tmp, ["a good film\t1", "bad\t0"])
    other = tokenized(tmp, ["the plot\t1", "boring\t0"], "other.tsv")
    cache_ = build_teacher_cache(
        teacher(), train, DataCollatorWithPadding(tokenizer()), cache_dir=tmp / "cache", spec=TeacherCacheSpec()
    )
    return attach_teacher_cache(other, cache_)


def cache_with_random_collator(tmp: Path):
    train = tokenized(tmp, ["a good film\t1", "bad\t0"])
    collator = DataCollatorForLanguageModeling(tokenizer(), mlm=True)
    return build_teacher_cache(teacher(), train, collator, cache_dir=tmp / "cache", spec=TeacherCacheSpec())


def previous_run(tmp: Path, **settings) -> str:
    """An output_dir holding a complete checkpoint-2 of a run with `settings`, as scripts/distill.py leaves it."""
    out = tmp / "out"
    checkpoint = out / "checkpoint-2"
    student().save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    write_run_config(str(out), settings)
    write_run_config(str(checkpoint), settings)
    return str(out)


def student_folder(tmp: Path, *extra: str, token: str | None = None) -> str:
    """A saved student folder, plus `extra` files (e.g. a checkpoint's training_args.bin), the token in its card."""
    path = tmp / "out" / "pushed"
    student().save_pretrained(path)
    (path / "README.md").write_text(f"A student. token={token}\n" if token else "A student.\n")
    for name in extra:
        (path / name).write_bytes(b"not for the Hub")
    return str(path)


def bare_peft_student():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(student(), LoraConfig(target_modules=["query", "value"]))  # no task_type


def given_student(tmp: Path, **kw) -> str:
    path = tmp / "given_student"
    student(**kw).save_pretrained(path)
    return str(path)


def lm_benchmark(tmp: Path, row_recipe: dict | None = None, **overrides):
    """Run the LM benchmark on a config of files in `tmp` (the failures wanted come before any model is loaded)."""
    import yaml

    from hf_distill.lm_benchmark import LMBenchmarkConfig, run_lm_benchmark

    (tmp / "corpus.txt").write_text("one review\n\nanother review\n")
    (tmp / "finetune.yaml").write_text(yaml.safe_dump({"task_weight": 1.0, "logits_weight": 0.0}))
    (tmp / "row.yaml").write_text(yaml.safe_dump(row_recipe or {"task_weight": 0.0, "logits_weight": 1.0}))
    values = dict(kind="lm", output_dir=str(tmp / "bench"), teacher_model_name_or_path=str(tmp / "teacher"),
                  train_source=str(tmp / "corpus.txt"), eval_fraction=0.5, max_steps=2,
                  baseline_recipe=str(tmp / "finetune.yaml"), rows={"row": str(tmp / "row.yaml")})  # fmt: skip
    return run_lm_benchmark(LMBenchmarkConfig(**{**values, **overrides}), root=tmp)


def comparison(tmp: Path, against: str):
    """BENCHMARKS.md's `<!-- results: PATH against=ROW -->` block of a record with rows teacher, no_kd, kd."""
    from hf_distill.benchmark_report import record_table

    rows = [{"name": n, "accuracy": 0.5, "dev_correct": {"42": "01"}} for n in ("teacher", "no_kd", "kd")]
    (tmp / "record.json").write_text(json.dumps({"rows": rows, "config": {"seed": 42}}))
    return record_table(tmp / "record.json", against=against)
