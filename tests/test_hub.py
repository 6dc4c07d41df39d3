"""Publishing: the model card states what was measured; the push sends the student folder alone (offline fake API)."""

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification

from hf_distill import ModelArguments, load_teacher, model_card, push_student


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload_folder", folder_path, repo_id))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_model_card_states_teacher_recipe_accuracy_kept_size_and_speedup():
    card = model_card(
        teacher="textattack/bert-base-uncased-SST-2",
        recipe="distilbert.yaml",
        dataset="glue/sst2",
        student_params=67_000_000,
        teacher_params=109_500_000,
        metrics={"teacher_accuracy": 0.92, "student_accuracy": 0.9, "speedup_batch32": 1.93},
    )
    assert "textattack/bert-base-uncased-SST-2" in card and "distilbert.yaml" in card
    assert "97.8% of the teacher's" in card
    assert "67.0M" in card and "109.5M" in card and "1.93x" in card
    assert card.startswith("---\nlibrary_name: transformers")


def test_model_card_never_invents_missing_figures():
    card = model_card(teacher="t", recipe="r", dataset="d", student_params=1, teacher_params=2, metrics={})
    assert card.count("not measured") >= 3


def test_push_student_uploads_the_saved_student_folder(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_layers=2)).save_pretrained(tmp_path / "student")
    api = FakeApi()
    url = push_student(str(tmp_path / "student"), "me/tiny-student", api=api)
    assert url.endswith("/commit/0")
    assert api.calls == [
        ("create_repo", "me/tiny-student", None, True),
        ("upload_folder", str(tmp_path / "student"), "me/tiny-student"),
    ]


def test_push_student_refuses_a_checkpoint_with_projections(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_layers=2)).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "projections.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="training-only files.*projections.pt"):
        push_student(str(tmp_path / "ckpt"), "me/x", api=FakeApi())


def test_hub_id_teacher_fails_offline_with_a_clear_error(monkeypatch):
    """The Hub code path is kept for users; here (HF_HUB_OFFLINE=1) it must fail with a message naming the field."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="teacher_model_name_or_path='someone/no-such-model' could not be"):
        load_teacher(ModelArguments(teacher_model_name_or_path="someone/no-such-model"))
