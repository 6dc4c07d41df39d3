"""Teacher-output cache: same losses as a live teacher, keyed by everything it depends on, never half-written."""

import math
import os
from dataclasses import replace

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
)

from hf_distill import (
    DistillationConfig,
    DistillationTrainer,
    TeacherCacheCollator,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    cached_teacher_features,
    densify_top_k,
    forward_with_features,
    load_teacher_cache,
    pad_cached_rows,
    teacher_cache_fingerprint,
)
from hf_distill.cache import ATTENTION_COLUMN, HIDDEN_COLUMN, LOGITS_COLUMN, TOPK_VALUES_COLUMN
from hf_distill.losses import kl_div_loss

ALL_TERMS = dict(task_weight=0.5, logits_weight=0.5, hidden_weight=1.0, embeddings_weight=1.0, attention_weight=1.0)
SPEC = TeacherCacheSpec(hidden_layers=(1, 3), attention_layers=(3,), embeddings=True)


def texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(" ".join(WORDS[j] for j in idx))
    return out


def dataset(tokenizer, n: int = 24, seed: int = 0) -> Dataset:
    enc = tokenizer(texts(n, seed), truncation=True, max_length=16)
    return Dataset.from_dict({**enc, "labels": [i % 2 for i in range(n)]})


def teacher_model(**config):
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **config)).eval()


def student_model():
    torch.manual_seed(1)
    return BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16))


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def make_trainer(tmp_path, tokenizer, teacher=None, train=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        **ALL_TERMS,
    )
    kwargs.update(overrides)
    return DistillationTrainer(
        model=student_model(),
        teacher_model=teacher if teacher is not None else teacher_model(),
        args=DistillationConfig(**kwargs),
        train_dataset=train if train is not None else dataset(tokenizer),
        eval_dataset=dataset(tokenizer, 8, seed=1),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def logged_terms(trainer) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k.startswith("loss_")} for e in trainer.state.log_history if "loss" in e]


def build(tmp_path, teacher, data, tokenizer, spec=SPEC, batch_size=5, **kw):
    return build_teacher_cache(
        teacher, data, DataCollatorWithPadding(tokenizer), cache_dir=tmp_path / "cache", spec=spec,
        tokenizer=tokenizer, batch_size=batch_size, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ trainer
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_training_matches_live_training_without_running_the_teacher(tmp_path, tiny_tokenizer, dtype, rtol):
    live = make_trainer(tmp_path / "live", tiny_tokenizer)
    live.train()
    cached = make_trainer(
        tmp_path / "cached", tiny_tokenizer, use_teacher_cache=True, teacher_cache_attentions=True,
        teacher_cache_dtype=dtype,
    )  # fmt: skip
    assert cached.teacher_cache is not None and cached.teacher_cache.built
    calls = count_forwards(cached.teacher)
    cached.train()
    assert calls[0] == 0, "the teacher ran although its outputs were cached"

    expected, got = logged_terms(live), logged_terms(cached)
    assert len(expected) == len(got) == 3
    for step, (e, g) in enumerate(zip(expected, got)):
        assert set(e) == set(g) == {f"loss_{t}" for t in ("task", "logits", "hidden", "embeddings", "attention")}
        for term in e:
            assert math.isclose(e[term], g[term], rel_tol=rtol, abs_tol=1e-7), (step, term, e[term], g[term])
    # Evaluation has no cache: the teacher runs live, and every term is still computed.
    metrics = cached.evaluate()
    assert calls[0] > 0 and math.isfinite(metrics["eval_loss_attention"])


def test_second_run_reuses_the_cache_and_a_changed_teacher_or_tokenizer_rebuilds_it(tmp_path, tiny_tokenizer):
    kw = dict(use_teacher_cache=True, teacher_cache_attentions=True, teacher_cache_dir=str(tmp_path / "shared"))
    first = make_trainer(tmp_path / "a", tiny_tokenizer, **kw)
    assert first.teacher_cache.built

    teacher = teacher_model()
    calls = count_forwards(teacher)
    again = make_trainer(tmp_path / "b", tiny_tokenizer, teacher=teacher, **kw)
    assert not again.teacher_cache.built and again.teacher_cache.path == first.teacher_cache.path
    assert calls[0] == 0

    changed = teacher_model()
    with torch.no_grad():
        changed.bert.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    assert make_trainer(tmp_path / "c", tiny_tokenizer, teacher=changed, **kw).teacher_cache.built

    other_tokenizer = BertTokenizerFast(vocab=tiny_tokenizer.get_vocab(), do_lower_case=False)
    other = make_trainer(tmp_path / "d", other_tokenizer, train=dataset(tiny_tokenizer), **kw)
    assert other.teacher_cache.built
    assert len(os.listdir(tmp_path / "shared")) == 3  # first, changed teacher, changed tokenizer; no temp dirs left


def test_cache_columns_survive_remove_unused_columns(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, use_teacher_cache=True, teacher_cache_attentions=True)
    kept = trainer._remove_unused_columns(trainer.train_dataset)
    assert set(trainer.teacher_cache.layouts) <= set(kept.column_names)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[HIDDEN_COLUMN.format(3)].shape == (*batch["input_ids"].shape, 32)
    assert batch[ATTENTION_COLUMN.format(3)].shape[1:] == (4, batch["input_ids"].shape[1], batch["input_ids"].shape[1])


# ------------------------------------------------------------------------------------------------ fingerprint
def _perturbed_teacher():
    teacher = teacher_model()
    with torch.no_grad():
        teacher.classifier.bias[0] += 1e-6
    return teacher


def _one_row_changed(data: Dataset, row: int) -> Dataset:
    return data.map(lambda r, i: {"input_ids": [2, 6, 3] if i == row else r["input_ids"]}, with_indices=True)


# (case id, function of the tokenizer -> the inputs of teacher_cache_fingerprint that change)
CHANGES = [
    ("one teacher weight", lambda tok: dict(teacher=_perturbed_teacher())),
    ("teacher config", lambda tok: dict(teacher=teacher_model(classifier_dropout=0.3))),
    ("tokenizer casing", lambda tok: dict(tokenizer=BertTokenizerFast(vocab=tok.get_vocab(), do_lower_case=False))),
    ("tokenizer vocab", lambda tok: dict(tokenizer=BertTokenizerFast(vocab={**tok.get_vocab(), "zzz": 55}))),
    ("one token of one row", lambda tok: dict(data=_one_row_changed(dataset(tok), 5))),
    ("row order", lambda tok: dict(data=dataset(tok).shuffle(seed=0))),
    ("a row fewer", lambda tok: dict(data=dataset(tok).select(range(23)))),
    ("another dataset", lambda tok: dict(data=dataset(tok, seed=7))),
    ("max length", lambda tok: dict(max_length=16)),
    ("hidden layers", lambda tok: dict(spec=replace(SPEC, hidden_layers=(1,)))),
    ("attention layers", lambda tok: dict(spec=replace(SPEC, attention_layers=()))),
    ("embeddings", lambda tok: dict(spec=replace(SPEC, embeddings=False))),
    ("storage dtype", lambda tok: dict(spec=replace(SPEC, dtype="float32"))),
    ("top-k", lambda tok: dict(spec=replace(SPEC, top_k=1))),
]


def fingerprint(base_tokenizer, /, **changes) -> str:
    inputs = dict(
        teacher=teacher_model(), tokenizer=base_tokenizer, data=dataset(base_tokenizer), spec=SPEC, max_length=None
    )
    inputs.update(changes)
    return teacher_cache_fingerprint(
        inputs["teacher"], inputs["tokenizer"], inputs["data"], inputs["spec"], inputs["max_length"]
    )[0]


@pytest.mark.parametrize("change", [c[1] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_fingerprint_changes_with_every_input(tiny_tokenizer, change):
    reference = fingerprint(tiny_tokenizer)
    # The same inputs rebuilt from scratch (new objects, a new random Dataset._fingerprint) give the same key...
    assert fingerprint(tiny_tokenizer) == reference
    # ...and labels are not teacher inputs: relabelled data has the same teacher outputs, hence the same cache.
    assert fingerprint(tiny_tokenizer, data=dataset(tiny_tokenizer).map(lambda r: {"labels": 1})) == reference
    assert fingerprint(tiny_tokenizer, **change(tiny_tokenizer)) != reference


def test_using_a_tokenizer_does_not_change_its_fingerprint(tiny_tokenizer):
    """Each call with truncation/padding sets the backend's runtime state; that is not part of the key."""
    tokenizer = BertTokenizerFast(vocab=tiny_tokenizer.get_vocab(), do_lower_case=True)
    before = fingerprint(tokenizer)
    tokenizer(["the movie", "a good film"], truncation=True, max_length=5, padding="max_length")
    assert fingerprint(tokenizer) == before


def test_a_cache_built_for_one_dataset_is_never_attached_to_another(tmp_path, tiny_tokenizer):
    teacher, data = teacher_model(), dataset(tiny_tokenizer)
    cache = build(tmp_path, teacher, data, tiny_tokenizer)
    attach_teacher_cache(data, cache)  # fine
    for other in (dataset(tiny_tokenizer, seed=3), data.shuffle(seed=0), data.select(range(10))):
        with pytest.raises(ValueError, match="built for another dataset"):
            attach_teacher_cache(other, cache)
    # Looking up the cache for other data builds a new one next to it instead of reusing it.
    other = build(tmp_path, teacher, dataset(tiny_tokenizer, seed=3), tiny_tokenizer)
    assert other.built and other.path != cache.path


def test_a_failed_build_leaves_nothing_behind_and_a_later_build_succeeds(tmp_path, tiny_tokenizer):
    teacher, data = teacher_model(), dataset(tiny_tokenizer)
    calls = count_forwards(teacher)

    def fail_on_third_batch(*_):
        if calls[0] == 3:
            raise RuntimeError("killed mid-build")

    handle = teacher.register_forward_pre_hook(fail_on_third_batch)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build(tmp_path, teacher, data, tiny_tokenizer)
    assert os.listdir(tmp_path / "cache") == []
    handle.remove()
    cache = build(tmp_path, teacher, data, tiny_tokenizer)
    assert cache.built and os.listdir(tmp_path / "cache") == [os.path.basename(cache.path)]
    assert build(tmp_path, teacher, data, tiny_tokenizer).built is False
    assert load_teacher_cache(cache.path).fingerprint == cache.fingerprint


# ------------------------------------------------------------------------------------------------ contents
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collated_cache_equals_the_live_teacher_at_every_real_token(tmp_path, tiny_tokenizer, padding_side):
    tokenizer = BertTokenizerFast(vocab=tiny_tokenizer.get_vocab(), do_lower_case=True, padding_side=padding_side)
    teacher, data = teacher_model(), dataset(tokenizer, n=12)
    spec = TeacherCacheSpec(hidden_layers=(0, 2), attention_layers=(1,), embeddings=True, dtype="float32")
    # One build batch of all 12 rows, so the reference below sees the very same padding. (BERT's positions count
    # from the first, padded, slot under left padding: its outputs depend on the batch, cached or not.)
    cache = build(tmp_path, teacher, data, tokenizer, spec=spec, batch_size=12)
    with torch.no_grad():
        reference = forward_with_features(
            teacher, DataCollatorWithPadding(tokenizer)(data[:12]), hidden_layers=[0, 2], attention_layers=[1],
            embeddings=True,
        )  # fmt: skip

    picked = [0, 3, 7, 11]
    rows = [attach_teacher_cache(data, cache)[i] for i in picked]
    batch = TeacherCacheCollator(DataCollatorWithPadding(tokenizer), cache.layouts, padding_side)(rows)
    cached = cached_teacher_features(batch, num_classes=2, hidden_layers=[0, 2], attention_layers=[1], embeddings=True)
    torch.testing.assert_close(cached.outputs.logits, reference.outputs.logits[picked])

    def real(t: torch.Tensor, n: int, dims: int = 1) -> torch.Tensor:  # the n real positions of the last `dims` dims
        s = slice(t.shape[-1 if dims == 2 else 0] - n, None) if padding_side == "left" else slice(0, n)
        return t[..., s, s] if dims == 2 else t[s]

    for b, i in enumerate(picked):
        n = len(data[i]["input_ids"])
        padded = cached.hidden_states[0][b]
        assert padded.abs().sum(-1).ne(0).sum() == n  # zeros everywhere but the row's own n tokens
        for layer in (0, 2):
            torch.testing.assert_close(
                real(cached.hidden_states[layer][b], n), real(reference.hidden_states[layer][i], n)
            )
        torch.testing.assert_close(real(cached.embeddings[b], n), real(reference.embeddings[i], n))
        torch.testing.assert_close(real(cached.attentions[1][b], n, 2), real(reference.attentions[1][i], n, 2))


def test_pad_cached_rows_places_each_row_where_its_tokens_are():
    rows = [torch.arange(2 * 3.0), torch.arange(1 * 3.0) + 10]
    right = pad_cached_rows(rows, "token", 3, [2, 1], 4, "right")
    left = pad_cached_rows(rows, "token", 3, [2, 1], 4, "left")
    assert right[0, :2].tolist() == [[0, 1, 2], [3, 4, 5]] and (right[0, 2:] == 0).all()
    assert left[1, 3].tolist() == [10, 11, 12] and (left[1, :3] == 0).all()
    maps = [torch.ones(2 * 2 * 2), torch.full((2 * 1 * 1,), 5.0)]
    attn = pad_cached_rows(maps, "attention", 2, [2, 1], 3, "left")
    assert attn.shape == (2, 2, 3, 3) and attn[1, :, 2, 2].tolist() == [5, 5] and attn[1].sum() == 10
    assert attn[0, :, 1:, 1:].eq(1).all() and attn[0, :, 0].eq(0).all()


def test_float16_overflow_is_refused_with_the_way_out(tmp_path, tiny_tokenizer):
    teacher, data = teacher_model(), dataset(tiny_tokenizer)
    with torch.no_grad():
        teacher.bert.encoder.layer[1].output.LayerNorm.weight.fill_(1e6)
    with pytest.raises(ValueError, match="teacher_cache_hidden_1 overflows float16.*teacher_cache_dtype='float32'"):
        build(tmp_path, teacher, data, tiny_tokenizer, spec=TeacherCacheSpec(hidden_layers=(1,)))
    assert os.listdir(tmp_path / "cache") == []


# ------------------------------------------------------------------------------------------------ top-k
def reference_top_k_kl(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Slow reference: per row, T² Σ_{c in teacher's top-k} p̃(c) (log p̃(c) - log p_S(c)), p̃ renormalised on top-k."""
    total = 0.0
    rows = 0
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])):
        top = t_row.topk(k).indices.tolist()
        t_scaled = [float(t_row[c]) / temperature for c in top]
        z = math.log(sum(math.exp(v) for v in t_scaled))
        log_s = torch.log_softmax(s_row.double() / temperature, -1)
        total += sum(math.exp(v - z) * ((v - z) - float(log_s[c])) for v, c in zip(t_scaled, top))
        rows += 1
    return torch.tensor(total * temperature**2 / rows)


@pytest.mark.parametrize("shape, k, temperature", [((4, 10), 3, 2.0), ((2, 5, 12), 4, 1.0), ((3, 7), 1, 3.0)])
def test_top_k_kl_is_kl_to_the_teacher_renormalised_over_its_top_k(shape, k, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    top = teacher.topk(k, dim=-1)
    loss = kl_div_loss(student, densify_top_k(top.indices, top.values, shape[-1]), temperature=temperature)
    torch.testing.assert_close(loss, reference_top_k_kl(student, teacher, k, temperature).float())
    # Gradients stay finite although most teacher logits are -inf.
    s = student.clone().requires_grad_(True)
    kl_div_loss(s, densify_top_k(top.indices, top.values, shape[-1]), temperature=temperature).backward()
    assert torch.isfinite(s.grad).all()


def test_top_k_kl_is_exact_when_k_covers_the_teacher_support():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    full = kl_div_loss(student, teacher, temperature=2.0)
    top = teacher.topk(9, dim=-1)  # k = C: the full distribution
    torch.testing.assert_close(kl_div_loss(student, densify_top_k(top.indices, top.values, 9), temperature=2.0), full)
    # A teacher with no mass outside 3 classes: its top-3 is the whole distribution, so the loss is the full KL.
    sparse = teacher.clone()
    sparse[:, 3:] = float("-inf")
    top = sparse.topk(3, dim=-1)
    torch.testing.assert_close(
        kl_div_loss(student, densify_top_k(top.indices, top.values, 9)), kl_div_loss(student, sparse)
    )
    # Analytic: a student equal to the teacher's renormalised top-k (and ~0 elsewhere) has zero loss.
    one = torch.tensor([[2.0, 1.0, -1e9, -1e9]])
    top = torch.tensor([[2.0, 1.0, 0.5, 0.0]]).topk(2)
    assert kl_div_loss(one, densify_top_k(top.indices, top.values, 4)).abs() < 1e-6


def test_token_level_top_k_cache_stores_k_logits_per_token(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    teacher = BertForTokenClassification(tiny_bert_config(num_layers=2, hidden=32, num_labels=8)).eval()
    data = dataset(tiny_tokenizer, n=10).remove_columns("labels")
    cache = build(tmp_path, teacher, data, tiny_tokenizer, spec=TeacherCacheSpec(top_k=3))
    assert set(cache.layouts) == {TOPK_VALUES_COLUMN, "teacher_cache_topk_indices"}
    assert len(cache.dataset[0][TOPK_VALUES_COLUMN]) == 3 * len(data[0]["input_ids"])
    rows = [attach_teacher_cache(data, cache)[i] for i in range(4)]
    batch = TeacherCacheCollator(DataCollatorWithPadding(tiny_tokenizer), cache.layouts)(rows)
    cached = cached_teacher_features(batch, num_classes=8).outputs.logits
    with torch.no_grad():
        live = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    top = live.topk(3, dim=-1)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached[real], densify_top_k(top.indices, top.values, 8)[real])
    assert torch.isfinite(cached).sum(-1)[real].eq(3).all()


def test_full_logits_are_kept_when_top_k_is_not_smaller_than_the_classes(tmp_path, tiny_tokenizer):
    cache = build(
        tmp_path, teacher_model(), dataset(tiny_tokenizer, n=6), tiny_tokenizer, spec=TeacherCacheSpec(top_k=2)
    )
    assert list(cache.layouts) == [LOGITS_COLUMN]


def test_spec_normalises_what_does_not_change_the_contents():
    same = TeacherCacheSpec(logits=False, hidden_layers=(1, 3))
    assert TeacherCacheSpec(logits=False, top_k=5, hidden_layers=(3, 1, 1)) == same  # no logits: top_k is moot
    with pytest.raises(ValueError, match="must cache something"):
        TeacherCacheSpec(logits=False)


# ------------------------------------------------------------------------------------------------ config
# (case id, DistillationConfig overrides, regex the ValueError must match)
BAD_CONFIGS = [
    ("attention not cached", dict(use_teacher_cache=True, attention_weight=1.0), "teacher_cache_attentions=True"),
    ("top-k with mse", dict(use_teacher_cache=True, teacher_cache_top_k=5, logits_loss="mse"), "logits_loss='mse'"),
    (
        "top-k with reverse kl",
        dict(use_teacher_cache=True, teacher_cache_top_k=5, logits_loss="reverse_kl"),
        "logits_loss='reverse_kl'",
    ),  # fmt: skip
    ("top-k 0", dict(use_teacher_cache=True, teacher_cache_top_k=0), "teacher_cache_top_k must be >= 1"),
    ("bad dtype", dict(use_teacher_cache=True, teacher_cache_dtype="bfloat16"), "teacher_cache_dtype must be one of"),
]


@pytest.mark.parametrize("overrides, message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_cache_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="unused", report_to="none", use_cpu=True, **overrides)


def test_top_k_cache_trains_with_jsd(tmp_path, tiny_tokenizer):
    trainer = make_trainer(
        tmp_path, tiny_tokenizer, use_teacher_cache=True, teacher_cache_top_k=1, logits_loss="jsd", hidden_weight=0.0,
        embeddings_weight=0.0, attention_weight=0.0, max_steps=1,
    )  # fmt: skip
    assert TOPK_VALUES_COLUMN in trainer.teacher_cache.layouts
    trainer.train()
    assert all(math.isfinite(v) for e in logged_terms(trainer) for v in e.values())
