"""DistillationTrainer on tiny in-process models: terms logged, student trained, teacher frozen, checkpoints resume."""

import math

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer, make_student
from hf_distill.trainer import PROJECTIONS_NAME

ALL_TERMS = dict(task_weight=0.5, logits_weight=0.5, hidden_weight=1.0, embeddings_weight=1.0, attention_weight=1.0)


def tiny_dataset(tokenizer, n: int = 32) -> Dataset:
    g = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        texts.append(" ".join(WORDS[j] for j in idx))
        labels.append(i % 2)
    enc = tokenizer(texts, truncation=True, max_length=16)
    return Dataset.from_dict({**enc, "labels": labels})


def make_trainer(tmp_path, teacher, student, tokenizer, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        **ALL_TERMS,
    )
    kwargs.update(overrides)
    args = DistillationConfig(**kwargs)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_dataset(tokenizer),
        eval_dataset=tiny_dataset(tokenizer, 16),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def test_trains_every_term_student_changes_teacher_frozen_checkpoint_written(
    tmp_path, tiny_teacher, tiny_student, tiny_tokenizer
):
    teacher_before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in tiny_student.named_parameters()}
    trainer = make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer)
    assert len(trainer.projections) > 0  # widths 16 vs 32: one projection per hidden pairing + embeddings
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for term in ("task", "logits", "hidden", "embeddings", "attention"):
        values = [entry[f"loss_{term}"] for entry in logged]
        assert values and all(math.isfinite(v) for v in values), term
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach().cpu(), student_before[name]), f"student parameter {name} did not change"
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value.cpu(), teacher_before[name]), f"teacher parameter {name} changed"
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    teacher_params = {id(p) for p in trainer.teacher.parameters()}
    assert all(id(p) not in teacher_params for g in trainer.optimizer.param_groups for p in g["params"])
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / PROJECTIONS_NAME).is_file()

    # The saved student is the student alone: no projection weights, loadable by plain transformers.
    trainer.save_model(str(tmp_path / "student"))
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "student")
    assert set(reloaded.state_dict()) == set(trainer.model.state_dict())
    assert not any("projection" in k for k in reloaded.state_dict())


def test_resume_restores_projections(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer)
    trainer.train()
    final = {k: v.clone() for k, v in trainer.projections.state_dict().items()}
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / PROJECTIONS_NAME, weights_only=True)
    saved.pop("layer_matches")

    torch.manual_seed(1)
    fresh_student = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16))
    resumed = make_trainer(tmp_path, tiny_teacher, fresh_student, tiny_tokenizer)
    resumed._load_optimizer_and_scheduler(None)  # no-op without a checkpoint
    resumed.create_optimizer_and_scheduler(num_training_steps=4)
    resumed._load_optimizer_and_scheduler(str(tmp_path / "out" / "checkpoint-2"))
    for k, v in resumed.projections.state_dict().items():
        torch.testing.assert_close(v.cpu(), saved[k])
    # And a full resume reaches the same final projections as the uninterrupted run.
    torch.manual_seed(1)
    resumed = make_trainer(
        tmp_path,
        tiny_teacher,
        BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16)),
        tiny_tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for k, v in resumed.projections.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=1e-4, atol=1e-5)


def test_student_from_teacher_needs_no_projections_and_evaluates(tmp_path, tiny_teacher, tiny_tokenizer):
    student = make_student(tiny_teacher, num_layers=2, verbose=False)
    trainer = make_trainer(tmp_path, tiny_teacher, student, tiny_tokenizer, max_steps=2)
    assert len(trainer.projections) == 0
    trainer.train()
    metrics = trainer.evaluate()
    for term in ("task", "logits", "hidden", "embeddings", "attention"):
        assert math.isfinite(metrics[f"eval_loss_{term}"])


def test_gradient_accumulation_matches_full_batch(tmp_path, tiny_tokenizer):
    """Two micro-batches of 4 with accumulation give the same update as one batch of 8 (padding differs)."""
    torch.manual_seed(0)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    tiny_teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **no_dropout)).eval()
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        student = make_student(tiny_teacher, num_layers=2, verbose=False)
        trainer = make_trainer(
            tmp_path / f"ga{ga}",
            tiny_teacher,
            student,
            tiny_tokenizer,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            save_strategy="no",
            learning_rate=1e-1,
            max_grad_norm=0.0,
            optim="sgd",
        )
        trainer.train()
        results.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


def test_columns_only_the_teacher_reads_survive_remove_unused_columns(tmp_path, tiny_teacher, tiny_tokenizer):
    """A BERT teacher reads token_type_ids; a DistilBERT student does not. The column must reach compute_loss."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    student = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    )
    trainer = make_trainer(
        tmp_path,
        tiny_teacher,
        student,
        tiny_tokenizer,
        hidden_weight=0.0,
        embeddings_weight=0.0,
        attention_weight=0.0,
        max_steps=1,
    )
    dataset = tiny_dataset(tiny_tokenizer).add_column("unused", list(range(32)))
    kept = trainer._remove_unused_columns(dataset)
    assert "token_type_ids" in kept.column_names and "unused" not in kept.column_names
    trainer.train()


def test_missing_segment_ids_for_a_model_that_reads_them_is_refused(
    tmp_path, tiny_teacher, tiny_student, tiny_tokenizer
):
    dataset = tiny_dataset(tiny_tokenizer).remove_columns("token_type_ids")
    with pytest.raises(ValueError, match="no token_type_ids column, but the teacher \\(bert\\) reads segment ids"):
        DistillationTrainer(
            model=tiny_student,
            teacher_model=tiny_teacher,
            args=DistillationConfig(output_dir=str(tmp_path)),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
