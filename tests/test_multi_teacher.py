"""Multi-teacher distillation (issue 10 item 3, hf_distill.multi_teacher): the mixture target against slow references,
the trainer's logged terms against hand-computed ones and against single-teacher runs, the intermediate teacher, the
teachers kept frozen, the script loading several teachers, and every refusal."""

import copy
import importlib.util
import os

import pytest
import torch
from conftest import WORDS, tiny_bert_config, write_tiny_tsv
from datasets import Dataset
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    BertTokenizerFast,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_distill import (
    DistillationConfig,
    DistillationTrainer,
    ModelArguments,
    average_teacher_logits,
    load_extra_teachers,
    mix_teacher_distributions,
)
from hf_distill.losses import KD_LOGIT_LOSSES, binary_kl_div_loss, kl_div_loss
from hf_distill.multi_teacher import check_teacher_labels
from hf_distill.preflight import forward_arg_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
SOFTMAX_LOSSES = [name for name in KD_LOGIT_LOSSES if name != "mse"]


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def reference_mixture(logits_list, weights, temperature):
    """sum_i w_i softmax(z_i / T), one row at a time with plain Python sums."""
    total = sum(weights)
    rows = []
    for r in range(logits_list[0].reshape(-1, logits_list[0].shape[-1]).shape[0]):
        row = 0
        for z, w in zip(logits_list, weights):
            flat = z.reshape(-1, z.shape[-1])[r].double()
            e = torch.exp(flat / temperature - (flat / temperature).max())
            row = row + (w / total) * e / e.sum()
        rows.append(row)
    return torch.stack(rows).reshape(logits_list[0].shape)


# --------------------------------------------------------------------------------------------------------------------
# The target
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 7)])
def test_the_mixture_is_the_weighted_average_of_the_softened_probabilities(temperature, shape):
    zs = [logits(*shape, seed=s) for s in range(3)]
    weights = [2.0, 6.0, 0.5]
    mixed = mix_teacher_distributions(zs, weights, temperature)
    assert mixed.dtype == torch.float32 and mixed.shape == zs[0].shape
    expected = reference_mixture(zs, weights, temperature)
    # What a logit loss makes of the returned logits at T: the mixture itself, not re-softened.
    torch.testing.assert_close(torch.softmax(mixed / temperature, -1).double(), expected, rtol=1e-5, atol=1e-7)
    # The weights are normalised: only their ratios count.
    torch.testing.assert_close(mix_teacher_distributions(zs, [w / 8.5 for w in weights], temperature), mixed)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_against_the_mixture_matches_a_slow_reference(temperature):
    za, zb, s = logits(8, 5, seed=0), logits(8, 5, seed=1), logits(8, 5, seed=2)
    loss = kl_div_loss(s, mix_teacher_distributions([za, zb], [1.0, 3.0], temperature), temperature=temperature)
    m = reference_mixture([za, zb], [1.0, 3.0], temperature)
    log_q = torch.log_softmax(s.double() / temperature, -1)
    expected = temperature**2 * (m * (m.log() - log_q)).sum(-1).mean()  # KL(mixture || student) x T², batchmean
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_every_softmax_divergence_compares_the_student_with_the_mixture(name):
    za, zb, s = logits(4, 3, 6, seed=0), logits(4, 3, 6, seed=1), logits(4, 3, 6, seed=2)
    m = reference_mixture([za, zb], [1.0, 1.0], 2.0).float()
    loss_fn = KD_LOGIT_LOSSES[name]
    # 2 * log m: logits whose softmax at T = 2 is exactly the reference mixture.
    torch.testing.assert_close(
        loss_fn(s, mix_teacher_distributions([za, zb], [1.0, 1.0], 2.0), temperature=2.0),
        loss_fn(s, 2.0 * m.log(), temperature=2.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_identical_teachers_give_that_teachers_distribution():
    z, s = logits(6, 5), logits(6, 5, seed=1)
    mixed = mix_teacher_distributions([z, z.clone()], [1.0, 1.0], 2.0)
    torch.testing.assert_close(torch.softmax(mixed / 2, -1), torch.softmax(z / 2, -1))
    torch.testing.assert_close(kl_div_loss(s, mixed, temperature=2.0), kl_div_loss(s, z, temperature=2.0))


def test_a_teacher_of_weight_zero_is_left_out():
    za, zb = logits(6, 5), logits(6, 5, seed=1)
    zb[0, 0] = float("nan")  # never read
    torch.testing.assert_close(
        torch.softmax(mix_teacher_distributions([za, zb], [1.0, 0.0], 2.0) / 2, -1), torch.softmax(za / 2, -1)
    )


def test_minus_infinity_entries():
    za, zb = logits(3, 5), logits(3, 5, seed=1)
    za[:, 4] = zb[:, 4] = float("-inf")  # masked in both: probability 0 in the mixture
    za[:, 3] = float("-inf")  # masked in one only: the other teacher's share remains
    mixed = mix_teacher_distributions([za, zb], [1.0, 1.0], 2.0)
    assert torch.isneginf(mixed[:, 4]).all() and torch.isfinite(mixed[:, :4]).all()
    assert torch.isfinite(kl_div_loss(logits(3, 5, seed=2), mixed, temperature=2.0))


def test_multi_label_mixes_each_classs_bernoulli_probability():
    za, zb, s = logits(8, 3, seed=0), logits(8, 3, seed=1), logits(8, 3, seed=2)
    mixed = mix_teacher_distributions([za, zb], [1.0, 3.0], 2.0, multi_label=True)
    p = 0.25 * torch.sigmoid(za.double() / 2) + 0.75 * torch.sigmoid(zb.double() / 2)
    torch.testing.assert_close(torch.sigmoid(mixed.double() / 2), p, rtol=1e-5, atol=1e-7)
    q = torch.sigmoid(s.double() / 2)
    binary_kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    torch.testing.assert_close(
        binary_kl_div_loss(s, mixed, temperature=2.0).double(), 4 * binary_kl.mean(), rtol=1e-5, atol=1e-6
    )


def test_averaging_logits_is_a_different_target_the_geometric_mean():
    za, zb = logits(6, 5), logits(6, 5, seed=1)
    averaged = average_teacher_logits([za, zb.bfloat16()], [1.0, 3.0])
    assert averaged.dtype == torch.float32
    torch.testing.assert_close(averaged, 0.25 * za + 0.75 * zb.bfloat16().float())
    geometric = torch.softmax(0.25 * torch.log_softmax(za / 2, -1) + 0.75 * torch.log_softmax(zb / 2, -1), -1)
    torch.testing.assert_close(torch.softmax(average_teacher_logits([za, zb], [1, 3]) / 2, -1), geometric)
    arithmetic = torch.softmax(mix_teacher_distributions([za, zb], [1.0, 3.0], 2.0) / 2, -1)
    assert not torch.allclose(arithmetic, geometric, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------------------------------


def bert(seed, **kw):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**{**NO_DROPOUT, **kw}))


def distilbert(seed, dim=24, layers=3, **kw):
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=64,
        dim=dim,
        n_layers=layers,
        n_heads=4,
        hidden_dim=2 * dim,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        **kw,
    )
    return DistilBertForSequenceClassification(config)


def confident(model, scale=40.0):
    """`model` with its classifier scaled up: logits of a few units, as a trained teacher's, so the KL terms are not
    differences of nearly equal numbers (tiny random models give logits of ~0.01)."""
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    return model


def teacher_a():
    return confident(bert(0, num_layers=4, hidden=32))


def teacher_b():  # another architecture, depth and width, of the same 64-id vocabulary and 2 classes
    return confident(distilbert(5))


def student():
    return bert(1, num_layers=2, hidden=16)


def dataset(tokenizer, n=8):
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(
            WORDS[j]
            for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]
    return Dataset.from_dict({**tokenizer(texts), "labels": [i % 2 for i in range(n)]})


def make_trainer(tmp_path, teachers, tokenizer, model=None, data=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        temperature=2.0,
        task_weight=0.0,
        logits_weight=1.0,
    )
    kwargs.update(overrides)
    return DistillationTrainer(
        model=model if model is not None else student(),
        teacher_model=teachers,
        args=DistillationConfig(**kwargs),
        train_dataset=data if data is not None else dataset(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def outputs_of(models, tokenizer, data):
    batch = DataCollatorWithPadding(tokenizer)([data[i] for i in range(len(data))])
    with torch.no_grad():
        out = []
        for m in models:
            names = forward_arg_names(m)
            out.append(m.eval()(**{k: v for k, v in batch.items() if k in names and k != "labels"}).logits)
    return out


def train_logs(trainer):
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss_logits" in entry or "loss_hidden" in entry]


def test_logged_logit_loss_is_the_kl_from_the_mixture_of_both_teachers(tmp_path, tiny_tokenizer):
    ta, tb, s = teacher_a(), teacher_b(), student()
    data = dataset(tiny_tokenizer)
    s_logits, a_logits, b_logits = outputs_of([copy.deepcopy(s), ta, tb], tiny_tokenizer, data)
    trainer = make_trainer(tmp_path, [ta, tb], tiny_tokenizer, model=s, data=data, teacher_weights=[1.0, 3.0])
    logged = train_logs(trainer)[0]  # one step over the 8 rows: the loss of the untrained student
    m = 0.25 * torch.softmax(a_logits.double() / 2, -1) + 0.75 * torch.softmax(b_logits.double() / 2, -1)
    expected = 4 * (m * (m.log() - torch.log_softmax(s_logits.double() / 2, -1))).sum(-1).mean()
    assert logged["loss_logits"] == pytest.approx(expected.item(), rel=1e-5)
    assert logged["loss"] == pytest.approx(logged["loss_logits"], rel=1e-5)
    # Not the KL from either teacher alone, nor from the mean of their logits.
    for other in (a_logits, b_logits, 0.25 * a_logits + 0.75 * b_logits):
        assert kl_div_loss(s_logits, other, temperature=2.0).item() != pytest.approx(expected.item(), rel=1e-3)


def test_logits_average_trains_on_the_mean_logits(tmp_path, tiny_tokenizer):
    ta, tb, s = teacher_a(), teacher_b(), student()
    data = dataset(tiny_tokenizer)
    s_logits, a_logits, b_logits = outputs_of([copy.deepcopy(s), ta, tb], tiny_tokenizer, data)
    trainer = make_trainer(tmp_path, [ta, tb], tiny_tokenizer, model=s, data=data, multi_teacher_average="logits")
    expected = kl_div_loss(s_logits, (a_logits + b_logits) / 2, temperature=2.0)
    assert train_logs(trainer)[0]["loss_logits"] == pytest.approx(expected.item(), rel=1e-5)


ALL_TERMS = dict(task_weight=0.5, logits_weight=0.5, hidden_weight=1.0, embeddings_weight=1.0, attention_weight=1.0)


def test_weights_one_zero_train_exactly_as_the_first_teacher_alone(tmp_path, tiny_tokenizer):
    runs = {}
    calls = []
    tb = teacher_b()
    tb.register_forward_hook(lambda *a: calls.append(1))
    for name, teachers, extra in (
        ("alone", teacher_a(), {}),
        ("mixed", [teacher_a(), tb], {"teacher_weights": [1.0, 0.0]}),
    ):
        trainer = make_trainer(
            tmp_path / name, teachers, tiny_tokenizer, max_steps=3, per_device_train_batch_size=4, **ALL_TERMS, **extra
        )
        runs[name] = (train_logs(trainer), {k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    (alone_logs, alone_params), (mixed_logs, mixed_params) = runs["alone"], runs["mixed"]
    keys = [f"loss_{t}" for t in ("task", "logits", "hidden", "embeddings", "attention")]
    assert [[e[k] for k in keys] for e in mixed_logs] == [[e[k] for k in keys] for e in alone_logs]
    assert all(torch.equal(mixed_params[k], alone_params[k]) for k in alone_params)
    assert not calls  # a teacher of weight 0 is never run


def test_weights_zero_one_take_the_logits_of_the_second_teacher_alone(tmp_path, tiny_tokenizer):
    alone = train_logs(
        make_trainer(tmp_path / "a", teacher_b(), tiny_tokenizer, max_steps=2, per_device_train_batch_size=4)
    )
    mixed = train_logs(
        make_trainer(
            tmp_path / "m",
            [teacher_a(), teacher_b()],
            tiny_tokenizer,
            max_steps=2,
            per_device_train_batch_size=4,
            teacher_weights=[0, 2],
        )
    )
    assert [e["loss_logits"] for e in mixed] == [e["loss_logits"] for e in alone]


def test_two_identical_teachers_train_as_one(tmp_path, tiny_tokenizer):
    one = train_logs(
        make_trainer(tmp_path / "1", teacher_a(), tiny_tokenizer, max_steps=3, per_device_train_batch_size=4)
    )
    ta = teacher_a()
    two = train_logs(
        make_trainer(
            tmp_path / "2", [ta, copy.deepcopy(ta)], tiny_tokenizer, max_steps=3, per_device_train_batch_size=4
        )
    )
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss_logits"] == pytest.approx(a["loss_logits"], rel=1e-5)


@pytest.mark.parametrize("relation", [False, True])
def test_intermediate_terms_use_the_chosen_teacher(tmp_path, tiny_tokenizer, relation):
    terms = dict(hidden_weight=1.0, embeddings_weight=1.0, attention_weight=1.0, layer_mapping="uniform")
    if relation:
        terms = dict(relation_weight=1.0, relation_loss="rkd_distance")
    single = make_trainer(tmp_path / "s", teacher_b(), tiny_tokenizer, **terms)
    multi = make_trainer(tmp_path / "m", [teacher_a(), teacher_b()], tiny_tokenizer, intermediate_teacher=1, **terms)
    assert multi.teacher is multi.teachers[1] and isinstance(multi.teacher, DistilBertForSequenceClassification)
    assert multi.layer_matches == single.layer_matches  # paired with the DistilBERT's 3 layers, not the BERT's 4
    assert {k: p.shape for k, p in multi.projections.state_dict().items()} == {
        k: p.shape for k, p in single.projections.state_dict().items()
    }  # into the DistilBERT's width 24, not the BERT's 32
    single_log, multi_log = train_logs(single)[0], train_logs(multi)[0]
    for term in ("relation",) if relation else ("hidden", "embeddings", "attention"):
        assert multi_log[f"loss_{term}"] == single_log[f"loss_{term}"], term
    assert multi_log["loss_logits"] != pytest.approx(single_log["loss_logits"], rel=1e-4)  # the mixture


def test_every_teacher_stays_frozen_in_eval_mode_and_out_of_the_optimizer(tmp_path, tiny_tokenizer):
    teachers = [teacher_a(), teacher_b()]
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    trainer = make_trainer(tmp_path, teachers, tiny_tokenizer, max_steps=2, per_device_train_batch_size=4, **ALL_TERMS)
    trainer.train()
    assert trainer.teachers == teachers and trainer.teacher is teachers[0]
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for t, state in zip(trainer.teachers, before):
        assert not t.training and all(not p.requires_grad for p in t.parameters())
        assert all(torch.equal(v, state[k]) for k, v in t.state_dict().items())
        assert not any(id(p) in in_optimizer for p in t.parameters())


def test_columns_only_an_extra_teacher_reads_are_kept(tmp_path, tiny_tokenizer):
    segments = bert(0, num_layers=2, hidden=32, type_vocab_size=2)  # reads token_type_ids; the others take none
    trainer = make_trainer(tmp_path, [distilbert(5), segments], tiny_tokenizer, model=distilbert(1, dim=16, layers=2))
    trainer._set_signature_columns_if_needed()
    assert "token_type_ids" in trainer._signature_columns
    trainer.train()  # and the BERT teacher gets them


def tiny_llama(seed, hidden=32, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # confident next-token distributions
    return model


@pytest.mark.parametrize("chunk", [None, 3])
def test_token_level_kd_mixes_the_teachers_at_every_scored_position(tmp_path, tiny_tokenizer, chunk):
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(4):
        ids = torch.randint(5, 64, (int(torch.randint(5, 10, (1,), generator=g)),), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * 3 + ids[3:])  # a 3-token prompt
    data = Dataset.from_dict(rows)
    ta, tb, s = tiny_llama(0), tiny_llama(2, hidden=16, layers=3), tiny_llama(1, hidden=16, layers=1)
    collator = DataCollatorForTokenClassification(tiny_tokenizer)
    batch = collator([data[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s_logits, a_logits, b_logits = (m.eval()(**inputs).logits.double() for m in (copy.deepcopy(s), ta, tb))
    trainer = DistillationTrainer(
        model=s,
        teacher_model=[ta, tb],
        args=DistillationConfig(
            output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, task_weight=0.0, logits_weight=1.0, temperature=2.0,
            teacher_weights=[1.0, 3.0], logits_chunk_size=chunk,
        ),
        train_dataset=data,
        processing_class=tiny_tokenizer,
        data_collator=collator,
    )  # fmt: skip
    logged = train_logs(trainer)[0]
    # Position i predicts token i + 1: scored where labels[i + 1] != -100.
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != -100
    m = 0.25 * torch.softmax(a_logits / 2, -1) + 0.75 * torch.softmax(b_logits / 2, -1)
    kl = (m * (m.log() - torch.log_softmax(s_logits / 2, -1))).sum(-1)
    assert logged["loss_logits"] == pytest.approx(4 * kl[scored].mean().item(), rel=1e-5)


def test_multi_label_heads_mix_each_classs_probability(tmp_path, tiny_tokenizer):
    ta, tb, s = (
        confident(bert(0, num_labels=3)),
        confident(distilbert(5, num_labels=3)),
        bert(1, num_layers=2, hidden=16, num_labels=3),
    )
    data = dataset(tiny_tokenizer).remove_columns("labels")
    data = data.add_column("labels", [[float((i >> c) & 1) for c in range(3)] for i in range(len(data))])
    s_logits, a_logits, b_logits = outputs_of([copy.deepcopy(s), ta, tb], tiny_tokenizer, data)
    trainer = make_trainer(tmp_path, [ta, tb], tiny_tokenizer, model=s, data=data, teacher_weights=[1.0, 3.0])
    assert trainer.problem_type == "multi_label_classification"
    p = 0.25 * torch.sigmoid(a_logits.double() / 2) + 0.75 * torch.sigmoid(b_logits.double() / 2)
    q = torch.sigmoid(s_logits.double() / 2)
    binary_kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert train_logs(trainer)[0]["loss_logits"] == pytest.approx(4 * binary_kl.mean().item(), rel=1e-5)


def test_teacher_dtype_applies_to_every_teacher(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, [teacher_a(), teacher_b()], tiny_tokenizer, teacher_dtype="bfloat16")
    assert all(next(t.parameters()).dtype == torch.bfloat16 for t in trainer.teachers)
    assert all(torch.isfinite(torch.tensor(e["loss_logits"])) for e in train_logs(trainer))


# --------------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------------

CONFIG_REFUSALS = [
    (
        "negative weight",
        dict(teacher_weights=[1.0, -0.5]),
        r"teacher_weights must be finite and >= 0, got \[1\.0, -0\.5\] \(teacher 1 has -0\.5\)",
    ),
    ("all-zero weights", dict(teacher_weights=[0, 0]), r"teacher_weights are all 0 \(\[0\.0, 0\.0\]\).*at least one"),
    ("empty weights", dict(teacher_weights=[]), r"teacher_weights must be a non-empty list of numbers"),
    ("negative index", dict(intermediate_teacher=-1), r"intermediate_teacher must be an int >= 0 .*got -1"),
    (
        "unknown average",
        dict(multi_teacher_average="geometric"),
        r"multi_teacher_average must be one of \('probs', 'logits'\), got 'geometric'",
    ),
    (
        "cache",
        dict(teacher_weights=[1, 1], use_teacher_cache=True),
        r"use_teacher_cache=True stores one teacher's outputs, but teacher_weights=\[1\.0, 1\.0\] asks for 2 "
        r"teachers.*use_teacher_cache=False",
    ),
]


@pytest.mark.parametrize("case, fields, message", CONFIG_REFUSALS, ids=[c[0] for c in CONFIG_REFUSALS])
def test_config_refusals(case, fields, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="unused", report_to="none", use_cpu=True, **fields)


def other_vocab(seed):
    return bert(seed, num_layers=2, hidden=32, vocab_size=65)


TRAINER_REFUSALS = [
    (
        "too few weights",
        lambda: [teacher_a(), teacher_b()],
        dict(teacher_weights=[1.0]),
        r"teacher_weights=\[1\.0\] has 1 entries but 2 teacher\(s\) were given",
    ),
    (
        "weights for one teacher",
        teacher_a,
        dict(teacher_weights=[1, 1]),
        r"teacher_weights=\[1\.0, 1\.0\] has 2 entries but 1 teacher\(s\)",
    ),
    (
        "index out of range",
        lambda: [teacher_a(), teacher_b()],
        dict(intermediate_teacher=2),
        r"intermediate_teacher=2 is out of range for 2 teacher\(s\): use an index in \[0, 1\]",
    ),
    (
        "index with one teacher",
        teacher_a,
        dict(intermediate_teacher=1),
        r"intermediate_teacher=1 is out of range for 1 teacher",
    ),
    ("empty list", lambda: [], {}, r"teacher_model is an empty list"),
    (
        "vocab differs",
        lambda: [teacher_a(), other_vocab(3)],
        {},
        r"vocab_size differs between the teachers: teacher 0 has 64, teacher 1 has 65",
    ),
    (
        "labels differ",
        lambda: [teacher_a(), bert(3, num_labels=3)],
        {},
        r"num_labels differs between the teachers: teacher 0 has 2, teacher 1 has 3",
    ),
    (
        "head differs",
        lambda: [teacher_a(), BertForTokenClassification(tiny_bert_config())],
        {},
        r"teacher 1 is a BertForTokenClassification but teacher 0 a BertForSequenceClassification",
    ),
    (
        "cache",
        lambda: [teacher_a(), teacher_b()],
        dict(use_teacher_cache=True),
        r"use_teacher_cache=True stores one teacher's outputs, but teacher_model \(a list of 2\) asks for 2 teachers",
    ),
    (
        "noise",
        lambda: [teacher_a(), teacher_b()],
        dict(teacher_noise_std=1.0),
        r"teacher_noise_std=1\.0 is not supported with several teachers \(2 were given\).*teacher_noise_std=0",
    ),
    (
        "seq_kd",
        lambda: [teacher_a(), teacher_b()],
        dict(seq_kd=True),
        r"seq_kd=True is not supported with several teachers.*seq_kd=False",
    ),
    (
        "fused",
        lambda: [teacher_a(), teacher_b()],
        dict(fused_lm_head=True),
        r"fused_lm_head=True is not supported with several teachers.*fused_lm_head=False",
    ),
    (
        "mse of probabilities",
        lambda: [teacher_a(), teacher_b()],
        dict(logits_loss="mse"),
        r"logits_loss='mse' compares raw logits.*multi_teacher_average='logits'",
    ),
]


@pytest.mark.parametrize("case, teachers, fields, message", TRAINER_REFUSALS, ids=[c[0] for c in TRAINER_REFUSALS])
def test_trainer_refusals_before_any_step(tmp_path, tiny_tokenizer, case, teachers, fields, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, teachers(), tiny_tokenizer, **fields)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_teacher_whose_vocabulary_differs_from_the_students_is_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"vocab_size differs: teacher 65, student 64"):
        make_trainer(tmp_path, [other_vocab(3), other_vocab(4)], tiny_tokenizer)


def test_mse_with_averaged_logits_is_accepted(tmp_path, tiny_tokenizer):
    trainer = make_trainer(
        tmp_path, [teacher_a(), teacher_b()], tiny_tokenizer, logits_loss="mse", multi_teacher_average="logits"
    )
    assert train_logs(trainer)[0]["loss_logits"] > 0


# --------------------------------------------------------------------------------------------------------------------
# scripts/distill.py
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("teachers")
    for name, model in (("a", teacher_a()), ("b", teacher_b())):
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *reversed(WORDS)]  # same size, other numbering
    other = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    teacher_a().save_pretrained(root / "other_tokenizer")
    other.save_pretrained(root / "other_tokenizer")
    teacher_a().save_pretrained(root / "no_tokenizer")
    g = torch.Generator().manual_seed(0)
    write_tiny_tsv(root / "train.tsv", 16, g)
    return root


def test_extra_teachers_are_loaded_and_checked(saved, tiny_tokenizer):
    args = ModelArguments(
        teacher_model_name_or_path=str(saved / "a"),
        extra_teacher_model_names_or_paths=[str(saved / "b"), str(saved / "no_tokenizer")],
    )
    loaded = load_extra_teachers(args, tiny_tokenizer, num_labels=2)
    assert [type(t).__name__ for t in loaded] == [
        "DistilBertForSequenceClassification",
        "BertForSequenceClassification",
    ]
    for path, error, message in (
        (
            "other_tokenizer",
            ValueError,
            r"extra_teacher_model_names_or_paths\[0\]=.*other_tokenizer.*tokenizer of another vocabulary",
        ),
        ("missing", FileNotFoundError, r"extra_teacher_model_names_or_paths\[0\]=.*missing.*does not exist"),
    ):
        args.extra_teacher_model_names_or_paths = [str(saved / path)]
        with pytest.raises(error, match=message):
            load_extra_teachers(args, tiny_tokenizer, num_labels=2)
    with pytest.raises(
        ValueError, match=r"extra_teacher_model_names_or_paths\[0\]=.*head has 2 classes but the data has 3"
    ):
        args.extra_teacher_model_names_or_paths = [str(saved / "b")]
        load_extra_teachers(args, tiny_tokenizer, num_labels=3)


def test_teachers_must_name_the_classes_alike():
    ta, tb = teacher_a(), teacher_b()
    ta.config.id2label, tb.config.id2label = {0: "negative", 1: "positive"}, {0: "Negative", 1: "Positive"}
    check_teacher_labels(ta, [tb])  # case aside
    tb.config.id2label = {0: "positive", 1: "negative"}
    with pytest.raises(ValueError, match=r"extra_teacher_model_names_or_paths\[0\] \(teacher 1\) names its classes"):
        check_teacher_labels(ta, [tb])
    tb.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}  # unnamed: nothing to compare
    check_teacher_labels(ta, [tb])


def test_script_distils_from_two_teachers(saved, tmp_path):
    spec = importlib.util.spec_from_file_location("distill_script", os.path.join(REPO, "scripts", "distill.py"))
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    out = tmp_path / "run"
    distill.main(
        [
            "--config",
            os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3", "multi_teacher.yaml"),
            "--teacher_model_name_or_path",
            str(saved / "a"),
            "--extra_teacher_model_names_or_paths",
            str(saved / "b"),
            "--train_file",
            str(saved / "train.tsv"),
            "--validation_file",
            str(saved / "train.tsv"),
            "--max_length",
            "16",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--student_num_layers",
            "2",
            "--use_cpu",
            "true",
            "--dataloader_num_workers",
            "0",
        ]
    )
    assert (out / "student" / "model.safetensors").is_file()
    settings = (out / "run_config.json").read_text()
    assert "extra_teacher_model_names_or_paths" in settings and str(saved / "b") in settings
