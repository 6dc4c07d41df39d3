"""DistillationTrainer on tiny in-process models: terms logged, student trained, teacher frozen, checkpoints resume."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_distill import DistillationConfig, DistillationTrainer, make_student
from hf_distill.losses import kl_div_loss
from hf_distill.trainer import PROJECTIONS_NAME, NonFiniteLossError

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


def tiny_lm(arch: str, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A tiny causal LM over the tiny tokenizer's 64 ids, without dropout (so train-mode forwards are repeatable)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=64, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def lm_dataset(n: int = 16, prompt: int = 3) -> Dataset:
    """Token sequences of 5-11 ids whose first `prompt` tokens are a prompt (label -100), as in instruction tuning."""
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        ids = torch.randint(5, 64, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(rows)


def make_trainer(tmp_path, teacher, student, tokenizer, train_dataset=None, data_collator=None, **overrides):
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
        train_dataset=train_dataset if train_dataset is not None else tiny_dataset(tokenizer),
        eval_dataset=tiny_dataset(tokenizer, 16) if train_dataset is None else None,
        processing_class=tokenizer,
        data_collator=data_collator or DataCollatorWithPadding(tokenizer),
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


@pytest.mark.parametrize(
    "task, distill_on",
    [("sequence_classification", "labels"), ("causal_lm", "labels"), ("causal_lm", "all_tokens")],
)
def test_gradient_accumulation_matches_full_batch(tmp_path, tiny_tokenizer, task, distill_on):
    """Two micro-batches of 4 with accumulation give the same update as one batch of 8 (padding differs).

    For the causal LM, prompt tokens carry label -100: the window counts must count exactly the positions each term
    scores (labelled, shifted positions for the task and, with distill_on="labels", the logit term).
    """
    torch.manual_seed(0)
    if task == "causal_lm":
        tiny_teacher = tiny_lm("llama", hidden=32, layers=4, seed=0).eval()
        data = dict(train_dataset=lm_dataset(32), data_collator=DataCollatorForTokenClassification(tiny_tokenizer))
    else:
        no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        tiny_teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **no_dropout)).eval()
        data = {}
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        student = make_student(tiny_teacher, num_layers=2, verbose=False)
        trainer = make_trainer(
            tmp_path / f"ga{ga}",
            tiny_teacher,
            student,
            tiny_tokenizer,
            **data,
            distill_on=distill_on,
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


# --------------------------------------------------------------------------------------------------------------------
# Task kinds: PEFT causal LMs, regression, multi-label; the positions token-level KD scores
# --------------------------------------------------------------------------------------------------------------------

LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
LOGITS_AND_TASK = dict(hidden_weight=0.0, embeddings_weight=0.0, attention_weight=0.0)


def logged_terms(trainer) -> dict[str, float]:
    """Flush the trainer's term buffers through `log` and return what it logged."""
    trainer.log({})
    return trainer.state.log_history[-1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_causal_lm_student_trains_on_shifted_labels(tmp_path, tiny_tokenizer, arch):
    teacher = tiny_lm(arch, seed=0)
    student = get_peft_model(
        tiny_lm(arch, seed=1), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=LORA_TARGETS[arch])
    )
    collator = DataCollatorForTokenClassification(tiny_tokenizer)
    dataset = lm_dataset(16)
    trainer = make_trainer(
        tmp_path, teacher, student, tiny_tokenizer, dataset, collator, max_steps=2, save_strategy="no",
        **LOGITS_AND_TASK,
    )  # fmt: skip
    batch = collator([dataset[i] for i in range(4)])
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        # transformers' own causal-LM loss shifts the labels: token i + 1 is predicted at position i.
        expected = student(**batch).loss
    torch.testing.assert_close(torch.tensor(logged_terms(trainer)["loss_task"]), expected, rtol=1e-5, atol=1e-6)

    lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    trainer.train()
    assert lora_before and all(
        not torch.equal(p.detach(), lora_before[n]) for n, p in student.named_parameters() if p.requires_grad
    )


def test_bare_peft_model_is_refused_naming_the_task_type(tmp_path):
    student = get_peft_model(tiny_lm("llama", seed=1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"student is a bare PeftModel .*task_type=None.*task_type='CAUSAL_LM'"):
        DistillationTrainer(
            model=student,
            teacher_model=tiny_lm("llama", seed=0),
            args=DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        )


def no_dropout_bert(num_labels: int, seed: int, **kw):
    torch.manual_seed(seed)
    config = tiny_bert_config(num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return BertForSequenceClassification(config)


def head_dataset(tokenizer, labels) -> Dataset:
    data = tiny_dataset(tokenizer, len(labels)).remove_columns("labels")
    return data.add_column("labels", labels)


def test_regression_head_refuses_a_softmax_logit_loss(tmp_path):
    with pytest.raises(ValueError, match=r"logits_loss='kl' with a regression head .* Set logits_loss='mse'"):
        DistillationTrainer(
            model=no_dropout_bert(1, seed=1, num_layers=2, hidden=16),
            teacher_model=no_dropout_bert(1, seed=0),
            args=DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        )


def test_regression_terms_are_mse_to_the_labels_and_to_the_teacher(tmp_path, tiny_tokenizer):
    teacher, student = no_dropout_bert(1, seed=0), no_dropout_bert(1, seed=1, num_layers=2, hidden=16)
    dataset = head_dataset(tiny_tokenizer, [0.1 * i for i in range(8)])
    trainer = make_trainer(tmp_path, teacher, student, tiny_tokenizer, dataset, logits_loss="mse", **LOGITS_AND_TASK)
    assert trainer.problem_type == "regression"
    batch = DataCollatorWithPadding(tiny_tokenizer)([dataset[i] for i in range(8)])
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits, teacher(**inputs).logits
    logged = logged_terms(trainer)
    torch.testing.assert_close(torch.tensor(logged["loss_task"]), F.mse_loss(s.squeeze(-1), batch["labels"]))
    # Not the softmax KL over one output, which is identically 0.
    torch.testing.assert_close(torch.tensor(logged["loss_logits"]), F.mse_loss(s, t))
    assert logged["loss_logits"] > 0


def test_multi_label_terms_are_bce_and_per_class_sigmoid_kd(tmp_path, tiny_tokenizer):
    teacher, student = no_dropout_bert(3, seed=0), no_dropout_bert(3, seed=1, num_layers=2, hidden=16)
    multi_hot = [[float((i >> c) & 1) for c in range(3)] for i in range(8)]
    dataset = head_dataset(tiny_tokenizer, multi_hot)
    trainer = make_trainer(tmp_path, teacher, student, tiny_tokenizer, dataset, temperature=2.0, **LOGITS_AND_TASK)
    # Inferred from the float labels, as transformers does, and saved with the student for its pipelines.
    assert trainer.problem_type == student.config.problem_type == "multi_label_classification"
    batch = DataCollatorWithPadding(tiny_tokenizer)([dataset[i] for i in range(8)])
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits, teacher(**inputs).logits
    logged = logged_terms(trainer)
    torch.testing.assert_close(
        torch.tensor(logged["loss_task"]), F.binary_cross_entropy_with_logits(s, batch["labels"])
    )
    p, q = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
    binary_kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    torch.testing.assert_close(torch.tensor(logged["loss_logits"]), 4 * binary_kl.mean(), rtol=1e-5, atol=1e-6)


def token_classifiers():
    from transformers import BertConfig

    def make(hidden, layers, seed):
        torch.manual_seed(seed)
        return BertForTokenClassification(
            BertConfig(
                vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=5, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )  # fmt: skip

    return make(32, 4, 0), make(16, 2, 1)


@pytest.mark.parametrize("distill_on", ["labels", "all_tokens"])
@pytest.mark.parametrize("task", ["causal_lm", "token_classification"])
def test_token_level_kd_scores_the_labelled_positions(tmp_path, tiny_tokenizer, task, distill_on):
    """distill_on="labels": KD where labels != -100 (shifted for causal LMs), normalised by that count."""
    collator = DataCollatorForTokenClassification(tiny_tokenizer)
    dataset = lm_dataset(8)
    if task == "causal_lm":
        teacher, student = tiny_lm("llama", seed=0), tiny_lm("llama", hidden=16, seed=1)
    else:
        teacher, student = token_classifiers()
        # Sub-word style labels: a class on some tokens, -100 on the others.
        labels = [[(t % 5) if j % 2 == 0 else -100 for j, t in enumerate(ids)] for ids in dataset["input_ids"]]
        dataset = dataset.remove_columns("labels").add_column("labels", labels)
        dataset = dataset.add_column("token_type_ids", [[0] * len(ids) for ids in dataset["input_ids"]])
    trainer = make_trainer(
        tmp_path, teacher, student, tiny_tokenizer, dataset, collator, task_weight=0.0, logits_weight=1.0,
        temperature=2.0, distill_on=distill_on, **LOGITS_AND_TASK,
    )  # fmt: skip
    batch = collator([dataset[i] for i in range(8)])
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits, teacher(**inputs).logits
    labels = batch["labels"]
    if distill_on == "all_tokens":
        positions = batch["attention_mask"].bool()
    elif task == "causal_lm":  # the logits at i predict token i + 1
        positions = torch.zeros_like(labels, dtype=torch.bool)
        positions[:, :-1] = labels[:, 1:] != -100
    else:
        positions = labels != -100
    assert 0 < positions.sum() < batch["attention_mask"].sum() or distill_on == "all_tokens"
    expected = kl_div_loss(s[positions], t[positions], temperature=2.0)  # mean over the scored positions
    torch.testing.assert_close(torch.tensor(logged_terms(trainer)["loss_logits"]), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Per-term logging
# --------------------------------------------------------------------------------------------------------------------


def seq_batches(tokenizer, unlabelled_first: bool):
    rows = tiny_dataset(tokenizer, 8)
    first = [dict(rows[i], labels=-100) if unlabelled_first else rows[i] for i in range(4)]
    second = [rows[i] for i in range(4, 8)]
    collator = DataCollatorWithPadding(tokenizer)
    return collator(first), collator(second)


def test_a_micro_batch_without_labels_logs_the_exact_window_mean_and_an_empty_window_omits_the_term(
    tmp_path, tiny_tokenizer
):
    teacher, student = no_dropout_bert(2, seed=0), no_dropout_bert(2, seed=1, num_layers=2, hidden=16)
    trainer = make_trainer(tmp_path, teacher, student, tiny_tokenizer, **LOGITS_AND_TASK)
    trainer.model.train()
    first, second = seq_batches(tiny_tokenizer, unlabelled_first=True)
    counts = trainer._get_num_items_in_batch([first, second], trainer.args.device)
    with torch.no_grad():
        for batch in (first, second):
            trainer.compute_loss(trainer.model, batch, num_items_in_batch=counts)
        inputs = {k: v for k, v in second.items() if k != "labels"}
        expected = F.cross_entropy(student(**inputs).logits, second["labels"])
    logged = logged_terms(trainer)
    torch.testing.assert_close(torch.tensor(logged["loss_task"]), expected)  # the 4 labelled rows' mean, not NaN

    # A window without one labelled item: the task term is left out of the log, and the loss stays finite.
    counts = trainer._get_num_items_in_batch([first], trainer.args.device)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, first, num_items_in_batch=counts)
    logged = logged_terms(trainer)
    assert torch.isfinite(loss) and "loss_task" not in logged and math.isfinite(logged["loss_logits"])


def test_predict_terms_do_not_leak_into_the_next_evaluate(tmp_path, tiny_teacher, tiny_tokenizer):
    student = make_student(tiny_teacher, num_layers=2, verbose=False)
    trainer = make_trainer(
        tmp_path, tiny_teacher, student, tiny_tokenizer, max_steps=2, save_strategy="no", **LOGITS_AND_TASK
    )
    trainer.train()
    eval_data, other = tiny_dataset(tiny_tokenizer, 16), tiny_dataset(tiny_tokenizer, 48).select(range(16, 48))
    first = trainer.evaluate(eval_data)
    prediction = trainer.predict(other)
    second = trainer.evaluate(eval_data)
    for term in ("task", "logits"):
        assert second[f"eval_loss_{term}"] == pytest.approx(first[f"eval_loss_{term}"], rel=1e-6)
        assert math.isfinite(prediction.metrics[f"test_loss_{term}"])  # predict() reports its own terms
    assert prediction.metrics["test_loss_logits"] != pytest.approx(first["eval_loss_logits"], rel=1e-3)


def test_logged_terms_are_summed_over_processes(tmp_path, tiny_tokenizer, monkeypatch):
    teacher, student = no_dropout_bert(2, seed=0), no_dropout_bert(2, seed=1, num_layers=2, hidden=16)
    trainer = make_trainer(tmp_path, teacher, student, tiny_tokenizer, **LOGITS_AND_TASK)
    batch, _ = seq_batches(tiny_tokenizer, unlabelled_first=False)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    local = logged_terms(trainer)
    # A second process with the same item counts and three times the summed loss: the mean over both doubles.
    reduced = []

    def reduce(tensor, reduction="mean"):
        reduced.append(reduction)
        return tensor + tensor * torch.tensor([3.0, 1.0], dtype=tensor.dtype)

    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    both = logged_terms(trainer)
    assert reduced == ["sum"]  # one collective for all terms
    for term in ("loss_task", "loss_logits"):
        assert both[term] == pytest.approx(2 * local[term], rel=1e-6)


def test_compute_loss_reads_nothing_back_to_the_host(
    tmp_path, tiny_teacher, tiny_student, tiny_tokenizer, monkeypatch
):
    """No `.item()` / `float()` / `.tolist()` per term per micro-step: the terms stay on the device until the log."""
    trainer = make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer)
    batch, _ = seq_batches(tiny_tokenizer, unlabelled_first=False)
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    reads = []
    for name in ("item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch, num_items_in_batch=counts)
    monkeypatch.undo()
    assert reads == []
    assert set(logged_terms(trainer)) >= {f"loss_{t}" for t in ("task", "logits", "hidden", "embeddings", "attention")}


# --------------------------------------------------------------------------------------------------------------------
# Safety and projections
# --------------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_before_the_step_naming_the_term(
    tmp_path, tiny_teacher, tiny_student, tiny_tokenizer
):
    trainer = make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer)
    key = next(k for k in trainer.projections if k.startswith("hidden"))
    with torch.no_grad():
        trainer.projections[key].weight.fill_(float("nan"))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    with pytest.raises(
        NonFiniteLossError, match=r"not finite at step 1: non-finite term\(s\) hidden \(loss_task=[\d.]+, .*hidden=nan"
    ):
        trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), f"{name} was updated from a non-finite loss"
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_student_and_projections_are_clipped_by_one_global_norm(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer, max_grad_norm=1e-3)
    batch, _ = seq_batches(tiny_tokenizer, unlabelled_first=False)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    params = [p for p in [*trainer.model.parameters(), *trainer.projections.parameters()] if p.grad is not None]
    before = [p.grad.clone() for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    projection_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.projections.parameters()])
    )
    assert projection_norm > 1e-3 and total > projection_norm  # both parts would be clipped on their own

    returned = trainer._clip_grad_norm(trainer.model)
    torch.testing.assert_close(torch.as_tensor(returned).float(), total, rtol=1e-5, atol=0)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    torch.testing.assert_close(after, torch.tensor(1e-3), rtol=1e-4, atol=0)  # max_grad_norm applied once
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * (1e-3 / (total + 1e-6)), rtol=1e-5, atol=1e-12)


def test_projection_biases_get_no_weight_decay(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = [name for name, _ in trainer.projections.named_parameters()]
    assert any(n.endswith("bias") for n in names) and any(n.endswith("weight") for n in names)
    for name, param in trainer.projections.named_parameters():
        assert decay_of[id(param)] == (0.0 if name.endswith("bias") else 0.1), name


def test_resume_with_a_changed_layer_mapping_is_refused_naming_both(
    tmp_path, tiny_teacher, tiny_student, tiny_tokenizer
):
    hidden_only = dict(embeddings_weight=0.0, attention_weight=0.0, max_steps=2, save_steps=2)
    make_trainer(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer, **hidden_only).train()
    torch.manual_seed(1)
    fresh = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16))
    other = make_trainer(tmp_path, tiny_teacher, fresh, tiny_tokenizer, layer_mapping="0->0,2->1", **hidden_only)
    other.create_optimizer_and_scheduler(num_training_steps=2)
    with pytest.raises(
        ValueError,
        match=re.escape("layer matches ['hidden_t1_s0', 'hidden_t3_s1'], but this run matches ")
        + re.escape("['hidden_t0_s0', 'hidden_t2_s1'] (layer_mapping='0->0,2->1')"),
    ):
        other._load_optimizer_and_scheduler(str(tmp_path / "out" / "checkpoint-2"))
