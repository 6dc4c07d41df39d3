"""Teacher to deployable student in one run (hf_distill.deploy_run, `scripts/distill.py --deploy_variants`): the
student folder gains onnx/, its card the measured table, and the push uploads the ONNX files with it."""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pytest
import torch
from conftest import tiny_bert_config, write_tiny_tsv
from transformers import BertForSequenceClassification, DataCollatorWithPadding

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from hf_distill.deploy import load_variant  # noqa: E402
from hf_distill.deploy_run import CARD_HEADING, check_deploy_variants  # noqa: E402
from hf_distill.evaluation import predict_logits  # noqa: E402
from hf_distill.hub import publishable_files, push_student  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "bert-base-sst2_to_bert-6l", "distilbert.yaml")


class FakeApi:
    """The two HfApi calls a push makes, recorded instead of sent (no Hub here)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, commit_message, repo_type=None):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        return "https://hub.example/commit/0"


@pytest.mark.parametrize(
    "variants, kwargs, message",
    [
        (["onnx", "int4"], {}, r"deploy_variants must be distinct variants from \['onnx', 'onnx-int8'"),
        (["torch-int8"], {}, r"torch-int8 is a \.pt state dict .* scripts/export.py --quantize torch-int8"),
        (["onnx", "onnx"], {}, r"deploy_variants must be distinct"),
        (["onnx"], {"has_eval": False}, r"measures every variant on the eval split, but this run has none"),
        (["onnx"], {"text_pairs": True}, r"with text_pair_column set"),
        (["onnx"], {"adapter_only": True}, r"saved as an adapter. Set save_merged: true"),
    ],
)
def test_bad_deploy_variants(variants, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_deploy_variants(variants, **({"has_eval": True} | kwargs))
    assert check_deploy_variants(None, has_eval=False) == []


def test_publishable_files_take_the_onnx_folder_and_nothing_else_in_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"x")
    (tmp_path / "onnx" / "model_int8.onnx").write_bytes(b"x")
    assert publishable_files(tmp_path) == ["config.json", "onnx/model.onnx", "onnx/model_int8.onnx"]
    (tmp_path / "onnx" / "notes.txt").write_text("?")
    with pytest.raises(ValueError, match=re.escape("never uploads: ['onnx/notes.txt']")):
        publishable_files(tmp_path)
    os.remove(tmp_path / "onnx" / "notes.txt")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=re.escape("never uploads: ['other']")):
        publishable_files(tmp_path)


@pytest.mark.slow
def test_distill_with_deploy_variants_end_to_end(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("dev", 24)):
        write_tiny_tsv(tmp_path / f"{split}.tsv", n, g)
    spec = importlib.util.spec_from_file_location("distill_script", os.path.join(REPO, "scripts", "distill.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    argv = ["--config", RECIPE, "--teacher_model_name_or_path", str(tmp_path / "teacher"),
            "--train_file", str(tmp_path / "train.tsv"), "--validation_file", str(tmp_path / "dev.tsv"),
            "--max_length", "16", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--eval_strategy", "no", "--save_steps", "2", "--use_cpu", "true", "--dataloader_num_workers", "0",
            "--student_num_layers", "2", "--report_to", "none",
            "--deploy_variants", "onnx", "onnx-int8", "onnx-int8-static"]  # fmt: skip
    script.main(argv)

    student_dir = out / "student"
    assert sorted(os.listdir(student_dir / "onnx")) == ["model.onnx", "model_int8.onnx", "model_int8_static.onnx"]
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # no staging folder left
    card = (student_dir / "README.md").read_text()
    assert card.count(CARD_HEADING) == 1
    table = card[card.index(CARD_HEADING) :]
    for name in ("teacher", "student", "student-onnx", "student-onnx-int8", "student-onnx-int8-static"):
        assert f"| {name} |" in table, name

    # The card's accuracy of each variant is that of the file in onnx/, evaluated here on the same dev rows.
    from hf_distill import DataArguments, load_task_dataset, tokenize_dataset

    data = DataArguments(train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "dev.tsv"),
                         max_length=16)  # fmt: skip
    dev = tokenize_dataset(load_task_dataset(data), tiny_tokenizer, data)["eval"]
    collator = DataCollatorWithPadding(tiny_tokenizer)
    for variant in ("onnx", "onnx-int8", "onnx-int8-static"):
        logits, labels = predict_logits(load_variant(student_dir / "onnx", variant), dev, collator)
        accuracy = 100 * float(np.mean(logits.argmax(-1) == labels))
        assert f"| student-{variant} | ONNX Runtime " in table
        line = next(line for line in table.splitlines() if line.startswith(f"| student-{variant} |"))
        assert line.split(" | ")[2] == f"{accuracy:.2f}", (variant, line)

    # The push uploads the student with its ONNX files, in one commit.
    api = FakeApi()
    push_student(student_dir, "me/tiny", api=api)
    uploaded = api.calls[1][2]
    assert {"onnx/model.onnx", "onnx/model_int8.onnx", "onnx/model_int8_static.onnx", "README.md"} <= set(uploaded)
