"""`scripts/distill.py --push_to_hub` end to end, offline: what would be uploaded is the student alone, never a secret.

The script runs in a subprocess whose `HfApi.create_repo` / `HfApi.create_commit` are replaced by recorders (and
`upload_folder` is sent down its single-commit path, so it ends in `create_commit` too): every byte that would leave
the machine is copied to a folder the test then inspects. The teacher is a Hub id (`me/tiny-teacher`) served from a
local Hub cache under HF_HUB_OFFLINE=1, so the card's `base_model` is a real model id.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import script_env, tiny_bert_config, write_tiny_tsv
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from hf_distill.hub import ALLOWED_FILES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "bert-base-sst2_to_bert-6l", "distilbert.yaml")
TOKEN = "hf_SECRETtoken123"
TEACHER_ID = "me/tiny-teacher"
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

# Runs scripts/distill.py with the Hub's write API replaced by recorders (argv[1] is the script, the rest its flags).
RECORDING_LAUNCHER = r"""
import json, os, runpy, shutil, sys

import huggingface_hub.hf_api as hf_api
from huggingface_hub.hf_api import CommitInfo, HfApi

record = os.environ["PUBLISH_RECORD"]
calls = []


def log(call):
    calls.append(call)
    with open(os.path.join(record, "calls.json"), "w") as f:
        json.dump(calls, f)


def create_repo(self, repo_id, **kwargs):
    log({"call": "create_repo", "repo_id": repo_id, "private": kwargs.get("private")})
    return "https://huggingface.co/" + repo_id


def create_commit(self, repo_id, operations, **kwargs):
    files = []
    for op in operations:
        target = os.path.join(record, "files", op.path_in_repo)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = op.path_or_fileobj
        if isinstance(source, (str, os.PathLike)):
            shutil.copyfile(source, target)
        else:
            data = source if isinstance(source, bytes) else source.read()
            with open(target, "wb") as f:
                f.write(data)
        files.append(op.path_in_repo)
    log({"call": "create_commit", "repo_id": repo_id, "files": files})
    url = "https://huggingface.co/" + repo_id + "/commit/" + "0" * 40
    message = kwargs.get("commit_message", "")
    return CommitInfo(commit_url=url, commit_message=message, commit_description="", oid="0" * 40)


hf_api.is_xet_available = lambda: False  # upload_folder's single-commit path ends in create_commit
HfApi._validate_yaml = lambda self, *args, **kwargs: None  # upload_folder asks the Hub to check README.md's YAML
HfApi.create_repo = create_repo
HfApi.create_commit = create_commit
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def hub_workdir(tmp_path_factory, tiny_tokenizer):
    """A local Hub cache holding `me/tiny-teacher` (a tiny BERT classifier + tokenizer) and small train/dev TSVs."""
    root = tmp_path_factory.mktemp("publish")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / ("models--" + TEACHER_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **NO_DROPOUT))
    teacher.save_pretrained(repo / "snapshots" / revision)
    tiny_tokenizer.save_pretrained(repo / "snapshots" / revision)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 32), ("dev", 16)):
        write_tiny_tsv(root / f"{split}.tsv", n, g)
    return root


def run_push(root, out, record, *extra):
    launcher = root / "launcher.py"
    launcher.write_text(RECORDING_LAUNCHER)
    record.mkdir()
    args = [
        *("--config", RECIPE, "--teacher_model_name_or_path", TEACHER_ID),
        *("--train_file", str(root / "train.tsv"), "--validation_file", str(root / "dev.tsv")),
        *("--max_length", "16", "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1"),
        *("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--logging_steps", "1"),
        *("--eval_strategy", "no", "--use_cpu", "true", "--dataloader_num_workers", "0"),
        *("--student_num_layers", "2", "--report_to", "none"),
        *("--push_to_hub", "true", "--hub_token", TOKEN, "--hub_model_id", "me/x"),
        *extra,
    ]
    env = script_env(HF_HUB_CACHE=str(root / "hub"), HF_HOME=str(root / "hf_home"), PUBLISH_RECORD=str(record))
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, str(launcher), os.path.join(REPO, "scripts", "distill.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pushed(hub_workdir, tmp_path_factory):
    """One real run of scripts/distill.py with --push_to_hub: (process, output_dir, record folder)."""
    base = tmp_path_factory.mktemp("pushed")
    out, record = base / "run", base / "record"
    proc = run_push(hub_workdir, out, record)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out, record


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def test_push_uploads_exactly_the_student_allow_list(pushed):
    _, out, record = pushed
    calls = json.loads((record / "calls.json").read_text())
    assert [c["call"] for c in calls] == ["create_repo", "create_commit"]
    assert calls[0]["repo_id"] == calls[1]["repo_id"] == "me/x"
    uploaded = set(calls[1]["files"])
    # What a BERT classifier and a fast WordPiece tokenizer save: weights in safetensors, config, tokenizer, card.
    assert uploaded == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert uploaded <= ALLOWED_FILES
    assert set(files_under(out / "student")) == uploaded  # the saved student folder holds nothing else either
    assert not (out / "student.tmp").exists()
    student = AutoModelForSequenceClassification.from_pretrained(record / "files", use_safetensors=True)
    assert student.config.num_hidden_layers == 2


def test_token_is_in_no_uploaded_file_no_output_file_and_no_log(pushed):
    """Defect 3: `--hub_token` ended up in student/training_args.bin, which the push uploaded."""
    proc, out, record = pushed
    secret = TOKEN.encode()
    uploaded = files_under(record / "files")
    assert uploaded, "nothing was uploaded"
    for name in uploaded:
        assert secret not in (record / "files" / name).read_bytes(), f"token in uploaded {name}"
    # Not uploaded, but on disk next to the student: checkpoints (training_args.bin, trainer_state.json), metrics.
    written = files_under(out)
    assert any(name.endswith("training_args.bin") for name in written), written
    for name in written:
        assert secret not in (out / name).read_bytes(), f"token in {name}"
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    assert "pushed" in proc.stderr  # the logs were captured


def test_pushed_model_card_parses_and_states_what_was_measured(pushed):
    _, _, record = pushed
    text = (record / "files" / "README.md").read_text(encoding="utf-8")
    card = ModelCard(text)
    assert card.data.base_model == TEACHER_ID
    assert card.data.library_name == "transformers"
    assert "distillation" in card.data.tags
    body = card.text
    assert TEACHER_ID in body and "recipes/bert-base-sst2_to_bert-6l/distilbert.yaml" in body
    assert "train.tsv" in body  # the data it was trained on (the recipe's glue was overridden by --train_file)
    assert re.search(r"\| accuracy \| 0\.\d{4} \| 0\.\d{4} \|", body), body
    assert re.search(r"Accuracy kept: \d+\.\d% of the teacher's", body), body
    assert re.search(r"speed-up over the teacher at batch 32: \d+\.\d\dx", body), body
    assert "% of the teacher" in body and "parameters" in body
    # The recipe's loss terms with their weights: 0.5 task + 0.5 KL at T=2 + 1.0 cosine hidden (alternate).
    assert "| task | 0.5 |" in body and "| logits | 0.5 | kl at temperature 2.0" in body
    assert "| hidden | 1 | cosine" in body and "alternate" in body
    assert "| attention |" not in body  # weight 0: not a term of this run
    urls = re.findall(r"https?://[^\s)>\]]+", text)
    assert all(url.startswith("https://arxiv.org/abs/") for url in urls), urls
