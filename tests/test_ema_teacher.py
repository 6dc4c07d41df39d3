"""Self-distillation from an EMA-of-the-student teacher (hf_distill.ema_teacher) on tiny in-process BERTs: the update
rule step by step against a hand-computed reference, one update per optimizer step, the KD target, no gradient, resume,
the saved student, the model card, refusals."""

import os
import shutil

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, DataCollatorWithPadding, TrainerCallback

import hf_distill.ema_teacher as ema_module
from hf_distill import DistillationConfig, DistillationTrainer, build_ema_teacher, ema_update_
from hf_distill.ema_teacher import EMA_TEACHER_NAME, check_ema_engine
from hf_distill.hub import TRAINING_ONLY_PATTERN, is_allowed_file, loss_terms, save_student_from_trainer
from hf_distill.losses import kl_div_loss

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def student(seed: int = 1, **kw) -> BertForSequenceClassification:
    """2-layer BERT classifier, hidden 16; without dropout unless `kw` says otherwise (train mode = eval mode)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, **{**NO_DROPOUT, **kw}))


def dataset(tokenizer, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(
            WORDS[j]
            for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]
    return Dataset.from_dict({**tokenizer(texts, truncation=True, max_length=16), "labels": [i % 2 for i in range(n)]})


def ema_trainer(tmp_path, tokenizer, model=None, n: int = 16, teacher_model=None, out: str = "out", **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        task_weight=0.5,
        logits_weight=0.5,
        ema_teacher=True,
        ema_decay=0.9,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return DistillationTrainer(
        model=model if model is not None else student(),
        teacher_model=teacher_model,
        args=DistillationConfig(**kwargs),
        train_dataset=dataset(tokenizer, n),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class Record(TrainerCallback):
    """Snapshots of the student and the teacher at the run's start and after every optimizer step (added after the
    trainer's own callbacks, so it sees the teacher already updated)."""

    def __init__(self, trainer):
        self.trainer, self.students, self.teachers = trainer, [], []

    def _snap(self, model):
        self.students.append(params(model))
        self.teachers.append(params(self.trainer.teacher))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._snap(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snap(model)


@pytest.mark.parametrize(
    "decay, accumulation, start_step",
    [(0.9, 1, 0), (0.9, 2, 0), (0.5, 1, 2), (0.0, 1, 0)],
    ids=["decay0.9", "decay0.9-accumulate2", "decay0.5-start2", "decay0"],
)
def test_after_each_optimizer_step_the_teacher_is_the_ema_of_the_student(
    tmp_path, tiny_tokenizer, monkeypatch, decay, accumulation, start_step
):
    updates = []
    real_update = ema_module.ema_update_
    monkeypatch.setattr(ema_module, "ema_update_", lambda *a: updates.append(1) or real_update(*a))
    trainer = ema_trainer(
        tmp_path,
        tiny_tokenizer,
        student(hidden_dropout_prob=0.1),  # dropout in the student; the teacher runs without it
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
        ema_decay=decay,
        ema_start_step=start_step,
    )
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train()

    steps = trainer.state.global_step
    assert steps == 4 and len(record.teachers) == steps + 1
    assert updates == [1] * (steps - start_step)  # one update per optimizer step, not per micro-batch
    assert all(torch.equal(record.teachers[0][k], v) for k, v in record.students[0].items())  # starts as a copy
    for step in range(1, steps + 1):
        old, now, s = record.teachers[step - 1], record.teachers[step], record.students[step]
        assert any(not torch.equal(s[k], record.students[step - 1][k]) for k in s), f"student unchanged at {step}"
        for name, value in now.items():
            expected = s[name] if step <= start_step else decay * old[name] + (1 - decay) * s[name]
            assert torch.equal(value, expected), f"step {step}: teacher {name} is not the EMA of the student"
    assert not trainer.teacher.training  # dropout off in the teacher, on in the student


def test_the_kd_term_is_taken_against_the_current_teacher_from_the_initial_copy_on(tmp_path, tiny_tokenizer):
    # One batch of all 8 rows per step (in shuffled order: the row mean does not depend on it), no dropout: the logit
    # term logged at step k is the KL from the teacher after step k - 1 to the student after step k - 1.
    trainer = ema_trainer(
        tmp_path, tiny_tokenizer, n=8, per_device_train_batch_size=8, max_steps=3, ema_decay=0.5, temperature=2.0
    )
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train()
    logged = {e["step"]: e["loss_logits"] for e in trainer.state.log_history if "loss_logits" in e}
    assert sorted(logged) == [1, 2, 3]

    batch = DataCollatorWithPadding(tiny_tokenizer)([dict(r) for r in trainer.train_dataset])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    model = student()
    for step in (1, 2, 3):
        with torch.no_grad():
            model.load_state_dict(record.students[step - 1], strict=False)
            s_logits = model(**batch).logits
            model.load_state_dict(record.teachers[step - 1], strict=False)
            t_logits = model(**batch).logits
        expected = kl_div_loss(s_logits, t_logits, temperature=2.0)
        torch.testing.assert_close(torch.tensor(logged[step]), expected, rtol=1e-4, atol=1e-7)
    assert logged[1] < 1e-6 < logged[2]  # step 1: the teacher is the initial copy of the student


def test_the_teacher_gets_no_gradient_and_is_not_trained(tmp_path, tiny_tokenizer, tiny_teacher):
    given = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    trainer = ema_trainer(tmp_path, tiny_tokenizer, teacher_model=tiny_teacher, hidden_weight=1.0)
    assert trainer.teacher is not tiny_teacher and trainer.teacher is not trainer.model
    assert type(trainer.teacher) is type(trainer.model) and len(trainer.projections) == 0  # a copy of the student
    trainer.train()
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    teacher_ids = {id(p) for p in trainer.teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in trainer.optimizer.param_groups for p in g["params"])
    assert not any(
        p.data_ptr() == q.data_ptr() for p in trainer.teacher.parameters() for q in trainer.model.parameters()
    )
    assert "loss_hidden" in trainer.state.log_history[0]
    # The teacher_model passed in is not distilled from, and left as it was.
    assert all(torch.equal(v, given[k]) for k, v in tiny_teacher.state_dict().items())
    assert all(p.requires_grad for p in tiny_teacher.parameters())


def test_resume_reaches_the_uninterrupted_student_and_teacher(tmp_path, tiny_tokenizer):
    run = dict(max_steps=6, save_strategy="steps", save_steps=2, ema_decay=0.7, hidden_weight=1.0)
    full = ema_trainer(tmp_path, tiny_tokenizer, student(), **run)
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = load_file(checkpoint / EMA_TEACHER_NAME)
    assert set(saved) == set(full.teacher.state_dict())
    assert set(load_file(checkpoint / "model.safetensors")) == set(full.model.state_dict())  # the student alone

    resumed = ema_trainer(tmp_path, tiny_tokenizer, student(), out="resumed", **run)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_student, final_teacher = params(full.model), params(full.teacher)
    assert any(not torch.equal(final_teacher[k], v) for k, v in final_student.items())  # the teacher lags behind
    for name, value in resumed.model.named_parameters():
        torch.testing.assert_close(value.detach(), final_student[name], rtol=1e-5, atol=1e-6)
    for name, value in resumed.teacher.named_parameters():
        torch.testing.assert_close(value, final_teacher[name], rtol=1e-5, atol=1e-6)

    bare = tmp_path / "bare-checkpoint"
    shutil.copytree(checkpoint, bare)
    os.remove(bare / EMA_TEACHER_NAME)
    again = ema_trainer(tmp_path, tiny_tokenizer, student(), out="again", **run)
    with pytest.raises(FileNotFoundError, match=rf"has no {EMA_TEACHER_NAME}, but this run distils from an EMA"):
        again.train(resume_from_checkpoint=str(bare))


def test_the_saved_student_holds_no_teacher_weights_and_the_card_names_the_ema(tmp_path, tiny_tokenizer):
    trainer = ema_trainer(tmp_path, tiny_tokenizer, max_steps=2, ema_start_step=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(trainer.model.state_dict())
    assert not (tmp_path / "saved" / EMA_TEACHER_NAME).exists()
    folder = save_student_from_trainer(trainer, tmp_path / "student", "card")
    assert all(is_allowed_file(name) for name in os.listdir(folder)) and EMA_TEACHER_NAME not in os.listdir(folder)
    assert set(load_file(os.path.join(folder, "model.safetensors"))) == set(trainer.model.state_dict())
    assert not is_allowed_file(EMA_TEACHER_NAME) and TRAINING_ONLY_PATTERN.fullmatch(EMA_TEACHER_NAME)
    terms = dict((term, what) for term, _, what in loss_terms(trainer.args))
    assert "moving average of the student (decay 0.9, a copy of the student through step 1" in terms["logits"]
    assert "moving average" not in terms["task"]


def test_ema_update_is_the_formula_and_copies_buffers_and_frozen_parameters():
    s = student(seed=3)
    t = build_ema_teacher(student(seed=4))
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    s.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = params(t)
    ema_update_(t, s, 0.25)
    for name, value in t.named_parameters():
        theirs = dict(s.named_parameters())[name].detach()
        expected = theirs if name == "bert.embeddings.word_embeddings.weight" else 0.25 * before[name] + 0.75 * theirs
        assert torch.equal(value, expected), name
    for (name, value), (_, theirs) in zip(t.named_buffers(), s.named_buffers()):
        assert torch.equal(value, theirs), name
    with pytest.raises(ValueError, match="the EMA teacher's parameters do not match the student's"):
        ema_update_(t, BertForSequenceClassification(tiny_bert_config(num_layers=1, hidden=16)), 0.5)


def test_a_model_init_run_starts_its_teacher_from_its_own_student(tmp_path, tiny_tokenizer):
    seeds = iter([1, 2])
    trainer = DistillationTrainer(
        model_init=lambda: student(seed=next(seeds)),
        args=DistillationConfig(
            output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, ema_teacher=True,
            ema_decay=0.5, save_strategy="no", per_device_train_batch_size=4,
        ),
        train_dataset=dataset(tiny_tokenizer, 8),
        processing_class=tiny_tokenizer,
        data_collator=DataCollatorWithPadding(tiny_tokenizer),
    )  # fmt: skip
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train()  # a second student (seed 2), not the one __init__ built
    second = params(student(seed=2))
    assert all(torch.equal(record.teachers[0][k], v) for k, v in second.items())


CONFIG_REFUSALS = [
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\), got 1.0\. .* use e\.g\. 0\.999"),
    (dict(ema_decay=-0.1), r"ema_decay must be in \[0, 1\), got -0.1"),
    (dict(ema_start_step=-1), r"ema_start_step must be an int >= 0, got -1.*Use e\.g\. 0"),
    (dict(ema_start_step=2.5), r"ema_start_step must be an int >= 0, got 2\.5"),
    (
        dict(use_teacher_cache=True),
        r"use_teacher_cache=True cannot be used with ema_teacher=True: a cache stores one fixed teacher's outputs.*"
        r"Set use_teacher_cache=False",
    ),
    (
        dict(teacher_weights=[1.0]),
        r"teacher_weights=\[1\.0\] cannot be used with ema_teacher=True.*teacher_weights=None",
    ),
    (
        dict(intermediate_teacher=1),
        r"intermediate_teacher=1 cannot be used with ema_teacher=True.*intermediate_teacher=0",
    ),
    (
        dict(teacher_dtype="bfloat16"),
        r"teacher_dtype='bfloat16' cannot be used with ema_teacher=True.*teacher_dtype=None",
    ),
]


@pytest.mark.parametrize("overrides, message", CONFIG_REFUSALS, ids=[str(o) for o, _ in CONFIG_REFUSALS])
def test_bad_ema_settings_are_refused_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, ema_teacher=True, **overrides)


def test_ema_fields_without_ema_teacher_are_range_checked_only(tmp_path):
    DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, ema_decay=0.5, use_teacher_cache=True)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, ema_decay=1.5)


def test_several_teachers_and_sharded_students_are_refused(tmp_path, tiny_tokenizer, tiny_teacher):
    with pytest.raises(
        ValueError, match=r"teacher_model is a list of 2 models, but ema_teacher=True distils from one"
    ):
        ema_trainer(tmp_path, tiny_tokenizer, teacher_model=[tiny_teacher, tiny_teacher])
    trainer = ema_trainer(tmp_path, tiny_tokenizer)
    for engine in ("is_fsdp_enabled", "is_deepspeed_enabled"):
        setattr(trainer, engine, True)
        with pytest.raises(ValueError, match=r"ema_teacher=True updates a full copy of the student .* Train with DDP"):
            check_ema_engine(trainer)
        setattr(trainer, engine, False)
