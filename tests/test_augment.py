"""Augmented transfer sets (hf_distill.augment): EDA edits, TinyBERT's MLM replacement, determinism, Arrow cache."""

import os
import random
from collections import Counter

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast, DataCollatorWithPadding

from hf_distill import augment, build_teacher_cache
from hf_distill.augment import (
    EDA_METHODS,
    SOURCE_INDEX_COLUMN,
    augment_dataset,
    corpus_vocabulary,
    mlm_word_candidates,
    random_deletion,
    random_insertion,
    random_replacement,
    random_swap,
    texts_digest,
)

SENTENCES = [
    "the movie was good",
    "a very boring plot",
    "it was not great but fun",
    "loved the actors and the story",
    "the worst film of the year",
    "funny",
    "a dull and awful plot with bad actors",
    "really fun",
]
VOCABULARY = corpus_vocabulary(SENTENCES)
METHODS = [*EDA_METHODS, "eda"]


@pytest.fixture
def source():
    return Dataset.from_dict({"sentence": SENTENCES, "label": [1, 0, 1, 1, 0, 1, 0, 1]})


@pytest.fixture(scope="module")
def mlm():
    """A tiny BertForMaskedLM and its tokenizer; `##ing` makes "boring"-like words of two wordpieces possible."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "year", "##ing", "[unused0]", "<unk2>"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config(vocab_size=len(vocab))).eval(), tokenizer


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


# ---------------------------------------------------------------------------------------------------------------------
# Each edit's invariants, over many random draws
# ---------------------------------------------------------------------------------------------------------------------
def check_swap(words, out, n):
    assert Counter(out) == Counter(words)


def check_delete(words, out, n):
    assert 1 <= len(out) <= len(words) and is_subsequence(out, words)


def check_insert(words, out, n):
    assert len(out) == len(words) + n and is_subsequence(words, out)
    assert set(out) - set(words) <= set(VOCABULARY)
    added = Counter(out) - Counter(words)
    assert sum(added.values()) == n and set(added) <= set(VOCABULARY)


def check_replace(words, out, n):
    assert len(out) == len(words)
    changed = [i for i, (a, b) in enumerate(zip(words, out)) if a != b]
    assert 1 <= len(changed) <= n and all(out[i] in VOCABULARY for i in changed)


EDIT_CASES = [
    # (name, edit(words, rng), invariant check)
    ("swap", lambda w, r: random_swap(w, 2, r), check_swap),
    ("delete", lambda w, r: random_deletion(w, 0.5, r), check_delete),
    ("delete_all_drawn", lambda w, r: random_deletion(w, 1.0, r), check_delete),
    ("insert", lambda w, r: random_insertion(w, 2, VOCABULARY, r), check_insert),
    ("replace", lambda w, r: random_replacement(w, 2, VOCABULARY, r), check_replace),
]


@pytest.mark.parametrize("name,edit,check", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_edit_invariants(name, edit, check):
    rng = random.Random(0)
    for sentence in SENTENCES[:5] + SENTENCES[6:]:
        words = sentence.split()
        for _ in range(50):
            check(words, edit(words, rng), 2)


def test_deletion_of_everything_keeps_one_word():
    out = random_deletion("a very boring plot".split(), 1.0, random.Random(3))
    assert len(out) == 1 and out[0] in "a very boring plot".split()


# ---------------------------------------------------------------------------------------------------------------------
# augment_dataset: determinism, no unchanged rows, no duplicates, labels dropped
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_augment_dataset_rows(source, method):
    out = augment_dataset(source, "sentence", method=method, n_per_row=3, seed=0, p=0.2)
    assert out.column_names == ["sentence", SOURCE_INDEX_COLUMN]  # the label is gone: the teacher labels these
    assert len(out) > len(SENTENCES)
    by_source: dict[int, list[str]] = {}
    for text, index in zip(out["sentence"], out[SOURCE_INDEX_COLUMN]):
        assert text != SENTENCES[index]
        by_source.setdefault(index, []).append(text)
    assert list(by_source) == sorted(by_source)  # source order
    for index, texts in by_source.items():
        assert 1 <= len(texts) <= 3 and len(set(texts)) == len(texts), (index, texts)
    if method != "swap":  # every multi-word row can make 3 distinct outputs with these edits
        assert all(len(by_source.get(i, [])) == 3 for i, s in enumerate(SENTENCES) if len(s.split()) > 3)


@pytest.mark.parametrize("method", METHODS)
def test_augment_dataset_is_deterministic(source, method):
    first = augment_dataset(source, "sentence", method=method, n_per_row=3, seed=0, p=0.2)
    again = augment_dataset(source, "sentence", method=method, n_per_row=3, seed=0, p=0.2, batch_size=3)
    other = augment_dataset(source, "sentence", method=method, n_per_row=3, seed=1, p=0.2)
    assert first.to_dict() == again.to_dict()
    assert first["sentence"] != other["sentence"]


def test_augment_dataset_independent_of_num_proc(source):
    one = augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=5, p=0.2)
    two = augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=5, p=0.2, num_proc=2, batch_size=1)
    assert one.to_dict() == two.to_dict()


@pytest.mark.parametrize("method", ["swap", "delete"])  # edits without a vocabulary (that comes from all rows)
def test_row_output_depends_on_its_index_not_its_neighbours(source, method):
    full = augment_dataset(source, "sentence", method=method, n_per_row=2, seed=0, p=0.2)
    # The first rows alone: row i depends on (seed, i, settings) only, not on the other rows or the batches.
    head = augment_dataset(source.select(range(4)), "sentence", method=method, n_per_row=2, seed=0, p=0.2)
    assert head.to_dict() == full.filter(lambda r: r[SOURCE_INDEX_COLUMN] < 4).to_dict()


def test_rows_that_cannot_change_yield_nothing():
    # Only whitespace would differ for rows 1-3 (SST-2 sentences end in a space): that is the unchanged sentence.
    data = Dataset.from_dict({"sentence": ["fun", "fun fun ", " fun  fun", "", "good movie "]})
    out = augment_dataset(data, "sentence", method="swap", n_per_row=4, seed=0)
    assert out["sentence"] == ["movie good"] and out[SOURCE_INDEX_COLUMN] == [4]


# ---------------------------------------------------------------------------------------------------------------------
# Settings are checked before any work, naming the field
# ---------------------------------------------------------------------------------------------------------------------
BAD_SETTINGS = [
    # (overrides, the field the message must name)
    ({"p": -0.1}, "p must be a probability in [0, 1], got -0.1"),
    ({"p": 1.5}, "p must be a probability in [0, 1], got 1.5"),
    ({"n_per_row": 0}, "n_per_row must be an integer >= 1, got 0"),
    ({"n_per_row": 2.5}, "n_per_row must be an integer >= 1, got 2.5"),
    ({"method": "backtranslate"}, "method must be one of"),
    ({"text_column": "text"}, "text_column 'text' is not a column"),
    ({"text_column": "label"}, "text_column 'label' must hold strings"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
    ({"max_tries": 0}, "max_tries must be an integer >= 1, got 0"),
    ({"method": "mlm"}, "method='mlm' needs mlm_model and mlm_tokenizer"),
]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=[m.split(" ")[0] for _, m in BAD_SETTINGS])
def test_bad_settings(source, tmp_path, overrides, message):
    kwargs = {
        "text_column": "sentence",
        "method": "eda",
        "n_per_row": 2,
        "seed": 0,
        "cache_dir": tmp_path,
        **overrides,
    }
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        augment_dataset(source, kwargs.pop("text_column"), **kwargs)
    assert os.listdir(tmp_path) == []


def test_mlm_model_without_head_is_refused(source, mlm):
    _, tokenizer = mlm
    classifier = BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="mlm_model must have a masked-LM head, got BertForSequenceClassification"):
        augment_dataset(
            source, "sentence", method="mlm", n_per_row=2, seed=0, mlm_model=classifier, mlm_tokenizer=tokenizer
        )


def test_texts_digest_is_a_function_of_the_texts():
    # Hashing an Arrow string column through numpy (`np.asarray(col).tobytes()`) hashes object pointers: the key
    # changed on every call and the cache was never reused. The digest must depend on the texts alone.
    a = Dataset.from_dict({"sentence": list(SENTENCES)})
    b = Dataset.from_dict({"sentence": [s[:] + "" for s in SENTENCES], "label": list(range(8))})
    assert texts_digest(a, "sentence") == texts_digest(b, "sentence") == texts_digest(a, "sentence")
    assert texts_digest(a, "sentence") != texts_digest(a.select(range(7)), "sentence")
    changed = Dataset.from_dict({"sentence": [*SENTENCES[:-1], "really fun!"]})
    assert texts_digest(a, "sentence") != texts_digest(changed, "sentence")
    joined = Dataset.from_dict({"sentence": ["ab", "c"]})
    assert texts_digest(joined, "sentence") != texts_digest(Dataset.from_dict({"sentence": ["a", "bc"]}), "sentence")


# ---------------------------------------------------------------------------------------------------------------------
# The Arrow cache: reused, rebuilt on a change, nothing half-written
# ---------------------------------------------------------------------------------------------------------------------
def test_cache_is_reused_without_recomputing(source, tmp_path, monkeypatch):
    built = augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, p=0.2, cache_dir=tmp_path)
    (entry,) = os.listdir(tmp_path)
    assert os.path.isfile(tmp_path / entry / augment.METADATA_NAME)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache matches")

    monkeypatch.setattr(augment, "eda_edit", fail)
    reused = augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, p=0.2, cache_dir=tmp_path)
    assert reused.to_dict() == built.to_dict()
    assert os.listdir(tmp_path) == [entry]


CHANGES = [
    {"p": 0.3},
    {"seed": 1},
    {"n_per_row": 3},
    {"method": "swap"},
    {"max_tries": 5},
]


@pytest.mark.parametrize("change", CHANGES, ids=[next(iter(c)) for c in CHANGES])
def test_cache_rebuilds_on_a_changed_setting(source, tmp_path, change):
    settings = {"method": "eda", "n_per_row": 2, "seed": 0, "p": 0.2}
    augment_dataset(source, "sentence", cache_dir=tmp_path, **settings)
    augment_dataset(source, "sentence", cache_dir=tmp_path, **{**settings, **change})
    assert len(os.listdir(tmp_path)) == 2


def test_cache_rebuilds_on_changed_texts(source, tmp_path):
    augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, cache_dir=tmp_path)
    edited = source.map(lambda r, i: {"sentence": r["sentence"] + (" again" if i == 3 else "")}, with_indices=True)
    out = augment_dataset(edited, "sentence", method="eda", n_per_row=2, seed=0, cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 2
    assert any("again" in t for t in out["sentence"])


def test_nothing_half_written_on_an_error(source, tmp_path, monkeypatch):
    augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, p=0.2, cache_dir=tmp_path)
    before = os.listdir(tmp_path)

    save = Dataset.save_to_disk

    def save_then_fail(self, path, *args, **kwargs):  # the Arrow files are written, then the disk fills up
        save(self, path, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "save_to_disk", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, p=0.3, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == before  # no temp dir, no partial entry


def test_a_foreign_directory_at_the_entry_is_refused_before_any_work(source, tmp_path, monkeypatch):
    augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, cache_dir=tmp_path)
    (entry,) = os.listdir(tmp_path)
    os.remove(tmp_path / entry / augment.METADATA_NAME)

    def fail(*args, **kwargs):
        raise AssertionError("augmented although the entry cannot be written")

    monkeypatch.setattr(augment, "eda_edit", fail)
    with pytest.raises(ValueError, match="exists but is not an augmented set"):
        augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == [entry]


def test_mid_augmentation_error_leaves_no_entry(source, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("edit failed")

    monkeypatch.setattr(augment, "eda_edit", fail)
    with pytest.raises(RuntimeError, match="edit failed"):
        augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, cache_dir=tmp_path)
    assert not os.path.exists(tmp_path) or os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# TinyBERT's masked-LM word replacement
# ---------------------------------------------------------------------------------------------------------------------
def test_mlm_candidates_only_for_single_wordpiece_words(mlm):
    model, tokenizer = mlm
    words = "the movie was zzz funing good".split()  # zzz: [UNK]; funing: fun + ##ing
    candidates = mlm_word_candidates(words, model, tokenizer, top_k=4)
    assert [len(c) for c in candidates] == [4, 4, 4, 0, 0, 4]
    vocab = set(tokenizer.get_vocab())
    for word, cands in zip(words, candidates):
        assert word not in cands and len(set(cands)) == len(cands)
        assert all(c in vocab and not c.startswith(("##", "[", "<")) for c in cands)
    assert candidates == mlm_word_candidates(words, model, tokenizer, top_k=4)


def test_mlm_never_proposes_special_reserved_or_continuation_tokens(mlm):
    model, tokenizer = mlm
    never = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "##ing", "[unused0]", "<unk2>"}
    words = "the movie was good".split()
    for word, cands in zip(words, mlm_word_candidates(words, model, tokenizer, top_k=1000)):
        assert set(cands) == set(tokenizer.get_vocab()) - never - {word}


def test_mlm_candidates_are_the_models_top_k(mlm):
    model, tokenizer = mlm
    words = "the movie was good".split()
    candidates = mlm_word_candidates(words, model, tokenizer, top_k=3)
    ids = tokenizer(words, is_split_into_words=True, return_tensors="pt")["input_ids"]
    masked = ids.clone()
    masked[0, 2] = tokenizer.mask_token_id  # "movie"
    with torch.no_grad():
        logits = model(input_ids=masked).logits[0, 2]
    never = {*tokenizer.all_special_ids, *tokenizer.convert_tokens_to_ids(["##ing", "[unused0]", "<unk2>"])}
    allowed = [i for i in logits.argsort(descending=True).tolist() if i not in never and i != ids[0, 2].item()]
    assert candidates[1] == tokenizer.convert_ids_to_tokens(allowed[:3])


def test_mlm_candidates_stop_at_the_model_length(mlm):
    model, tokenizer = mlm
    words = ("the movie was good " * 20).split()  # 80 words, the model takes 64 positions
    candidates = mlm_word_candidates(words, model, tokenizer, top_k=2)
    assert all(len(c) == 2 for c in candidates[:62]) and all(c == [] for c in candidates[62:])


def test_mlm_augmentation_replaces_only_words(source, mlm, tmp_path):
    model, tokenizer = mlm
    kwargs = {"method": "mlm", "n_per_row": 3, "seed": 0, "p": 0.4, "top_k": 5}
    out = augment_dataset(source, "sentence", mlm_model=model, mlm_tokenizer=tokenizer, **kwargs)
    assert len(out) > len(SENTENCES)
    for text, index in zip(out["sentence"], out[SOURCE_INDEX_COLUMN]):
        words, new = SENTENCES[index].split(), text.split()
        assert len(new) == len(words) and new != words
        candidates = mlm_word_candidates(words, model, tokenizer, top_k=5)
        assert all(a == b or b in c for a, b, c in zip(words, new, candidates))
    again = augment_dataset(source, "sentence", mlm_model=model, mlm_tokenizer=tokenizer, batch_size=2, **kwargs)
    assert again.to_dict() == out.to_dict()
    other = augment_dataset(source, "sentence", mlm_model=model, mlm_tokenizer=tokenizer, **{**kwargs, "seed": 1})
    assert other["sentence"] != out["sentence"]


def test_mlm_in_train_mode_is_run_in_eval_mode_and_handed_back(source, mlm):
    model, tokenizer = mlm
    kwargs = {"method": "mlm", "n_per_row": 3, "seed": 0, "p": 0.5, "mlm_tokenizer": tokenizer}
    expected = augment_dataset(source, "sentence", mlm_model=model, **kwargs)
    model.train()  # dropout 0.1: its candidates would change from call to call
    try:
        torch.manual_seed(123)
        got = augment_dataset(source, "sentence", mlm_model=model, **kwargs)
        assert model.training
    finally:
        model.eval()
    assert got.to_dict() == expected.to_dict()


def test_mlm_cache_rebuilds_on_changed_weights(source, mlm, tmp_path):
    model, tokenizer = mlm
    kwargs = {"method": "mlm", "n_per_row": 2, "seed": 0, "p": 0.4, "cache_dir": tmp_path, "mlm_tokenizer": tokenizer}
    augment_dataset(source, "sentence", mlm_model=model, **kwargs)
    augment_dataset(source, "sentence", mlm_model=model, **kwargs)
    assert len(os.listdir(tmp_path)) == 1
    torch.manual_seed(7)
    other = BertForMaskedLM(tiny_bert_config(vocab_size=len(tokenizer))).eval()
    augment_dataset(source, "sentence", mlm_model=other, **kwargs)
    assert len(os.listdir(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------------------------------
# The point of it: the teacher labels the augmented rows once, through the teacher cache
# ---------------------------------------------------------------------------------------------------------------------
def test_teacher_cache_labels_the_augmented_rows(source, tmp_path, tiny_teacher, tiny_tokenizer):
    out = augment_dataset(source, "sentence", method="eda", n_per_row=2, seed=0, cache_dir=tmp_path / "augmented")
    tokenized = out.map(lambda b: tiny_tokenizer(b["sentence"], truncation=True), batched=True)
    collator = DataCollatorWithPadding(tiny_tokenizer)
    cache = build_teacher_cache(tiny_teacher, tokenized, collator, cache_dir=tmp_path / "teacher", batch_size=4)
    assert cache.built and len(cache.dataset) == len(out)
    again = build_teacher_cache(tiny_teacher, tokenized, collator, cache_dir=tmp_path / "teacher", batch_size=4)
    assert not again.built and again.fingerprint == cache.fingerprint
