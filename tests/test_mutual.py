"""Deep mutual learning (issue 10 item 5, hf_distill.mutual): the mutual term against a slow reference, the logged
terms against hand-computed ones, gradients reaching only their own peer, logits_weight=0 as independent training,
gradient accumulation, saving / loading / resuming every peer, evaluation, the recipe and script, and every refusal."""

import copy
import importlib.util
import os

import pytest
import torch
import yaml
from conftest import REPO, WORDS, tiny_bert_config, write_tiny_tsv
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from hf_distill import DataArguments, DistillationConfig
from hf_distill.losses import KD_LOGIT_LOSSES
from hf_distill.mutual import (
    MutualLearningConfig,
    MutualLearningTrainer,
    PeerArguments,
    PeerEnsemble,
    mutual_terms,
    peer_accuracy_metrics,
)
from hf_distill.mutual_config import NOT_USED, parse_mutual_args
from hf_distill.preflight import forward_arg_names
from hf_distill.recipes import check_recipe_keys

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
RECIPE = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3", "mutual", "mutual_learning.yaml")


def bert(seed, layers=2, hidden=16, **kw):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_layers=layers, hidden=hidden, **{**NO_DROPOUT, **kw}))


def distilbert(seed, dim=24, layers=3, **kw):
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=64, dim=dim, n_layers=layers, n_heads=4, hidden_dim=2 * dim, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, **kw,
    )  # fmt: skip
    return DistilBertForSequenceClassification(config)


def confident(model, scale=40.0):
    """Classifier scaled up so the peers' logits are a few units apart (tiny random models give ~0.01): the mutual
    terms are then not differences of nearly equal numbers."""
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    return model


def peers3():
    """Three peers of different architectures, depths and widths, one vocabulary and two classes."""
    return [confident(bert(0)), confident(bert(1, layers=3, hidden=32)), confident(distilbert(2))]


def dataset(tokenizer, n=16, labels=None):
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(
            WORDS[j]
            for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]
    return Dataset.from_dict({**tokenizer(texts), "labels": labels or [i % 2 for i in range(n)]})


def settings(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def make_trainer(tmp_path, peers, tokenizer, data=None, eval_data=None, **overrides):
    return MutualLearningTrainer(
        model=peers,
        args=MutualLearningConfig(**settings(tmp_path, **{"temperature": 2.0, **overrides})),
        train_dataset=data if data is not None else dataset(tokenizer),
        eval_dataset=eval_data,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def batch_logits(models, tokenizer, data):
    """Each model's logits on all of `data` in one padded batch, in eval mode (no dropout anyway)."""
    batch = DataCollatorWithPadding(tokenizer)([{k: v for k, v in row.items() if k != "labels"} for row in data])
    out = []
    for m in models:
        names = forward_arg_names(m)
        with torch.no_grad():
            out.append(m.eval()(**{k: v for k, v in batch.items() if k in names}).logits.double())
    return out


def reference_mutual(logits, k, temperature):
    """mean_{j != k} T² KL(p_j || p_k), batchmean, row by row in float64."""
    total = 0.0
    others = [j for j in range(len(logits)) if j != k]
    for j in others:
        for r in range(logits[k].shape[0]):
            p = torch.softmax(logits[j][r].double() / temperature, -1)
            log_q = torch.log_softmax(logits[k][r].double() / temperature, -1)
            total += temperature**2 * float((p * (p.log() - log_q)).sum()) / logits[k].shape[0]
    return total / len(others)


# --------------------------------------------------------------------------------------------------------------------
# The mutual term
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_peers", [2, 3, 4])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_mutual_terms_match_a_slow_reference(num_peers, temperature):
    g = torch.Generator().manual_seed(num_peers)
    logits = [torch.randn(6, 5, generator=g) * 3 for _ in range(num_peers)]
    terms = mutual_terms(logits, temperature=temperature)
    assert len(terms) == num_peers and all(t.dtype == torch.float32 and t.dim() == 0 for t in terms)
    for k, term in enumerate(terms):
        assert term.item() == pytest.approx(reference_mutual(logits, k, temperature), rel=1e-5, abs=1e-7)
    # num_items_in_batch divides the summed rows instead of this batch's count (accumulation windows).
    halves = mutual_terms(logits, temperature=temperature, num_items_in_batch=12)
    for term, half in zip(terms, halves):
        torch.testing.assert_close(half, term / 2)


def test_two_identical_peers_have_a_zero_mutual_term_and_the_loss_is_the_chosen_divergence():
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert all(t.item() == pytest.approx(0.0, abs=1e-7) for t in mutual_terms([z, z.clone()]))
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    loss_fn = KD_LOGIT_LOSSES["reverse_kl"]
    terms = mutual_terms([a, b], loss_fn=loss_fn, temperature=2.0)
    torch.testing.assert_close(terms[0], loss_fn(a, b, temperature=2.0))
    torch.testing.assert_close(terms[1], loss_fn(b, a, temperature=2.0))


def test_the_gradient_of_a_peers_mutual_term_reaches_that_peer_alone():
    logits = [torch.randn(5, 4, generator=torch.Generator().manual_seed(s), requires_grad=True) for s in range(3)]
    for k in range(3):
        for z in logits:
            z.grad = None
        mutual_terms(logits, temperature=2.0)[k].backward()
        for j, z in enumerate(logits):
            assert (z.grad is not None and z.grad.abs().sum() > 0) if j == k else z.grad is None, (k, j)


def test_in_the_trainer_a_peers_loss_moves_that_peers_parameters_only(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, peers3(), tiny_tokenizer)
    batch = DataCollatorWithPadding(tiny_tokenizer)(list(dataset(tiny_tokenizer, 8)))
    for k in range(3):
        trainer.model.zero_grad(set_to_none=True)
        trainer.model.train()
        logits = trainer.model(**{n: v for n, v in batch.items() if n != "labels"})
        mutual_terms(logits, temperature=2.0)[k].backward()
        for j, peer in enumerate(trainer.peers):
            grads = [p.grad for p in peer.parameters()]
            if j == k:
                assert any(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), f"peer {j} got a gradient from peer {k}'s mutual term"


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


def test_logged_terms_equal_the_hand_computed_ones_and_every_peer_trains(tmp_path, tiny_tokenizer):
    peers = peers3()
    before = [copy.deepcopy(p) for p in peers]
    data = dataset(tiny_tokenizer, 8)  # one batch: the step-1 log is the initial peers' loss on all 8 rows
    trainer = make_trainer(tmp_path, peers, tiny_tokenizer, data, max_steps=1, task_weight=0.3, logits_weight=0.7)
    trainer.train()
    logged = trainer.state.log_history[0]
    logits = batch_logits(before, tiny_tokenizer, data)
    labels = torch.tensor(data["labels"])
    total = 0.0
    for k in range(3):
        task = torch.nn.functional.cross_entropy(logits[k], labels).item()
        mutual = reference_mutual(logits, k, 2.0)
        assert mutual > 1e-3  # the peers disagree: the check is not 0 == 0
        assert logged[f"loss_task_peer{k}"] == pytest.approx(task, rel=1e-5)
        assert logged[f"loss_mutual_peer{k}"] == pytest.approx(mutual, rel=1e-4)
        total += 0.3 * task + 0.7 * mutual
    assert logged["loss"] == pytest.approx(total, rel=1e-4)
    for k, (peer, old) in enumerate(zip(trainer.peers, before)):
        for (name, p), q in zip(peer.named_parameters(), old.parameters()):
            assert not torch.equal(p.detach(), q), f"peer {k} parameter {name} did not change"


def test_with_logits_weight_zero_each_peer_trains_as_it_would_alone(tmp_path, tiny_tokenizer):
    """Two peers, no mutual term: each ends where a plain Trainer takes it alone (same seed, data order, optimizer,
    schedule and gradient clipping, which is per peer: max_grad_norm is small enough to clip every step)."""
    data = dataset(tiny_tokenizer, 16)
    common = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, max_grad_norm=0.05, weight_decay=0.1)
    trainer = make_trainer(tmp_path, [bert(0), distilbert(2)], tiny_tokenizer, data, logits_weight=0.0, **common)
    trainer.train()
    for k, build in enumerate((lambda: bert(0), lambda: distilbert(2))):
        alone = Trainer(
            model=build(),
            args=TrainingArguments(**settings(tmp_path / f"alone{k}", **common)),
            train_dataset=data,
            processing_class=tiny_tokenizer,
            data_collator=DataCollatorWithPadding(tiny_tokenizer),
        )
        alone.train()
        norms = [entry["grad_norm"] for entry in alone.state.log_history if "grad_norm" in entry]
        assert len(norms) == 3 and min(norms) > 0.05  # clipped at every step, by this peer's own norm
        for (name, p), q in zip(trainer.peers[k].named_parameters(), alone.model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"peer {k} {name}")


def test_gradient_accumulation_equals_the_concatenated_batch(tmp_path, tiny_tokenizer):
    """Micro-batches of 4, 2 x 2 and 1 x 8 rows (padded differently) give one update and one log: the full batch's."""
    data = dataset(tiny_tokenizer, 8, labels=[0, 1, -100, 1, 0, 0, -100, 1])  # unlabelled rows: task counts differ
    results = []
    for bs, ga in ((8, 1), (4, 2), (1, 8)):
        trainer = make_trainer(
            tmp_path / f"ga{ga}", peers3(), tiny_tokenizer, data, per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, max_steps=1, learning_rate=1e-1, max_grad_norm=0.0, optim="sgd",
        )  # fmt: skip
        trainer.train()
        logged = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("loss")}
        results.append(([dict(p.named_parameters()) for p in trainer.peers], logged))
    for params, logged in results[1:]:
        for k, (ours, theirs) in enumerate(zip(params, results[0][0])):
            for name in ours:
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=f"peer {k} {name}")
        assert logged.keys() == results[0][1].keys()
        for key in logged:
            assert logged[key] == pytest.approx(results[0][1][key], rel=1e-4), key


def test_every_peer_is_saved_as_a_plain_model_with_the_tokenizer(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, peers3(), tiny_tokenizer, save_strategy="steps", save_steps=2)
    trainer.train()
    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "final"):
        if folder.name == "final":
            trainer.save_model(str(folder))
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("peer")) == ["peer0", "peer1", "peer2"]
        for k, peer in enumerate(trainer.peers):
            loaded = AutoModelForSequenceClassification.from_pretrained(folder / f"peer{k}")
            assert type(loaded) is type(peer)
            assert loaded.state_dict().keys() == peer.state_dict().keys()
            for name, value in peer.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], value), (k, name)
            tokenizer = AutoTokenizer.from_pretrained(folder / f"peer{k}")
            assert tokenizer("good movie")["input_ids"] == tiny_tokenizer("good movie")["input_ids"]
        assert not (folder / "model.safetensors").exists()  # no ensemble file: the peers are the artifacts


def test_resume_from_a_checkpoint_reaches_the_uninterrupted_weights(tmp_path, tiny_tokenizer):
    run = dict(max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    trainer = make_trainer(tmp_path, peers3(), tiny_tokenizer, **run)
    trainer.train()
    final = [copy.deepcopy(p.state_dict()) for p in trainer.peers]
    # Fresh peers of other initial weights: everything they end with comes from the checkpoint and the steps after.
    fresh = [bert(10), bert(11, layers=3, hidden=32), distilbert(12)]
    resumed = make_trainer(tmp_path, fresh, tiny_tokenizer, **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for k, peer in enumerate(resumed.peers):
        for name, value in peer.state_dict().items():
            assert torch.equal(value, final[k][name]), f"peer {k} {name}"


def test_load_best_model_at_end_loads_every_peer_of_the_best_checkpoint(tmp_path, tiny_tokenizer):
    trainer = make_trainer(
        tmp_path, peers3(), tiny_tokenizer, eval_data=dataset(tiny_tokenizer, 8), max_steps=4,
        per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        load_best_model_at_end=True, metric_for_best_model="loss_mutual_peer0", greater_is_better=False,
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4"), best  # not the last: loading it changes the peers
    for k, peer in enumerate(trainer.peers):
        saved = AutoModelForSequenceClassification.from_pretrained(os.path.join(best, f"peer{k}"))
        for name, value in saved.state_dict().items():
            assert torch.equal(peer.state_dict()[name], value), (k, name)


def test_activation_checkpointing_reaches_every_peer_and_changes_nothing(tmp_path, tiny_tokenizer):
    results = []
    for checkpointing in (False, True):
        trainer = make_trainer(tmp_path / str(checkpointing), peers3(), tiny_tokenizer,
                               activation_checkpointing=checkpointing)  # fmt: skip
        trainer.train()
        assert all(peer.is_activation_checkpointing == checkpointing for peer in trainer.peers)
        results.append([p.state_dict() for p in trainer.peers])
    for k, (plain, checkpointed) in enumerate(zip(*results)):
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], msg=f"peer {k} {name}")


def test_evaluation_logs_each_peers_accuracy_the_ensembles_and_the_terms(tmp_path, tiny_tokenizer):
    eval_data = dataset(tiny_tokenizer, 12)
    trainer = make_trainer(tmp_path, peers3(), tiny_tokenizer, eval_data=eval_data, per_device_eval_batch_size=5)
    trainer.train()
    metrics = trainer.evaluate()
    logits = batch_logits(trainer.peers, tiny_tokenizer, eval_data)
    labels = torch.tensor(eval_data["labels"])
    for k in range(3):
        assert metrics[f"eval_accuracy_peer{k}"] == pytest.approx((logits[k].argmax(-1) == labels).double().mean())
        assert metrics[f"eval_loss_mutual_peer{k}"] == pytest.approx(reference_mutual(logits, k, 2.0), rel=1e-4)
        task = torch.nn.functional.cross_entropy(logits[k], labels).item()
        assert metrics[f"eval_loss_task_peer{k}"] == pytest.approx(task, rel=1e-5)
    mean = sum(torch.softmax(z, -1) for z in logits) / 3
    assert metrics["eval_accuracy_ensemble"] == pytest.approx((mean.argmax(-1) == labels).double().mean())


def test_accuracy_metrics_leave_out_unlabelled_rows():
    a = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]).numpy()
    b = torch.tensor([[0.0, 3.0], [0.0, 2.0], [0.0, 9.0]]).numpy()
    metrics = peer_accuracy_metrics()(((a, b), torch.tensor([0, 1, -100]).numpy()))
    assert metrics == {"accuracy_peer0": 1.0, "accuracy_peer1": 0.5, "accuracy_ensemble": 0.5}


def test_peer_ensemble_feeds_each_peer_the_inputs_it_takes(tiny_tokenizer):
    ensemble = PeerEnsemble([bert(0), distilbert(2)])  # DistilBERT takes no token_type_ids
    batch = DataCollatorWithPadding(tiny_tokenizer)(list(dataset(tiny_tokenizer, 4)))
    assert "token_type_ids" in batch and "token_type_ids" in ensemble.input_names
    logits = ensemble(**batch)
    assert len(logits) == 2 and all(z.shape == (4, 2) for z in logits)


# --------------------------------------------------------------------------------------------------------------------
# The recipe and the script
# --------------------------------------------------------------------------------------------------------------------


def test_the_recipe_parses_and_validates():
    with open(RECIPE, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    check_recipe_keys(recipe, (PeerArguments, DataArguments, MutualLearningConfig), source=RECIPE)
    peer_args, data_args, training_args, _ = parse_mutual_args(["--config", RECIPE])
    assert len(peer_args.peer_num_layers) >= 2 and training_args.logits_weight > 0
    assert os.path.isabs(data_args.train_file) and os.path.isabs(training_args.output_dir)
    text = open(RECIPE, encoding="utf-8").read()
    for header in ("# Model arguments", "# Data arguments", "# Distillation", "# Training"):
        assert header in text


def test_the_script_trains_saves_and_evaluates_every_peer(tmp_path, tiny_tokenizer):
    base = tmp_path / "base"
    bert(0, layers=4, hidden=32).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    write_tiny_tsv(tmp_path / "train.tsv", 24, g)
    write_tiny_tsv(tmp_path / "dev.tsv", 8, g)
    spec = importlib.util.spec_from_file_location("mutual_script", os.path.join(REPO, "scripts", "mutual.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    metrics = script.main(
        ["--config", RECIPE, "--base_model_name_or_path", str(base), "--peer_num_layers", "1", "2",
         "--train_file", str(tmp_path / "train.tsv"), "--validation_file", str(tmp_path / "dev.tsv"),
         "--max_length", "16", "--max_train_samples", "24", "--output_dir", str(tmp_path / "out"),
         "--max_steps", "2", "--per_device_train_batch_size", "8", "--use_cpu", "true", "--logging_steps", "1"]
    )  # fmt: skip
    assert {"eval_accuracy_peer0", "eval_accuracy_peer1", "eval_accuracy_ensemble"} <= set(metrics)
    for k, depth in enumerate((1, 2)):
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / f"peer{k}")
        assert loaded.config.num_hidden_layers == depth and loaded.config.num_labels == 2
        AutoTokenizer.from_pretrained(tmp_path / "out" / f"peer{k}")


# --------------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------------

# (field, value, what else the value needs to pass DistillationConfig's own checks, message)
CONFIG_REFUSALS = [
    ("hidden_weight", 1.0, {}, None), ("embeddings_weight", 1.0, {}, None), ("attention_weight", 1.0, {}, None),
    ("relation_weight", 1.0, {}, None), ("minilm_weight", 1.0, {}, None), ("teacher_weights", [1.0, 1.0], {}, None),
    ("teacher_dtype", "bfloat16", {}, None), ("use_teacher_cache", True, {}, None),
    ("teacher_cache_top_k", 8, {}, None), ("teacher_cache_top_k_tail", True, {"teacher_cache_top_k": 8}, None),
    ("teacher_noise_std", 0.5, {}, None), ("lmbda", 0.5, {"task_weight": 0.0}, None),
    ("seq_kd", True, {"task_weight": 0.0}, None), ("fused_lm_head", True, {}, None),
    ("logits_chunk_size", 64, {}, None), ("schedules", ["field=temperature start=4 end=1"], {}, None),
    ("label_smoothing_factor", 0.1, {}, None),
    ("push_to_hub", True, {}, "push_to_hub=True would push the folder of all peers"),
    ("temperature", 0.0, {}, "temperature must be > 0, got 0.0"),
    ("logits_weight", -1.0, {}, "logits_weight must be >= 0, got -1.0"),
    ("logits_weight", 0.0, {"task_weight": 0.0}, "all loss weights are 0"),
    ("logits_loss", "cosine", {}, "logits_loss must be one of"),
]  # fmt: skip


@pytest.mark.parametrize("name, value, companions, message", CONFIG_REFUSALS, ids=[r[0] for r in CONFIG_REFUSALS])
def test_config_refusals(tmp_path, name, value, companions, message):
    with pytest.raises(ValueError) as info:
        MutualLearningConfig(**settings(tmp_path, **companions, **{name: value}))
    text = str(info.value)
    if message is None:  # a DistillationConfig field mutual learning does not use: named, with its value and fix
        assert text.startswith(f"{name}={value!r} ") and f"Set {name}={NOT_USED[name][0]!r}" in text, text
    else:
        assert message in text


def test_every_unused_field_has_a_refusal_row():
    assert set(NOT_USED) <= {row[0] for row in CONFIG_REFUSALS}


def _sharing_embeddings():
    a, b = bert(0), bert(1)
    b.bert.embeddings.word_embeddings = a.bert.embeddings.word_embeddings
    return [a, b]


def _token_classifier():
    torch.manual_seed(0)
    return BertForTokenClassification(tiny_bert_config(num_layers=2, hidden=16))


TRAINER_REFUSALS = [
    ("one peer", lambda: [bert(0)], {}, "at least 2 peers, got 1"),
    ("same object twice", lambda: (lambda p: [p, p])(bert(0)), {}, "peer 1 is the same model object as peer 0"),
    ("shared parameters", lambda: _sharing_embeddings(), {}, "peer 1 shares parameters with peer 0"),
    ("num_labels differ", lambda: [bert(0), bert(1, num_labels=3)], {}, "peer 1 has num_labels=3 but peer 0 has 2"),
    ("class names differ", lambda: [bert(0, id2label={0: "neg", 1: "pos"}), bert(1, id2label={0: "pos", 1: "neg"})],
        {}, "peer 1 names its classes"),
    ("token classifier", lambda: [bert(0), _token_classifier()], {}, "peer 1 is a BertForTokenClassification"),
    ("regression head", lambda: [bert(0, num_labels=1), bert(1, num_labels=1)], {}, "peer 0 .* num_labels=1"),
    ("multi-label head", lambda: [bert(0, problem_type="multi_label_classification"), bert(1)], {},
        "problem_type='multi_label_classification'"),
    ("too few embeddings", lambda: [bert(0), bert(1, vocab_size=40)], {}, "peer 1 has 40 token embeddings"),
    ("model_init", lambda: [bert(0), bert(1)], {"model_init": lambda: bert(0)}, "model_init is not supported"),
    ("args of another class", lambda: [bert(0), bert(1)], {"args": "distillation"}, "MutualLearningConfig"),
]  # fmt: skip


@pytest.mark.parametrize("case, make_peers, extra, message", TRAINER_REFUSALS, ids=[r[0] for r in TRAINER_REFUSALS])
def test_trainer_refusals(tmp_path, tiny_tokenizer, case, make_peers, extra, message):
    extra = dict(extra)
    if extra.get("args") == "distillation":
        extra["args"] = DistillationConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    kwargs = {"args": MutualLearningConfig(**settings(tmp_path)), **extra}
    with pytest.raises(ValueError, match=message):
        MutualLearningTrainer(model=make_peers(), processing_class=tiny_tokenizer, **kwargs)


def test_float_labels_are_refused_at_the_first_batch(tmp_path, tiny_tokenizer):
    data = dataset(tiny_tokenizer, 8, labels=[float(i % 2) for i in range(8)])
    trainer = make_trainer(tmp_path, [bert(0), bert(1)], tiny_tokenizer, data)
    with pytest.raises(ValueError, match="the labels are floats"):
        trainer.train()


def test_resuming_with_another_number_of_peers_is_refused(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, peers3(), tiny_tokenizer, save_strategy="steps", save_steps=2)
    trainer.train()
    two = make_trainer(tmp_path, [bert(0), bert(1)], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"holds the peer folders \['peer0', 'peer1', 'peer2'\].*has 2 peers"):
        two.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


PEER_ARGUMENT_REFUSALS = [
    ({"peer_num_layers": [3, 6]}, "base_model_name_or_path is unset"),
    ({"base_model_name_or_path": "m", "peer_num_layers": [3]}, "at least 2 peers, got 1"),
    ({"base_model_name_or_path": "m", "peer_num_layers": [3, 0]}, r"depths >= 1, got \[3, 0\]"),
]


@pytest.mark.parametrize("kwargs, message", PEER_ARGUMENT_REFUSALS)
def test_peer_argument_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeerArguments(**kwargs)


def test_a_peer_loaded_from_a_list_counts_toward_the_two():
    PeerArguments(base_model_name_or_path="m", peer_num_layers=[3], peer_model_names_or_paths=["other"])


# --------------------------------------------------------------------------------------------------------------------
# DDP: one wrapper over every peer (2 CPU processes, gloo)
# --------------------------------------------------------------------------------------------------------------------

DDP_RUN = dict(max_steps=2, learning_rate=1e-1, optim="sgd", max_grad_norm=0.5)


def _tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def _train_for_ddp(out_dir, per_device_batch, **distributed):
    import pathlib

    tokenizer = _tokenizer()
    data = dataset(tokenizer, 16)
    trainer = make_trainer(
        pathlib.Path(out_dir), peers3(), tokenizer, data, per_device_train_batch_size=per_device_batch,
        **distributed, **DDP_RUN,
    )  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.slow
def test_ddp_over_the_ensemble_equals_one_process_with_the_global_batch(tmp_path):
    """2 processes x 4 rows give the update and the logged terms of 1 process x 8 rows (the same rows: the sampler's
    permutation does not depend on the batch size), each peer clipped by its own all-reduced gradient norm."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, os.path.abspath(__file__), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ddp = torch.load(tmp_path / "ddp" / "peers.pt", weights_only=True)
    ddp_logs = json.loads((tmp_path / "ddp" / "logs.json").read_text())
    single = _train_for_ddp(tmp_path / "single", 8)
    for k, peer in enumerate(single.peers):
        for name, value in peer.state_dict().items():
            torch.testing.assert_close(ddp[k][name], value, rtol=1e-4, atol=1e-6, msg=f"peer {k} {name}")
    for ours, theirs in zip(ddp_logs, [e for e in single.state.log_history if "loss" in e]):
        for key in (k for k in theirs if k.startswith("loss") or k == "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key


if __name__ == "__main__":  # the DDP worker: torchrun --nproc_per_node 2 tests/test_mutual.py OUT_DIR
    import json
    import sys

    out = sys.argv[1]
    trained = _train_for_ddp(out, 4, ddp_backend="gloo")
    if trained.is_world_process_zero():
        torch.save([p.state_dict() for p in trained.peers], os.path.join(out, "peers.pt"))
        with open(os.path.join(out, "logs.json"), "w") as f:
            json.dump([e for e in trained.state.log_history if "loss" in e], f)
