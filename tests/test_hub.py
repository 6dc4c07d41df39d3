"""Publishing: the model card states what was measured; the student folder is an allow-list written atomically; the
push sends that folder's files alone and refuses anything else (offline fake API)."""

import os
import re

import pytest
import torch
from conftest import tiny_bert_config
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from hf_distill import (
    DistillationConfig,
    ModelArguments,
    load_teacher,
    model_card,
    publishable_files,
    push_student,
    save_student,
)

TOKEN = "hf_SECRETtoken123"


class FakeApi:
    """Records the Hub write calls `push_student` makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_commit(self, repo_id, operations, commit_message, repo_type=None):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        return f"https://huggingface.co/{repo_id}/commit/0"


def card(**kw):
    args = dict(
        teacher="textattack/bert-base-uncased-SST-2",
        recipe="distilbert.yaml",
        dataset="glue/sst2",
        student_params=67_000_000,
        teacher_params=109_500_000,
        metrics={"teacher_accuracy": 0.92, "student_accuracy": 0.9, "speedup_batch32": 1.93},
    )
    return model_card(**{**args, **kw})


@pytest.fixture
def student_dir(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_layers=2))
    return save_student(model, tiny_tokenizer, tmp_path / "student", card())


def test_model_card_states_teacher_recipe_accuracy_kept_size_and_speedup():
    text = card()
    assert "textattack/bert-base-uncased-SST-2" in text and "distilbert.yaml" in text
    assert "97.8% of the teacher's" in text
    assert "67.0M" in text and "109.5M" in text and "1.93x" in text


def test_model_card_never_invents_missing_figures():
    text = model_card(teacher="t", recipe="r", dataset="d", student_params=1, teacher_params=2, metrics={})
    assert text.count("not measured") >= 3


def test_model_card_front_matter_parses_with_hub_model_card():
    config = DistillationConfig(
        output_dir="unused", hidden_weight=1.0, hidden_loss="cosine", layer_mapping="alternate"
    )
    parsed = ModelCard(card(dataset_id="glue", distillation=config, model_name="me/student"))
    assert parsed.data.base_model == "textattack/bert-base-uncased-SST-2"
    assert parsed.data.library_name == "transformers" and parsed.data.datasets == ["glue"]
    result = parsed.data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 0.9, "glue")
    assert "| task | 0.5 | task loss on the labels |" in parsed.text
    assert "| logits | 0.5 | kl at temperature 2.0" in parsed.text and "| hidden | 1 | cosine" in parsed.text
    assert "loss = 0.5 · loss_task + 0.5 · loss_logits + 1 · loss_hidden" in parsed.text


def test_model_card_has_no_made_up_url():
    """The old card linked https://github.com/hf-distill/hf-distill, which does not exist."""
    text = card(distillation=DistillationConfig(output_dir="unused"))
    urls = re.findall(r"https?://[^\s)>\]]+", text)
    assert "github.com" not in text
    assert urls and all(url.startswith("https://arxiv.org/abs/") for url in urls), urls


def test_local_teacher_gives_no_base_model(tmp_path):
    """The Hub refuses a `base_model` that is not a model id: a local teacher is stated in the body only."""
    (tmp_path / "teacher").mkdir()
    parsed = ModelCard(card(teacher=str(tmp_path / "teacher")))
    assert parsed.data.base_model is None and str(tmp_path / "teacher") in parsed.text


def test_save_student_writes_only_the_allow_list(student_dir):
    assert sorted(os.listdir(student_dir)) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not os.path.exists(student_dir + ".tmp")
    model = AutoModelForSequenceClassification.from_pretrained(student_dir, use_safetensors=True)
    assert model.config.num_hidden_layers == 2


def test_save_student_replaces_an_old_student_and_leaves_nothing_half_written(student_dir, tiny_tokenizer):
    (open(os.path.join(student_dir, "training_args.bin"), "wb")).close()  # e.g. left by an older save_model
    model = BertForSequenceClassification(tiny_bert_config(num_layers=1))
    save_student(model, tiny_tokenizer, student_dir, card())
    assert "training_args.bin" not in os.listdir(student_dir)
    assert AutoModelForSequenceClassification.from_pretrained(student_dir).config.num_hidden_layers == 1

    class Broken(BertForSequenceClassification):
        def save_pretrained(self, path, **kw):
            os.makedirs(path)
            open(os.path.join(path, "config.json"), "w").close()
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_student(Broken(tiny_bert_config(num_layers=3)), tiny_tokenizer, student_dir, card())
    assert not os.path.exists(student_dir + ".tmp")  # the half-written copy is gone
    assert AutoModelForSequenceClassification.from_pretrained(student_dir).config.num_hidden_layers == 1


def test_push_student_uploads_the_allow_listed_files_in_one_commit(student_dir):
    api = FakeApi()
    url = push_student(student_dir, "me/tiny-student", api=api, token=TOKEN)
    assert url.endswith("/commit/0")
    assert api.calls == [
        ("create_repo", "me/tiny-student", None, True),
        ("create_commit", "me/tiny-student", sorted(os.listdir(student_dir))),
    ]


@pytest.mark.parametrize(
    "name", ["projections.pt", "training_args.bin", "optimizer.pt", "pytorch_model.bin", "scheduler.pt", "notes.txt"]
)
def test_push_student_refuses_a_folder_with_anything_else(student_dir, name):
    open(os.path.join(student_dir, name), "wb").close()
    api = FakeApi()
    with pytest.raises(ValueError, match=re.escape(f"never uploads: ['{name}']")):
        push_student(student_dir, "me/x", api=api)
    assert api.calls == []  # refused before any request


def test_push_student_refuses_a_checkpoint_folder(student_dir):
    os.makedirs(os.path.join(student_dir, "checkpoint-3"))
    with pytest.raises(ValueError, match=r"\['checkpoint-3'\].*not a checkpoint"):
        push_student(student_dir, "me/x", api=FakeApi())


def test_push_student_refuses_a_file_holding_the_token(student_dir):
    path = os.path.join(student_dir, "README.md")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\ntoken: {TOKEN}\n")
    api = FakeApi()
    with pytest.raises(ValueError, match=r"\['README.md'\] contain the Hub token"):
        push_student(student_dir, "me/x", api=api, token=TOKEN)
    assert api.calls == []


def test_push_student_refuses_a_file_holding_the_hf_token_env_var(student_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with open(os.path.join(student_dir, "config.json"), "a", encoding="utf-8") as f:
        f.write(f"\n{TOKEN}")
    with pytest.raises(ValueError, match=r"\['config.json'\] contain the Hub token"):
        push_student(student_dir, "me/x", api=FakeApi())


def test_publishable_files_needs_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        publishable_files(tmp_path)


def test_hub_id_teacher_fails_offline_with_a_clear_error(monkeypatch):
    """The Hub code path is kept for users; here (HF_HUB_OFFLINE=1) it must fail with a message naming the field."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="teacher_model_name_or_path='someone/no-such-model' could not be"):
        load_teacher(ModelArguments(teacher_model_name_or_path="someone/no-such-model"))


def test_count_parameters_counts_zero3_partitioned_parameters_whole(tiny_teacher):
    from hf_distill.hub import count_parameters

    assert count_parameters(tiny_teacher) == tiny_teacher.num_parameters()
    # Under ZeRO-3 each process holds an empty placeholder per parameter; `ds_numel` keeps the full size.
    full = {}
    for p in tiny_teacher.parameters():
        full[p] = p.numel()
        p.ds_numel = p.numel()
        p.data = p.data.new_empty(0)
    assert tiny_teacher.num_parameters() == 0
    assert count_parameters(tiny_teacher) == sum(full.values())


@pytest.mark.parametrize(
    "settings, says, never",
    [
        ({"logits_loss": "kl"}, "kl at temperature 2.0 between", ["beta", "alpha", "fused"]),
        ({"logits_loss": "generalized_jsd", "jsd_beta": 0.9}, "generalized_jsd (beta = 0.9, the teacher's", ["alpha"]),
        ({"logits_loss": "skew_kl", "skew_alpha": 0.2}, "skew_kl (alpha = 0.2) at temperature", ["beta"]),
        ({"logits_loss": "skew_reverse_kl"}, "skew_reverse_kl (alpha = 0.1) at", ["beta"]),
        ({"logits_loss": "reverse_kl", "fused_lm_head": True}, "LM heads in chunks (fused)", ["beta", "alpha"]),
    ],
)
def test_the_card_states_the_divergence_and_its_parameter(tmp_path, settings, says, never):
    from hf_distill.hub import loss_terms

    args = DistillationConfig(output_dir=str(tmp_path), temperature=2.0, logits_weight=0.5, **settings)
    (logits,) = [what for term, _, what in loss_terms(args) if term == "logits"]
    assert says in logits and not any(word in logits for word in never)


@pytest.mark.parametrize(
    "settings, term, says",
    [
        ({"relation_weight": 1.0, "relation_loss": "sp", "relation_pooling": "cls"}, "relation",
         "sp between the batch's cls-pooled representations of block pair last->last"),
        ({"relation_weight": 1.0, "relation_layer": "3->1"}, "relation", "block pair 3->1"),
        ({"teacher_noise_std": 0.5, "teacher_noise_fraction": 0.25}, "logits",
         "noisy teacher: additive Gaussian noise of std 0.5 on the teacher's logits of 25% of the rows"),
        ({"schedules": [{"field": "temperature", "start": 4.0, "end": 1.0}]}, "logits",
         "at temperature 4.0 between teacher and student logits"),
        ({"schedules": [{"field": "temperature", "start": 4.0, "end": 1.0, "kind": "cosine"}]}, "logits",
         "scheduled: temperature 4 -> 1 (cosine, steps 0-end)"),
        ({"relation_weight": 1.0, "schedules": ["field=relation_weight start=1 end=0.1 start_step=5 end_step=9"]},
         "relation", "scheduled: relation_weight 1 -> 0.1 (linear, steps 5-9)"),
    ],
)  # fmt: skip
def test_the_card_states_relations_noise_and_schedules(tmp_path, settings, term, says):
    from hf_distill.hub import loss_terms

    args = DistillationConfig(output_dir=str(tmp_path), logits_weight=0.5, **settings)
    (what,) = [what for name, _, what in loss_terms(args) if name == term]
    assert says in what


def test_the_card_states_a_scheduled_weight_and_temperature_as_configured_not_as_the_last_step_left_them(tmp_path):
    """The card is written after training, when the schedule callback has set args to the schedule's end values."""
    from transformers import TrainerControl, TrainerState

    from hf_distill.hub import loss_terms
    from hf_distill.schedules import TermSchedules, parse_schedules

    schedules = ["field=logits_weight start=0.8 end=0.3 kind=cosine", "field=temperature start=4 end=1"]
    args = DistillationConfig(output_dir=str(tmp_path), logits_weight=0.8, temperature=4.0, schedules=schedules)
    state = TrainerState(global_step=100, max_steps=100)
    TermSchedules(parse_schedules(args.schedules, args)).on_step_begin(args, state, TrainerControl())
    assert args.logits_weight == pytest.approx(0.3) and args.temperature == pytest.approx(1.0)  # the last step's
    (logits,) = [(weight, what) for name, weight, what in loss_terms(args) if name == "logits"]
    assert logits[0] == 0.8 and "at temperature 4.0 between" in logits[1]
    assert "scheduled: logits_weight 0.8 -> 0.3 (cosine, steps 0-end)" in logits[1]
    assert "scheduled: temperature 4 -> 1 (linear, steps 0-end)" in logits[1]
    # A weight scheduled up from 0 (the EMA recipe's warm-up) is a term of the run all the same.
    args = DistillationConfig(
        output_dir=str(tmp_path), logits_weight=0.5, schedules=["field=logits_weight start=0 end=0.5 end_step=50"]
    )
    (logits,) = [(weight, what) for name, weight, what in loss_terms(args) if name == "logits"]
    assert logits[0] == 0 and "scheduled: logits_weight 0 -> 0.5 (linear, steps 0-50)" in logits[1]
