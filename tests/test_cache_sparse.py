"""Teacher cache in the sparse form (top-k log-probabilities + tail mass): what the live teacher computes, keyed by
k, the tail and the temperature, placed under either padding, read back without a dense vocabulary tensor."""

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import (
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_distill import (
    TeacherCacheCollator,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    cached_teacher_features,
    teacher_cache_fingerprint,
)
from hf_distill.cache import (
    LOGITS_COLUMN,
    TOPK_INDICES_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    TOPK_TAIL_COLUMN,
    TOPK_VALUES_COLUMN,
    SparseTeacherLogits,
)
from hf_distill.losses.sparse import sparse_kl_loss

VOCAB = 64


def tail_spec(k: int, temperature: float) -> TeacherCacheSpec:
    return TeacherCacheSpec(top_k=k, top_k_tail=True, temperature=temperature)


SPARSE = tail_spec(5, 2.0)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a peakier teacher than the random init's near-uniform one: a tail of a few percent
        model.lm_head.weight.mul_(8.0)
    return model


def texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (m,), generator=g).tolist()) for m in lengths]


def dataset(tokenizer, n: int = 12, seed: int = 0) -> Dataset:
    return Dataset.from_dict(dict(tokenizer(texts(n, seed), truncation=True, max_length=16)))


def side(tokenizer, padding_side: str):
    return BertTokenizerFast(vocab=tokenizer.get_vocab(), do_lower_case=True, padding_side=padding_side)


def build(tmp_path, teacher, data, tokenizer, spec=SPARSE, batch_size=12):
    return build_teacher_cache(
        teacher, data, DataCollatorWithPadding(tokenizer), cache_dir=tmp_path / "cache", spec=spec,
        tokenizer=tokenizer, batch_size=batch_size,
    )  # fmt: skip


def cached_batch(cache, data, tokenizer, picked, padding_side="right"):
    rows = [attach_teacher_cache(data, cache)[i] for i in picked]
    return TeacherCacheCollator(DataCollatorWithPadding(tokenizer), cache.layouts, padding_side)(rows)


def direct_top_k_tail(logits: torch.Tensor, k: int, temperature: float):
    """The top-k and tail computed the plain way, in float64: log_softmax, topk, log(1 - Σ p)."""
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    top = log_p.topk(k, -1)
    return top.indices, top.values, torch.log1p(-top.values.exp().sum(-1))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cached_sparse_features_equal_the_live_teachers_top_k_and_tail(tmp_path, tiny_tokenizer, padding_side):
    tokenizer = side(tiny_tokenizer, padding_side)
    teacher, data = tiny_llama(), dataset(tokenizer)
    # One build batch of all 12 rows, so the reference below sees the same padding (Llama counts positions from the
    # first slot: under left padding its outputs depend on the batch, cached or live).
    cache = build(tmp_path, teacher, data, tokenizer)
    assert set(cache.layouts) == {TOPK_INDICES_COLUMN, TOPK_LOGPROBS_COLUMN, TOPK_TAIL_COLUMN}
    assert cache.dataset.features[TOPK_INDICES_COLUMN].feature.dtype == "int32"
    assert cache.dataset.features[TOPK_LOGPROBS_COLUMN].feature.dtype == "float32"
    assert len(cache.dataset[0][TOPK_LOGPROBS_COLUMN]) == 5 * len(data[0]["input_ids"])
    assert len(cache.dataset[0][TOPK_TAIL_COLUMN]) == len(data[0]["input_ids"])
    with torch.no_grad():
        full = DataCollatorWithPadding(tokenizer)(data[:12])
        live = teacher(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    ids, logprobs, tail = direct_top_k_tail(live, 5, 2.0)

    picked = [0, 3, 7, 11]  # another batch: re-padded to its own longest row
    batch = cached_batch(cache, data, tokenizer, picked, padding_side)
    features = cached_teacher_features(batch, num_classes=VOCAB)
    sparse = features.outputs.sparse_logits
    assert features.outputs.logits is None and isinstance(sparse, SparseTeacherLogits)
    padded = batch["input_ids"].shape[1]
    assert sparse.ids.shape == sparse.logprobs.shape == (4, padded, 5) and sparse.tail_logprob.shape == (4, padded)
    for b, i in enumerate(picked):
        n = len(data[i]["input_ids"])
        here = slice(padded - n, None) if padding_side == "left" else slice(0, n)
        there = slice(full["input_ids"].shape[1] - n, None) if padding_side == "left" else slice(0, n)
        assert torch.equal(sparse.ids[b, here].long(), ids[i, there])
        torch.testing.assert_close(sparse.logprobs[b, here].double(), logprobs[i, there], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse.tail_logprob[b, here].double(), tail[i, there], rtol=1e-5, atol=1e-6)
        assert 0.005 < tail[i, there].exp().min() and tail[i, there].exp().max() < 0.9  # a tail that matters
        pad = torch.ones(padded, dtype=torch.bool)
        pad[here] = False
        assert sparse.logprobs[b, pad].eq(0).all() and sparse.tail_logprob[b, pad].eq(0).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_and_masked_positions_never_count(tmp_path, tiny_tokenizer, padding_side):
    tokenizer = side(tiny_tokenizer, padding_side)
    teacher, data = tiny_llama(), dataset(tokenizer)
    cache = build(tmp_path, teacher, data, tokenizer, batch_size=1)  # each row alone: no padding at build time
    batch = cached_batch(cache, data, tokenizer, [1, 2, 5, 9], padding_side)
    assert not batch["attention_mask"].bool().all()  # rows of several lengths: padding to leave out
    sparse = cached_teacher_features(batch, num_classes=VOCAB).outputs.sparse_logits
    torch.manual_seed(1)
    student = torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True)
    mask = batch["attention_mask"].bool()
    mask[0, mask[0].nonzero()[-1]] = False  # a real token left out as well (labels of -100, say)
    loss = sparse_kl_loss(student, sparse.ids, sparse.logprobs, sparse.tail_logprob, mask, temperature=2.0)

    # The same loss from each row on its own, unpadded, against the live teacher on that row alone.
    expected = 0.0
    for b, i in enumerate([1, 2, 5, 9]):
        with torch.no_grad():
            live = teacher(input_ids=torch.tensor([data[i]["input_ids"]])).logits[0]
        keep = mask[b][batch["attention_mask"][b].bool()]  # the row's counted tokens, in its own positions
        ids, logprobs, tail = (t[keep] for t in direct_top_k_tail(live, 5, 2.0))
        expected += sparse_kl_loss(
            student[b][mask[b]].detach(), ids, logprobs.float(), tail.float(), temperature=2.0,
            num_items_in_batch=int(mask.sum()),
        )  # fmt: skip
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[~mask].abs().max() == 0


def test_a_cache_built_at_one_temperature_never_serves_another(tmp_path, tiny_tokenizer):
    teacher, data = tiny_llama(), dataset(tiny_tokenizer)
    at_2 = build(tmp_path, teacher, data, tiny_tokenizer, spec=SPARSE)
    at_1 = build(tmp_path, teacher, data, tiny_tokenizer, spec=tail_spec(5, 1))
    assert at_2.built and at_1.built and at_1.path != at_2.path
    assert at_1.components["spec"]["temperature"] == 1.0 and at_2.components["spec"]["temperature"] == 2.0
    again = build(tmp_path, teacher, data, tiny_tokenizer, spec=tail_spec(5, 2))
    assert not again.built and again.path == at_2.path  # 2 and 2.0 are one temperature
    one = cached_teacher_features(cached_batch(at_1, data, tiny_tokenizer, [0]), num_classes=VOCAB)
    two = cached_teacher_features(cached_batch(at_2, data, tiny_tokenizer, [0]), num_classes=VOCAB)
    assert not torch.allclose(one.outputs.sparse_logits.tail_logprob, two.outputs.sparse_logits.tail_logprob)


# (case id, spec) — every one keyed apart from the others
SPECS = [
    ("top-k logits", TeacherCacheSpec(top_k=5)),
    ("top-k + tail", TeacherCacheSpec(top_k=5, top_k_tail=True, temperature=1.0)),
    ("another k", TeacherCacheSpec(top_k=6, top_k_tail=True, temperature=1.0)),
    ("another temperature", TeacherCacheSpec(top_k=5, top_k_tail=True, temperature=2.0)),
    ("all logits", TeacherCacheSpec()),
]


def test_the_key_changes_with_k_the_tail_and_the_temperature(tiny_tokenizer):
    teacher, data = tiny_llama(), dataset(tiny_tokenizer)
    keys = {name: teacher_cache_fingerprint(teacher, tiny_tokenizer, data, spec)[0] for name, spec in SPECS}
    assert len(set(keys.values())) == len(SPECS), keys


def test_spec_normalises_and_refuses():
    # Without the tail the cached logits serve every temperature: it must not split their key.
    assert TeacherCacheSpec(top_k=5, temperature=2.0) == TeacherCacheSpec(top_k=5)
    assert TeacherCacheSpec(logits=False, top_k=5, top_k_tail=True, temperature=2.0, hidden_layers=(1,)) == (
        TeacherCacheSpec(logits=False, hidden_layers=(1,))
    )
    with pytest.raises(ValueError, match="top_k_tail=True .* but top_k is None"):
        TeacherCacheSpec(top_k_tail=True, temperature=1.0)
    with pytest.raises(ValueError, match="needs the temperature .* got None"):
        TeacherCacheSpec(top_k=5, top_k_tail=True)
    with pytest.raises(ValueError, match="needs the temperature .* got 0"):
        TeacherCacheSpec(top_k=5, top_k_tail=True, temperature=0)


def test_sequence_level_sparse_cache_and_full_logits_when_k_covers_the_classes(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=32, num_labels=8)).eval()
    data = dataset(tiny_tokenizer, n=6)
    cache = build(tmp_path, teacher, data, tiny_tokenizer, spec=tail_spec(3, 1))
    sparse = cached_teacher_features(cached_batch(cache, data, tiny_tokenizer, [0, 4]), num_classes=8)
    sparse = sparse.outputs.sparse_logits
    with torch.no_grad():
        live = teacher(**DataCollatorWithPadding(tiny_tokenizer)([data[0], data[4]])).logits
    ids, logprobs, tail = direct_top_k_tail(live, 3, 1.0)
    assert sparse.ids.shape == (2, 3) and sparse.tail_logprob.shape == (2,) and torch.equal(sparse.ids.long(), ids)
    torch.testing.assert_close(sparse.logprobs.double(), logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.tail_logprob.double(), tail, rtol=1e-5, atol=1e-6)
    # k >= the number of classes: the full logits, as without the tail.
    full = build(tmp_path, teacher, data, tiny_tokenizer, spec=tail_spec(8, 1))
    assert list(full.layouts) == [LOGITS_COLUMN]


def test_specs_without_the_tail_store_what_they_did(tmp_path, tiny_tokenizer):
    teacher, data = tiny_llama(), dataset(tiny_tokenizer, n=4)
    cache = build(tmp_path, teacher, data, tiny_tokenizer, spec=TeacherCacheSpec(top_k=5))
    assert set(cache.layouts) == {TOPK_VALUES_COLUMN, TOPK_INDICES_COLUMN}
    features = cached_teacher_features(cached_batch(cache, data, tiny_tokenizer, [0, 1]), num_classes=VOCAB)
    assert features.outputs.sparse_logits is None and features.outputs.logits.shape[-1] == VOCAB


def test_specs_without_the_sparse_form_keep_their_cache_keys():
    """`top_k_tail` and `temperature` enter the key only for the sparse form: every other spec's caches keep the keys
    they had before those fields existed (the key is the spec's fields as they were then)."""
    from hf_distill.cache.fingerprint import spec_key

    plain = TeacherCacheSpec(logits=True, top_k=8, hidden_layers=(1,), dtype="float16")
    assert spec_key(plain) == {
        "logits": True, "top_k": 8, "hidden_layers": (1,), "attention_layers": (), "embeddings": False,
        "dtype": "float16",
    }  # fmt: skip
    sparse = TeacherCacheSpec(logits=True, top_k=8, top_k_tail=True, temperature=2.0)
    assert spec_key(sparse)["top_k_tail"] is True and spec_key(sparse)["temperature"] == 2.0
