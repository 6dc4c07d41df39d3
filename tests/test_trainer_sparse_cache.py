"""DistillationTrainer with `teacher_cache_top_k_tail`: the logit term is the forward KL against the teacher's top-k +
tail ((k + 1)-bucket) distribution, `sparse_kl_loss`, whether the teacher is cached or runs live.

Cached training equals live training with the same settings (logged terms within 1e-5 relative, the student's
weights after 2 optimizer steps) for right and left padding, on a tiny Llama and a tiny BERT token classifier; the
term is `sparse_kl_loss` applied by hand to the shifted labelled positions; prompt, padding and last positions never
count; 2 accumulated micro-batches equal the full batch; the refusals (config, head, tuner, a stale cache
temperature); the run config and the model card record the field.
"""

import json

import pytest
import torch
from conftest import tiny_bert_config
from datasets import Dataset
from test_lm_losses import rel_diff
from test_trainer_lm import TERM_KEYS, batch_of, causal_lm, lm_dataset, perturb_uncounted, scored_positions
from transformers import BertForSequenceClassification, BertForTokenClassification, DataCollatorForTokenClassification

from hf_distill import (
    DataArguments,
    DistillationConfig,
    DistillationTrainer,
    ModelArguments,
    SparseTeacherLogits,
    TuneConfig,
    prepare_output_dir,
    run_settings,
    search_dimensions,
    sparse_kl_loss,
    sparse_teacher_distribution,
)
from hf_distill.hub import loss_terms
from hf_distill.resume import write_run_config

K, T = 5, 2.0
SPARSE = dict(teacher_cache_top_k=K, teacher_cache_top_k_tail=True)


def collator_for(tokenizer, padding_side: str = "right"):
    tokenizer.padding_side = padding_side
    return DataCollatorForTokenClassification(tokenizer)  # pads with id 0, label -100, mask 0


@pytest.fixture
def tokenizer(tiny_tokenizer):
    side = tiny_tokenizer.padding_side
    yield tiny_tokenizer
    tiny_tokenizer.padding_side = side


def make_trainer(tmp_path, teacher, student, collator, dataset=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, seed=0, per_device_train_batch_size=8,
        per_device_eval_batch_size=4, max_steps=1, save_strategy="no", logging_steps=1, learning_rate=1e-1,
        optim="sgd", max_grad_norm=0.0, task_weight=0.5, logits_weight=0.5, temperature=T, **SPARSE,
    )  # fmt: skip
    kwargs.update(overrides)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(**kwargs),
        train_dataset=dataset if dataset is not None else lm_dataset(8),
        data_collator=collator,
    )


def step_terms(trainer, batch):
    """One training step's logged terms on `batch`, and the student's gradients."""
    trainer.model.train()
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, batch, counts)
    trainer.log({})
    terms = {k: v for k, v in trainer.state.log_history[-1].items() if k in TERM_KEYS}
    return terms, {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}


def train_and_weights(trainer):
    trainer.train()
    logged = [{k: v for k, v in e.items() if k in TERM_KEYS} for e in trainer.state.log_history if "loss_logits" in e]
    return logged, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_runs_equal(actual, expected, tolerance=1e-5):
    (logged, weights), (want_logged, want_weights) = actual, expected
    assert len(logged) == len(want_logged) == 2
    for got, want in zip(logged, want_logged):
        assert got.keys() == want.keys()
        for key in got:
            assert rel_diff(torch.tensor(got[key]), torch.tensor(want[key])) <= tolerance, key
    for name in weights:
        assert rel_diff(weights[name], want_weights[name]) <= tolerance, name


def token_dataset(n: int = 8) -> Dataset:
    """Token classification rows over a 64-id vocabulary, 3 classes, the first token unlabelled (-100)."""
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        rows["input_ids"].append(torch.randint(5, 64, (length,), generator=g).tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] + torch.randint(0, 3, (length - 1,), generator=g).tolist())
    return Dataset.from_dict(rows)


def bert_tokens(num_layers: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    config = tiny_bert_config(num_layers=num_layers, hidden=hidden, num_labels=3, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForTokenClassification(config)


# --------------------------------------------------------------------------------------------------------------------
# Cached equals live, and both equal the pure loss on the scored positions
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cached_sparse_training_equals_the_live_path(tmp_path, tokenizer, padding_side):
    collator = collator_for(tokenizer, padding_side)
    runs = {}
    for cached in (True, False):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        # Batches of 4 here against build batches of 8 rows: the cache is read back into other paddings.
        trainer = make_trainer(
            tmp_path / str(cached), teacher, student, collator, per_device_train_batch_size=4, max_steps=2,
            use_teacher_cache=cached,
        )  # fmt: skip
        assert (trainer.teacher_cache is not None) == cached
        runs[cached] = train_and_weights(trainer)
    assert_runs_equal(runs[True], runs[False])


def test_cached_sparse_training_equals_the_live_path_for_a_token_classifier(tmp_path, tokenizer):
    collator = collator_for(tokenizer)
    runs = {}
    for cached in (True, False):
        teacher, student = bert_tokens(4, 32, seed=0).eval(), bert_tokens(2, 16, seed=1)
        trainer = make_trainer(
            tmp_path / str(cached), teacher, student, collator, token_dataset(8), per_device_train_batch_size=4,
            max_steps=2, use_teacher_cache=cached, teacher_cache_top_k=2,
        )  # fmt: skip
        runs[cached] = train_and_weights(trainer)
    assert_runs_equal(runs[True], runs[False])


@pytest.mark.parametrize("cached", [False, True])
def test_the_term_is_sparse_kl_loss_on_the_shifted_labelled_positions(tmp_path, tokenizer, cached):
    collator = collator_for(tokenizer)
    teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
    batch = batch_of(collator)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits, teacher(**inputs).logits
    positions = scored_positions(batch)
    assert 0 < positions.sum() < batch["attention_mask"].sum()  # prompts, padding and last positions are left out
    ids, logprobs, tail = sparse_teacher_distribution(t, K, temperature=T)
    expected = sparse_kl_loss(s, ids, logprobs, tail, positions, temperature=T)
    # By construction a lower bound of the full KL against the same teacher.
    full = torch.nn.functional.kl_div(
        torch.log_softmax(s[positions] / T, -1), torch.log_softmax(t[positions] / T, -1), log_target=True,
        reduction="batchmean",
    ) * T**2  # fmt: skip
    assert 0 < expected < full

    trainer = make_trainer(tmp_path, teacher, student, collator, use_teacher_cache=cached)
    if cached:  # the same rows, read back from the cache
        dataset = trainer.train_dataset
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        assert "teacher_cache_topk_logprobs" in batch and "teacher_cache_logits" not in batch
    terms, _ = step_terms(trainer, batch)
    assert rel_diff(torch.tensor(terms["loss_logits"]), expected) <= 1e-5


@pytest.mark.parametrize("cached", [False, True])
def test_prompt_padding_and_last_positions_never_count(tmp_path, tokenizer, cached):
    collator = collator_for(tokenizer)
    results = []
    for perturbed in (False, True):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        trainer = make_trainer(tmp_path / str(perturbed), teacher, student, collator, use_teacher_cache=cached)
        dataset = trainer.train_dataset
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        keep = scored_positions(batch)
        if cached and perturbed:  # the cached teacher's values at uncounted positions are garbage too
            for name in ("teacher_cache_topk_logprobs", "teacher_cache_topk_tail_logprob"):
                batch[name] = torch.where(keep[..., None], batch[name], torch.full_like(batch[name], -3.0))
        handles = [perturb_uncounted(m, keep) for m in (student, teacher)] if perturbed else []
        results.append(step_terms(trainer, batch))
        for handle in handles:
            handle.remove()
    (terms, grads), (want_terms, want_grads) = results[1], results[0]
    assert terms == pytest.approx(want_terms, rel=1e-6)
    for name in grads:
        assert rel_diff(grads[name], want_grads[name]) <= 1e-6, name


def test_gradient_accumulation_equals_the_full_batch(tmp_path, tokenizer):
    collator = collator_for(tokenizer)
    weights = []
    for batch_size, steps in ((8, 1), (4, 2)):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        trainer = make_trainer(
            tmp_path / str(batch_size), teacher, student, collator, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=steps, use_teacher_cache=True,
        )  # fmt: skip
        trainer.train()
        logits_term = next(e["loss_logits"] for e in trainer.state.log_history if "loss_logits" in e)
        weights.append((logits_term, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (term, full), (want_term, accumulated) = weights
    assert rel_diff(torch.tensor(term), torch.tensor(want_term)) <= 1e-5
    for name in full:
        assert rel_diff(accumulated[name], full[name]) <= 1e-5, name


def test_evaluation_runs_the_teacher_live_and_measures_the_same_term(tmp_path, tokenizer):
    collator = collator_for(tokenizer)
    teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
    trainer = make_trainer(tmp_path, teacher, student, collator, use_teacher_cache=True)
    trainer.eval_dataset = lm_dataset(8)
    metrics = trainer.evaluate()
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    assert "teacher_cache_topk_logprobs" in batch
    terms, _ = step_terms(trainer, batch)  # the same rows, the cached teacher
    assert rel_diff(torch.tensor(metrics["eval_loss_logits"]), torch.tensor(terms["loss_logits"])) <= 1e-5


# --------------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------------

CONFIG_REFUSALS = [
    ({"teacher_cache_top_k": None}, r"teacher_cache_top_k_tail=True .* teacher_cache_top_k is None\. Set"),
    ({"logits_loss": "jsd"}, r"teacher_cache_top_k_tail=True .* logits_loss='jsd'\. Set logits_loss='kl'"),
    ({"logits_loss": "mse", "use_teacher_cache": True}, r"logits_loss='mse'\. Set logits_loss='kl'"),
    ({"fused_lm_head": True}, r"teacher_cache_top_k_tail=True .* fused_lm_head=True .* Set fused_lm_head=False"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_REFUSALS, ids=["no-top-k", "jsd", "mse", "fused"])
def test_config_refuses_the_tail_where_it_has_no_meaning(overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="unused", report_to="none", **{**SPARSE, **overrides})


@pytest.mark.parametrize("num_labels, problem_type", [(1, "regression"), (3, "multi_label_classification")])
def test_regression_and_multi_label_heads_are_refused_before_training(tmp_path, tokenizer, num_labels, problem_type):
    models = []
    for seed, layers in ((0, 4), (1, 2)):
        torch.manual_seed(seed)
        models.append(BertForSequenceClassification(tiny_bert_config(num_layers=layers, num_labels=num_labels,
                                                                     problem_type=problem_type)))  # fmt: skip
    data = Dataset.from_dict({"input_ids": [[2, 7, 3]] * 4, "attention_mask": [[1, 1, 1]] * 4})
    with pytest.raises(ValueError, match=rf"teacher_cache_top_k_tail=True .* {problem_type} head .* Set "):
        make_trainer(tmp_path, models[0], models[1], collator_for(tokenizer), data)


def test_a_cache_at_another_temperature_is_refused_at_compute_time(tmp_path, tokenizer):
    collator = collator_for(tokenizer)
    teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
    trainer = make_trainer(tmp_path, teacher, student, collator, use_teacher_cache=True)
    assert trainer.teacher_cache_temperature == T
    trainer.args.temperature = 1.0  # what a hyperparameter-search trial does to args
    with pytest.raises(ValueError, match=r"temperature=2\.0, but this run has temperature=1\.0.* Keep temperature"):
        trainer.train()


def test_the_tuner_refuses_searching_the_temperature_of_a_sparse_cache():
    args = DistillationConfig(output_dir="unused", report_to="none", use_teacher_cache=True, **SPARSE)
    tune = TuneConfig(temperature_range="1,8", alpha_range="none", learning_rate_range="none")
    with pytest.raises(
        ValueError, match=r"temperature_range='1,8' .* teacher_cache_top_k_tail=True .*\(temperature_range=none\)"
    ):
        search_dimensions(tune, args)
    # A fixed temperature, the tail off, or a live teacher can be searched.
    assert search_dimensions(TuneConfig(temperature_range="none"), args)
    for overrides in ({"teacher_cache_top_k_tail": False}, {"use_teacher_cache": False}):
        other = DistillationConfig(output_dir="unused", report_to="none", **{**SPARSE, "use_teacher_cache": True,
                                                                             **overrides})  # fmt: skip
        assert [d.name for d in search_dimensions(tune, other)] == ["temperature"]


# --------------------------------------------------------------------------------------------------------------------
# What records the field
# --------------------------------------------------------------------------------------------------------------------


def test_a_resume_with_another_tail_setting_is_refused(tmp_path):
    def settings(tail: bool) -> dict:
        return run_settings(
            ModelArguments(teacher_model_name_or_path="t"),
            DataArguments(train_file="train.tsv"),
            DistillationConfig(
                output_dir="unused", report_to="none", teacher_cache_top_k=K, teacher_cache_top_k_tail=tail
            ),  # fmt: skip
            train_rows=8,
        )

    assert settings(True)["teacher_cache_top_k_tail"] is True
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    write_run_config(str(checkpoint), settings(False))
    with pytest.raises(ValueError, match=r"(?s)refusing to resume.*teacher_cache_top_k_tail: False -> True"):
        prepare_output_dir(str(tmp_path), settings(True))


def test_the_model_card_says_the_teacher_was_sparse():
    args = DistillationConfig(output_dir="unused", report_to="none", **SPARSE)
    (logits,) = [what for term, _, what in loss_terms(args) if term == "logits"]
    assert f"top-{K} probabilities plus the tail mass" in logits
    plain = DistillationConfig(output_dir="unused", report_to="none", teacher_cache_top_k=K)
    assert "tail" not in [what for term, _, what in loss_terms(plain) if term == "logits"][0]


def test_sparse_names_are_exported():
    import hf_distill
    import hf_distill.cache
    import hf_distill.losses

    assert hf_distill.SparseTeacherLogits is hf_distill.cache.SparseTeacherLogits is SparseTeacherLogits
    for name in ("sparse_kl_loss", "sparse_teacher_distribution"):
        assert getattr(hf_distill, name) is getattr(hf_distill.losses, name)
        assert name in hf_distill.__all__ and name in hf_distill.losses.__all__
    assert "SparseTeacherLogits" in hf_distill.__all__
