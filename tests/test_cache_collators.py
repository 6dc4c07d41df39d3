"""Teacher cache under the training collator: random collators refused, every collated input fed to the teacher.

The build collates the rows with the collator training uses and feeds the teacher what the live path would, so the
cache must equal the live teacher for every input the collator creates (here: an attention mask the data lacks),
under right and left padding; a collator that is not a pure function of its rows is refused before anything is
written; and the collator's class, settings and padding side are part of the cache key.
"""

import math
import os
import random

import numpy as np
import pytest
import torch
from conftest import tiny_bert_config
from datasets import Dataset
from test_cache import SPEC, build, dataset, logged_terms, student_model, teacher_model
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertForMaskedLM,
    BertForTokenClassification,
    BertTokenizerFast,
    DataCollatorForLanguageModeling,
    DataCollatorForPermutationLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DefaultDataCollator,
    RobertaConfig,
    RobertaForTokenClassification,
    default_data_collator,
)

from hf_distill import (
    DistillationConfig,
    DistillationTrainer,
    TeacherCacheCollator,
    TeacherCacheSpec,
    attach_teacher_cache,
    build_teacher_cache,
    cached_teacher_features,
    forward_with_features,
    teacher_cache_fingerprint,
)
from hf_distill.cache import LOGITS_COLUMN


def collator_fingerprint(tokenizer, collator, data=None, **kw) -> str:
    data = data if data is not None else dataset(tokenizer)
    return teacher_cache_fingerprint(teacher_model(), tokenizer, data, SPEC, collator=collator, **kw)[0]


def masked_lm(num_layers: int, hidden: int) -> BertForMaskedLM:
    torch.manual_seed(num_layers)
    return BertForMaskedLM(tiny_bert_config(num_layers=num_layers, hidden=hidden)).eval()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda tok: DataCollatorForLanguageModeling(tok, mlm=True), r"DataCollatorForLanguageModeling\(mlm=True"),
        (lambda tok: DataCollatorForLanguageModeling(tok, whole_word_mask=True), r"whole_word_mask=True"),
        (lambda tok: DataCollatorForPermutationLanguageModeling(tok), "DataCollatorForPermutationLanguageModeling"),
    ],
    ids=["mlm", "whole word mask", "permutation lm"],
)
def test_a_random_masking_collator_is_refused_before_anything_is_written(tmp_path, tiny_tokenizer, make, name):
    data = dataset(tiny_tokenizer).remove_columns("labels")
    message = name + r".*random.*one masking while the student trains on others.*use_teacher_cache=False"
    with pytest.raises(ValueError, match=message):
        build_teacher_cache(masked_lm(4, 32), data, make(tiny_tokenizer), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_trainer_refuses_a_cache_under_an_mlm_collator_and_accepts_causal_lm_collation(tmp_path, tiny_tokenizer):
    data = dataset(tiny_tokenizer).remove_columns("labels")

    def trainer(collator):
        args = DistillationConfig(
            output_dir=str(tmp_path / "out"), use_teacher_cache=True, logits_weight=1.0, task_weight=0.0,
            report_to="none", use_cpu=True, max_steps=1,
        )  # fmt: skip
        return DistillationTrainer(
            model=masked_lm(2, 16), teacher_model=masked_lm(4, 32), args=args, train_dataset=data,
            processing_class=tiny_tokenizer, data_collator=collator,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"DataCollatorForLanguageModeling\(mlm=True.*use_teacher_cache=False"):
        trainer(DataCollatorForLanguageModeling(tiny_tokenizer, mlm=True))
    assert not (tmp_path / "out" / "teacher_cache").exists() or not os.listdir(tmp_path / "out" / "teacher_cache")
    # mlm=False (causal-LM style labels, no masking) is a pure function of the rows: cached.
    assert trainer(DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False)).teacher_cache.built


class RandomTokenCollator:
    """Replaces each row's first word by a random one (from torch, numpy or `random`): not a function of the rows."""

    def __init__(self, tokenizer, source: str):
        self.pad, self.source = DataCollatorWithPadding(tokenizer), source

    def __call__(self, rows):
        batch = self.pad(rows)
        n = batch["input_ids"].shape[0]
        draw = {
            "torch": lambda: torch.randint(5, 50, (n,)),
            "numpy": lambda: torch.as_tensor(np.random.randint(5, 50, n)),
            "random": lambda: torch.tensor([random.randrange(5, 50) for _ in range(n)]),
        }[self.source]
        batch["input_ids"][:, 1] = draw()
        return batch


def with_position_ids(tokenizer):
    """A deterministic custom collator that creates an input the dataset lacks (position_ids from the mask)."""
    pad = DataCollatorWithPadding(tokenizer)

    def collate(rows):
        batch = pad(rows)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    return collate


@pytest.mark.parametrize("source", ["torch", "numpy", "random"])
def test_a_custom_collator_that_draws_random_numbers_is_refused(tmp_path, tiny_tokenizer, source):
    teacher, data, collator = teacher_model(), dataset(tiny_tokenizer), RandomTokenCollator(tiny_tokenizer, source)
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(ValueError, match=r"RandomTokenCollator returned different input_ids for the same 8 rows"):
        build_teacher_cache(teacher, data, collator, cache_dir=tmp_path / "cache", tokenizer=tiny_tokenizer)
    assert not (tmp_path / "cache").exists()
    # The probe reseeds the global generators and puts them back: training randomness is unchanged by it.
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]


@pytest.mark.parametrize(
    "make",
    [
        lambda tok: DataCollatorWithPadding(tok),
        lambda tok: DataCollatorWithPadding(tok, padding="max_length", max_length=16),
        lambda tok: DataCollatorForTokenClassification(tok),
        lambda tok: DataCollatorForSeq2Seq(tok),
        lambda tok: DataCollatorForLanguageModeling(tok, mlm=False),
        with_position_ids,
    ],
    ids=["padding", "max_length padding", "token classification", "seq2seq", "causal lm", "custom with positions"],
)
def test_deterministic_collators_are_accepted_and_every_input_they_create_reaches_the_teacher(
    tmp_path, tiny_tokenizer, make
):
    torch.manual_seed(0)
    teacher = BertForTokenClassification(tiny_bert_config(num_layers=2, hidden=32, num_labels=3)).eval()
    data = dataset(tiny_tokenizer, n=10).remove_columns(["labels", "attention_mask"])
    collator = make(tiny_tokenizer)
    cache = build_teacher_cache(
        teacher, data, collator, cache_dir=tmp_path / "cache", tokenizer=tiny_tokenizer, batch_size=4,
        spec=TeacherCacheSpec(dtype="float32"),
    )  # fmt: skip
    assert cache.built
    rows = [attach_teacher_cache(data, cache)[i] for i in (9, 2, 5)]
    batch = TeacherCacheCollator(collator, cache.layouts)(rows)
    with torch.no_grad():
        live = teacher(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")})
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(batch[LOGITS_COLUMN][real], live.logits[real])


def test_collator_settings_and_padding_side_are_part_of_the_key(tiny_tokenizer):
    tok = tiny_tokenizer
    same_tokenizer = BertTokenizerFast(vocab=tok.get_vocab(), do_lower_case=True)
    reference = collator_fingerprint(tok, DataCollatorWithPadding(tok))
    # A new collator with an equal (not the same) tokenizer object: the tokenizer is keyed by what it does.
    assert collator_fingerprint(tok, DataCollatorWithPadding(same_tokenizer)) == reference
    assert collator_fingerprint(tok, DataCollatorWithPadding(tok), padding_side="right") == reference
    left = BertTokenizerFast(vocab=tok.get_vocab(), do_lower_case=True, padding_side="left")
    variants = {
        "no collator": collator_fingerprint(tok, None),
        "padding side": collator_fingerprint(tok, DataCollatorWithPadding(tok), padding_side="left"),
        "collator's tokenizer pads left": collator_fingerprint(tok, DataCollatorWithPadding(left)),
        "pad_to_multiple_of": collator_fingerprint(tok, DataCollatorWithPadding(tok, pad_to_multiple_of=8)),
        "padding": collator_fingerprint(tok, DataCollatorWithPadding(tok, padding="max_length", max_length=16)),
        "return_tensors": collator_fingerprint(tok, DataCollatorWithPadding(tok, return_tensors="np")),
        "class": collator_fingerprint(tok, DataCollatorForTokenClassification(tok)),
        "label_pad_token_id": collator_fingerprint(tok, DataCollatorForTokenClassification(tok, label_pad_token_id=0)),
        "mlm=False": collator_fingerprint(tok, DataCollatorForLanguageModeling(tok, mlm=False)),
        "mlm=True": collator_fingerprint(tok, DataCollatorForLanguageModeling(tok, mlm=True)),
        "mlm_probability": collator_fingerprint(tok, DataCollatorForLanguageModeling(tok, mlm_probability=0.3)),
        "seed": collator_fingerprint(tok, DataCollatorForLanguageModeling(tok, mlm=False, seed=3)),
        "function": collator_fingerprint(tok, default_data_collator),
        "class of the function": collator_fingerprint(tok, DefaultDataCollator()),
    }
    assert reference not in variants.values()
    assert len(set(variants.values())) == len(variants), variants


def test_a_changed_collator_rebuilds_the_cache(tmp_path, tiny_tokenizer):
    teacher, data = teacher_model(), dataset(tiny_tokenizer)
    first = build(tmp_path, teacher, data, tiny_tokenizer)
    again = build_teacher_cache(
        teacher, data, DataCollatorWithPadding(tiny_tokenizer, pad_to_multiple_of=8), cache_dir=tmp_path / "cache",
        spec=SPEC, tokenizer=tiny_tokenizer,
    )  # fmt: skip
    assert again.built and again.path != first.path
    assert build(tmp_path, teacher, data, tiny_tokenizer).path == first.path  # and the first is still found


def test_a_collator_padding_on_another_side_than_the_cache_assumes_is_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"padding_side='left'.*DataCollatorWithPadding pads on the right"):
        build(tmp_path, teacher_model(), dataset(tiny_tokenizer), tiny_tokenizer, padding_side="left")
    assert not os.listdir(tmp_path / "cache")
    # Built for right padding, then the collator's tokenizer is switched to the left: training refuses the batch.
    tokenizer = BertTokenizerFast(vocab=tiny_tokenizer.get_vocab(), do_lower_case=True)
    data = dataset(tokenizer)
    cache = build(tmp_path, teacher_model(), data, tokenizer)
    collator = TeacherCacheCollator(DataCollatorWithPadding(tokenizer), cache.layouts, cache.padding_side)
    rows = [attach_teacher_cache(data, cache)[i] for i in range(4)]
    assert collator(rows)[LOGITS_COLUMN].shape == (4, 2)
    tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match=r"padding_side='right'.*DataCollatorWithPadding pads on the left"):
        collator(rows)


# ------------------------------------------------------------------------------------------------ no attention mask
SHARP = 0.5


def roberta_token_classifier(num_layers: int, hidden: int, **config) -> RobertaForTokenClassification:
    """RoBERTa numbers positions from the pad mask of the ids, so left padding leaves its real-token outputs alone."""
    torch.manual_seed(num_layers)
    config = RobertaConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0, type_vocab_size=1, num_labels=3,
        **config,
    )  # fmt: skip
    return RobertaForTokenClassification(config).eval()


# (padding side, teacher, student, collator, columns the dataset keeps). Right padding: BERT (absolute positions from
# the first slot, unchanged by right padding). Left padding: RoBERTa token classification (see above); BERT's
# outputs under left padding depend on the batch's padding, cached or live, so they cannot be compared. The teachers'
# larger initial weights make attention sharp, as in trained models, so attending to padding shows.
NO_MASK_CASES = {
    "right": (
        lambda: teacher_model(initializer_range=SHARP),
        student_model,
        DataCollatorWithPadding,
        ["input_ids", "token_type_ids", "labels"],
    ),
    "left": (
        lambda: roberta_token_classifier(4, 32, initializer_range=SHARP),
        lambda: roberta_token_classifier(2, 16),
        DataCollatorForTokenClassification,
        ["input_ids", "labels"],
    ),
}


def no_mask_data(tokenizer, side: str, n: int = 24, seed: int = 0) -> Dataset:
    data = dataset(tokenizer, n, seed)
    if side == "left":  # token labels: one per token
        data = data.map(lambda r: {"labels": [t % 3 for t in r["input_ids"]]})
    return data.select_columns(NO_MASK_CASES[side][3])


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_teacher_equals_live_teacher_when_the_collator_creates_the_attention_mask(
    tmp_path, tiny_tokenizer, side
):
    tokenizer = BertTokenizerFast(vocab=tiny_tokenizer.get_vocab(), do_lower_case=True, padding_side=side)
    make_teacher, _, make_collator, _ = NO_MASK_CASES[side]
    teacher, data, collator = make_teacher(), no_mask_data(tokenizer, side), make_collator(tokenizer)
    spec = TeacherCacheSpec(hidden_layers=(1, 3), dtype="float32")
    cache = build_teacher_cache(
        teacher, data, collator, cache_dir=tmp_path, spec=spec, tokenizer=tokenizer, batch_size=5
    )
    # A batch unlike any build batch (other rows, other padded length), as the shuffled training loader makes.
    rows = [attach_teacher_cache(data, cache)[i] for i in (21, 3, 14, 8)]
    batch = TeacherCacheCollator(collator, cache.layouts, side)(rows)
    assert "attention_mask" in batch and "attention_mask" not in data.column_names
    cached = cached_teacher_features(batch, num_classes=teacher.config.num_labels, hidden_layers=[1, 3])
    with torch.no_grad():
        live = forward_with_features(
            teacher, {k: v for k, v in batch.items() if k != "labels" and not k.startswith("teacher_cache_")},
            hidden_layers=[1, 3],
        )  # fmt: skip
    real = batch["attention_mask"].bool()
    logits, live_logits = cached.outputs.logits, live.outputs.logits
    torch.testing.assert_close(
        logits[real] if logits.dim() == 3 else logits, live_logits[real] if logits.dim() == 3 else live_logits
    )
    for layer in (1, 3):
        torch.testing.assert_close(cached.hidden_states[layer][real], live.hidden_states[layer][real])
    assert cache.padding_side == side


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_training_matches_live_training_when_the_collator_creates_the_attention_mask(
    tmp_path, tiny_tokenizer, side
):
    tokenizer = BertTokenizerFast(vocab=tiny_tokenizer.get_vocab(), do_lower_case=True, padding_side=side)
    make_teacher, make_student, make_collator, _ = NO_MASK_CASES[side]

    def run(name, **cache):
        args = DistillationConfig(
            output_dir=str(tmp_path / name), per_device_train_batch_size=8, per_device_eval_batch_size=5,
            max_steps=3, learning_rate=1e-2, save_strategy="no", logging_steps=1, report_to="none", use_cpu=True,
            seed=0, task_weight=0.5, logits_weight=0.5, hidden_weight=1.0, **cache,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=make_student(), teacher_model=make_teacher(), args=args, train_dataset=no_mask_data(tokenizer, side),
            processing_class=tokenizer, data_collator=make_collator(tokenizer),
        )  # fmt: skip
        trainer.train()
        return logged_terms(trainer)

    expected, got = run("live"), run("cached", use_teacher_cache=True, teacher_cache_dtype="float32")
    assert len(expected) == len(got) == 3
    for step, (e, g) in enumerate(zip(expected, got)):
        assert set(e) == set(g) == {"loss_task", "loss_logits", "loss_hidden"}
        for term in e:
            assert math.isclose(e[term], g[term], rel_tol=1e-5, abs_tol=1e-7), (step, term, e[term], g[term])


def segments_from_labels(tokenizer):
    """A collator that marks each row's class in its segment ids: the teacher's inputs are made from the labels."""
    pad = DataCollatorWithPadding(tokenizer)

    def collate(rows):
        batch = pad(rows)
        batch["token_type_ids"] = batch["labels"][:, None] * batch["attention_mask"]
        return batch

    return collate


def test_labels_are_part_of_the_key_only_when_the_collator_makes_teacher_inputs_of_them(tmp_path, tiny_tokenizer):
    teacher, data = teacher_model(), dataset(tiny_tokenizer)
    relabelled = data.map(lambda r: {"labels": 1 - r["labels"]})
    first = build(tmp_path, teacher, data, tiny_tokenizer)
    assert "labels" not in first.input_columns
    assert build(tmp_path, teacher, relabelled, tiny_tokenizer).path == first.path  # labels never reach the teacher

    def build_with(data):
        collator = segments_from_labels(tiny_tokenizer)
        return build_teacher_cache(teacher, data, collator, cache_dir=tmp_path / "cache", tokenizer=tiny_tokenizer)

    own, other = build_with(data), build_with(relabelled)
    assert own.built and other.built and own.path != other.path and "labels" in own.input_columns


def test_an_encoder_decoder_teacher_is_refused(tmp_path, tiny_tokenizer):
    config = BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )  # fmt: skip
    data = dataset(tiny_tokenizer).remove_columns("labels").map(lambda r: {"labels": r["input_ids"][:4]})
    teacher = BartForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="BartForConditionalGeneration is an encoder-decoder model"):
        build_teacher_cache(
            teacher, data, DataCollatorForSeq2Seq(tiny_tokenizer, model=teacher), cache_dir=tmp_path / "cache"
        )
    assert not (tmp_path / "cache").exists()


def test_untokenized_data_and_columns_the_dataset_lacks_are_refused(tmp_path, tiny_tokenizer):
    raw = Dataset.from_dict({"sentence": ["a good film", "not good"], "labels": [1, 0]})
    with pytest.raises(ValueError, match="no input_ids column.*Tokenize first"):
        build_teacher_cache(teacher_model(), raw, DataCollatorWithPadding(tiny_tokenizer), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"columns must be dataset columns.*missing: \['position_id'\]"):
        build(tmp_path, teacher_model(), dataset(tiny_tokenizer), tiny_tokenizer, columns=["input_ids", "position_id"])
    assert not os.listdir(tmp_path)


def test_data_digest_of_a_text_column_is_a_function_of_the_texts():
    # np.asarray(...).tobytes() of a string column hashed the addresses of Python objects: a new digest on every call.
    from hf_distill.cache import data_digest

    ds = Dataset.from_dict({"input_ids": [[1, 2], [3]], "sentence": ["a good film", "bad"]})
    assert data_digest(ds, ["sentence"]) == data_digest(ds, ["sentence"])
    same = Dataset.from_dict({"input_ids": [[1, 2], [3]], "sentence": ["a good film", "bad"]})
    assert data_digest(same, ["sentence", "input_ids"]) == data_digest(ds, ["sentence", "input_ids"])
    other = Dataset.from_dict({"input_ids": [[1, 2], [3]], "sentence": ["a good film", "bad!"]})
    assert data_digest(other, ["sentence"]) != data_digest(ds, ["sentence"])
    # Moving a character across the row boundary changes the digest (lengths are hashed with the bytes).
    shifted = Dataset.from_dict({"input_ids": [[1, 2], [3]], "sentence": ["a good fil", "mbad"]})
    assert data_digest(shifted, ["sentence"]) != data_digest(ds, ["sentence"])
