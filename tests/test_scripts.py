"""End-to-end runs of scripts/distill.py: one process under `accelerate launch`, two under `torchrun` (gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "bert-base-sst2_to_bert-6l", "distilbert.yaml")
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def env():
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": REPO,
        "WANDB_DISABLED": "true",
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A tiny fine-tuned-looking teacher, a narrower student and small train/dev TSV files on disk."""
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **NO_DROPOUT))
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, **NO_DROPOUT))
    student.save_pretrained(root / "narrow_student")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("dev", 24)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
            rows.append(" ".join(WORDS[j] for j in idx.tolist()) + f"\t{i % 2}")
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def overrides(root, out, *extra):
    return [
        "--config",
        RECIPE,
        "--teacher_model_name_or_path",
        str(root / "teacher"),
        "--train_file",
        str(root / "train.tsv"),
        "--validation_file",
        str(root / "dev.tsv"),
        "--max_length",
        "16",
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_steps",
        "3",
        "--use_cpu",
        "true",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def train_losses(out) -> list[float]:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_distill_script_end_to_end(workdir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, "recipes", "accelerate_configs", "cpu.yaml"),
        os.path.join(REPO, "scripts", "distill.py"),
        *overrides(workdir, out, "--student_num_layers", "2"),
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    student_dir = out / "student"
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    assert not (out / "student.tmp").exists()
    card = (student_dir / "README.md").read_text()
    assert "Accuracy kept" in card and str(workdir / "teacher") in card
    assert not any(name.startswith("projections") for name in os.listdir(student_dir))
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())
    assert len(train_losses(out)) == 3


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(workdir, tmp_path):
    """torchrun with 2 CPU processes (gloo) trains like one process with the same global batch, projections too."""
    extra = [
        "--student_model_name_or_path",
        str(workdir / "narrow_student"),
        "--attention_weight",
        "1.0",
        "--embeddings_weight",
        "1.0",
        "--seed",
        "0",
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "distill.py"), *overrides(workdir, single, *extra)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            os.path.join(REPO, "scripts", "distill.py"),
            *overrides(workdir, double, *extra, "--per_device_train_batch_size", "4", "--ddp_backend", "gloo"),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (double / "checkpoint-3" / "projections.pt").is_file()
    one, two = train_losses(single), train_losses(double)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-3), (one, two)
