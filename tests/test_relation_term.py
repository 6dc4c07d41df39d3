"""The relation term of DistillationTrainer (hf_distill.relation_term): pooling, the logged value against the pure
loss on the models' pooled outputs, its normalisation under gradient accumulation, the teacher cache, refusals."""

import math

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses.relations import RELATION_LOSSES
from hf_distill.relation_term import pool_hidden

RELATION_ONLY = dict(task_weight=0.0, logits_weight=0.0, relation_weight=1.0)


def bert(seed: int, **kw):
    torch.manual_seed(seed)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return BertForSequenceClassification(tiny_bert_config(**{**no_dropout, **kw}))


def dataset(tokenizer, n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(
            WORDS[j]
            for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]
    return Dataset.from_dict({**tokenizer(texts, truncation=True, max_length=16), "labels": [i % 2 for i in range(n)]})


def make_trainer(tmp_path, tokenizer, teacher=None, student=None, **overrides):
    defaults = dict(per_device_train_batch_size=8, max_steps=2, save_strategy="no", report_to="none", use_cpu=True)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), seed=0, **{**defaults, **RELATION_ONLY, **overrides})
    return DistillationTrainer(
        model=student if student is not None else bert(1, num_layers=2, hidden=16),
        teacher_model=teacher if teacher is not None else bert(0, num_layers=4, hidden=32),
        args=args,
        train_dataset=dataset(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def batch(tokenizer, rows: range):
    data = dataset(tokenizer)
    return DataCollatorWithPadding(tokenizer)([data[i] for i in rows])


def logged(trainer) -> dict[str, float]:
    trainer.log({})
    return trainer.state.log_history[-1]


# --------------------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------------------


def test_pooling_reads_the_attention_mask_on_either_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_hidden(hidden, right, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, right, "mean")[1], hidden[1].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, right, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_hidden(hidden, left, "cls"), torch.stack([hidden[0, 2], hidden[1, 0]]))
    torch.testing.assert_close(pool_hidden(hidden, None, "mean"), hidden.mean(1))
    # Padding never enters: changing the hidden states at padded positions changes nothing.
    changed = hidden.clone()
    changed[0, 2:] = 1e6
    torch.testing.assert_close(pool_hidden(changed, right, "mean"), pool_hidden(hidden, right, "mean"))


# --------------------------------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, pooling, layer",
    [("rkd", "mean", None), ("sp", "cls", None), ("rkd_distance", "mean", "1->0"), ("rkd_angle", "cls", "-2->0")],
)
def test_logged_relation_equals_the_pure_loss_on_the_models_pooled_outputs(
    tmp_path, tiny_tokenizer, loss, pooling, layer
):
    trainer = make_trainer(
        tmp_path, tiny_tokenizer, relation_loss=loss, relation_pooling=pooling, relation_layer=layer
    )
    inputs = batch(tiny_tokenizer, range(8))
    counts = trainer._get_num_items_in_batch([inputs], trainer.args.device)
    trainer.model.train()
    returned = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=counts)
    value = logged(trainer)["loss_relation"]

    t_layer, s_layer = (3, 1) if layer is None else (1, 0) if layer == "1->0" else (2, 0)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        s_hidden = trainer.model(**model_inputs, output_hidden_states=True).hidden_states[s_layer + 1]
        t_hidden = trainer.teacher(**model_inputs, output_hidden_states=True).hidden_states[t_layer + 1]
    mask = inputs["attention_mask"]
    expected = RELATION_LOSSES[loss](pool_hidden(s_hidden, mask, pooling), pool_hidden(t_hidden, mask, pooling))
    assert value == pytest.approx(expected.item(), rel=1e-5)
    assert returned.item() == pytest.approx(expected.item(), rel=1e-5)  # relation_weight = 1, the only term


def test_under_gradient_accumulation_each_micro_batch_counts_by_its_rows(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer)
    first, second = batch(tiny_tokenizer, range(5)), batch(tiny_tokenizer, range(5, 8))
    counts = trainer._get_num_items_in_batch([first, second], trainer.args.device)
    trainer.model.eval()
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, b, num_items_in_batch=counts) for b in (first, second)]
        alone = []
        for b in (first, second):
            alone.append(trainer.compute_loss(trainer.model, b).item())  # no counts: the micro-batch's own mean
    logged_value = logged(trainer)["loss_relation"]
    window = (5 * alone[0] + 3 * alone[1]) / 8
    assert sum(loss.item() for loss in losses) == pytest.approx(window, rel=1e-5)
    # The log holds the window's value followed by the two plain micro-batch values, each weighted by its rows.
    assert logged_value == pytest.approx((8 * window + 5 * alone[0] + 3 * alone[1]) / 16, rel=1e-5)


def test_trains_with_noise_and_schedules_the_teacher_untouched(tmp_path, tiny_tokenizer):
    teacher = bert(0, num_layers=4, hidden=32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(
        tmp_path,
        tiny_tokenizer,
        teacher=teacher,
        task_weight=0.5,
        logits_weight=0.5,
        relation_weight=10.0,
        teacher_noise_std=1.0,
        teacher_noise_fraction=0.5,
        schedules=["field=relation_weight start=10 start_step=1", {"field": "temperature", "start": 4.0, "end": 1.0}],
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
    )
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "loss_relation" not in history[0]  # relation_weight is 0 before step 1: the term is not computed
    assert all(math.isfinite(entry["loss_relation"]) for entry in history[1:]) and len(history) == 3
    assert trainer.args.temperature == pytest.approx(4.0 - 3.0 * 2 / 3)  # the value at the last step (2 of 3)
    assert all(torch.equal(v, before[k]) for k, v in trainer.teacher.state_dict().items())


@pytest.mark.parametrize(
    "matching",
    [
        dict(hidden_weight=1.0, layer_mapping="3->1"),  # the hidden-matching pair's layer is the relation's
        dict(hidden_weight=1.0, layer_mapping="1->0"),  # another layer: the cache holds the relation's too
        dict(logits_weight=0.5),  # no hidden matching at all: the cache holds the relation's layer alone
    ],
    ids=["relation layer matched", "other layer matched", "no hidden matching"],
)
def test_with_the_teacher_cache_the_relation_reads_the_cached_layer(tmp_path, tiny_tokenizer, matching):
    cached = dict(use_teacher_cache=True, teacher_cache_dtype="float32", **matching)
    trainer = make_trainer(tmp_path / "cached", tiny_tokenizer, **cached)
    live = make_trainer(tmp_path / "live", tiny_tokenizer, **matching)
    rows = [trainer.train_dataset[i] for i in range(8)]
    inputs = trainer.data_collator(rows)
    assert "teacher_cache_hidden_3" in inputs  # the relation's teacher layer (the last of 4)
    trainer.model.eval()
    live.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
        live.compute_loss(live.model, {k: v for k, v in inputs.items() if not k.startswith("teacher_cache_")})
    got, want = logged(trainer), logged(live)  # each call flushes the logged window
    assert got["loss_relation"] == pytest.approx(want["loss_relation"], rel=1e-4)
    if "hidden_weight" in matching:
        assert got["loss_hidden"] == pytest.approx(want["loss_hidden"], rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Refusals: (case, callable taking (tmp_path, tokenizer), message regex)
# --------------------------------------------------------------------------------------------------------------------


def config(**kw):
    return DistillationConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


REFUSALS = [
    ("unknown relation_loss", lambda p, t: config(relation_loss="rkd_dist"), r"relation_loss must be one of \["),
    ("unknown pooling", lambda p, t: config(relation_pooling="max"), r"relation_pooling must be one of .*'max'"),
    ("two relation pairs", lambda p, t: config(relation_layer="1->0,3->1"), r"relation_layer must be one 'teacher->"),
    ("a strategy as relation_layer", lambda p, t: config(relation_layer="last"), r"relation_layer must be one 'tea"),
    ("bad relation_layer syntax", lambda p, t: config(relation_layer="3-1"), r"one 'teacher->student' pair .*'3-1'"),
    (
        "relation layer outside the teacher",
        lambda p, t: make_trainer(p, t, relation_layer="4->1"),
        r"relation_layer='4->1' names teacher layer 4, outside the teacher's layers 0\.\.3",
    ),
    (
        "relation layer outside the student",
        lambda p, t: make_trainer(p, t, relation_layer="3->-3"),
        r"names student layer -3, outside the student's layers 0\.\.1",
    ),
]


@pytest.mark.parametrize("case, make, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(tmp_path, tiny_tokenizer, case, make, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, tiny_tokenizer)


def test_cls_pooling_of_a_causal_lm_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_distill.relation_term import build_relation_term

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    args = config(relation_weight=1.0, relation_pooling="cls")
    with pytest.raises(ValueError, match=r"relation_pooling='cls' takes each sequence's first token.*'mean'"):
        build_relation_term(args, lm, lm, [])
    assert build_relation_term(config(relation_weight=1.0), lm, lm, []).teacher_layer == 1
