"""Noisy teacher (Sau & Balasubramanian 2016, https://arxiv.org/abs/1610.09650; hf_distill.noisy_teacher): the pure
function against a reference, the rows it perturbs, its determinism across resumes, and the trainer's use of it
(training only, the KD term as usual on the noised logits)."""

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses import kl_div_loss
from hf_distill.noisy_teacher import TeacherNoise, noise_generator, noisy_rows, noisy_teacher_logits


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# --------------------------------------------------------------------------------------------------------------------
# The pure function
# --------------------------------------------------------------------------------------------------------------------


def test_std_zero_is_bit_identical_and_returns_the_input():
    z = logits(8, 5)
    assert noisy_teacher_logits(z, std=0.0, fraction=0.5) is z
    s = logits(8, 5, seed=1)
    assert torch.equal(
        kl_div_loss(s, noisy_teacher_logits(z, std=0.0), temperature=2.0), kl_div_loss(s, z, temperature=2.0)
    )


@pytest.mark.parametrize("batch, fraction", [(8, 0.5), (8, 1.0), (10, 0.3), (4, 0.25), (16, 0.125)])
@pytest.mark.parametrize("shape", [(3,), (4, 6)])
def test_exactly_the_chosen_fraction_of_rows_is_noised_and_the_others_are_untouched(batch, fraction, shape):
    z = logits(batch, *shape)
    noised = noisy_teacher_logits(z, std=0.7, fraction=fraction, generator=noise_generator(0, 5, 0, 0, "cpu"))
    changed = (noised != z).flatten(1)
    assert changed.any(1).sum().item() == round(fraction * batch)
    assert torch.all(changed.all(1) == changed.any(1))  # a chosen row is noised at every position and class


def test_the_expected_fraction_holds_when_it_is_not_a_whole_number_of_rows():
    counts = [noisy_rows(4, 0.1, noise_generator(0, step, 0, 0, "cpu"), "cpu").sum().item() for step in range(2000)]
    assert set(counts) == {0, 1}
    assert sum(counts) / len(counts) == pytest.approx(0.4, abs=0.04)  # 0.1 x 4 rows on average


def reference_noise(z, std, fraction, mode, seed_args):
    """The same draws, applied row by row with plain loops."""
    generator = noise_generator(*seed_args, "cpu")
    chosen = noisy_rows(z.shape[0], fraction, generator, "cpu").tolist()
    eps = torch.randn(z.shape, generator=generator).tolist()
    out = z.tolist()
    for b, row in enumerate(out):
        if not chosen[b]:
            continue
        for c, value in enumerate(row):
            out[b][c] = value + std * eps[b][c] if mode == "additive" else value * (1 + std * eps[b][c])
    return torch.tensor(out)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_noise_and_the_kd_term_on_it_match_a_reference(mode):
    z, s = logits(8, 5), logits(8, 5, seed=1)
    noised = noisy_teacher_logits(z, std=0.5, fraction=0.5, generator=noise_generator(3, 7, 1, 0, "cpu"), mode=mode)
    expected = reference_noise(z, 0.5, 0.5, mode, (3, 7, 1, 0))
    torch.testing.assert_close(noised, expected)
    # The KD term is then the usual one, on the noised logits: softmax at T, T² scaling.
    p_t = torch.softmax(expected / 2.0, -1)
    ref_kl = 4.0 * (p_t * (p_t.log() - torch.log_softmax(s / 2.0, -1))).sum(-1).mean()
    torch.testing.assert_close(kl_div_loss(s, noised, temperature=2.0), ref_kl)


def test_top_k_minus_infinity_entries_stay_minus_infinity():
    z = logits(4, 6)
    z[:, 3:] = float("-inf")
    for mode in ("additive", "multiplicative"):
        noised = noisy_teacher_logits(z, std=1.0, generator=noise_generator(0, 0, 0, 0, "cpu"), mode=mode)
        assert torch.equal(noised[:, 3:], z[:, 3:]) and torch.isfinite(noised[:, :3]).all()


def test_draws_depend_on_seed_step_micro_batch_and_process_only():
    def draw(*seed_args):
        return noisy_teacher_logits(torch.zeros(4, 3), std=1.0, generator=noise_generator(*seed_args, "cpu"))

    assert torch.equal(draw(0, 3, 1, 0), draw(0, 3, 1, 0))
    for other in ((1, 3, 1, 0), (0, 4, 1, 0), (0, 3, 0, 0), (0, 3, 1, 1)):
        assert not torch.equal(draw(0, 3, 1, 0), draw(*other)), other
    torch.manual_seed(123)
    state = torch.get_rng_state()
    draw(0, 3, 1, 0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (dropout, data order) is untouched


def config(**kw):
    return DistillationConfig(**{"output_dir": "unused", "report_to": "none", "use_cpu": True, **kw})


def test_a_resumed_run_draws_the_noise_of_the_uninterrupted_run():
    args = config(teacher_noise_std=1.0, teacher_noise_fraction=0.5, seed=7, gradient_accumulation_steps=2)
    z = logits(8, 4)
    uninterrupted = TeacherNoise(args)
    draws = {(step, micro): uninterrupted(z, step, training=True) for step in range(4) for micro in range(2)}
    resumed = TeacherNoise(args)  # a fresh trainer resuming at step 2
    for step in (2, 3):
        for micro in range(2):
            assert torch.equal(resumed(z, step, training=True), draws[(step, micro)])
    assert not torch.equal(draws[(2, 0)], draws[(2, 1)])  # micro-batches of one step get their own noise
    assert TeacherNoise(args)(z, 0, training=False) is z  # never in evaluation


# --------------------------------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------------------------------


def bert(seed: int, **kw):
    torch.manual_seed(seed)
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return BertForSequenceClassification(config)


def test_trainer_noises_the_teacher_in_training_only(tmp_path, tiny_tokenizer):
    texts = [" ".join(WORDS[i : i + 4]) for i in range(8)]
    data = Dataset.from_dict({**tiny_tokenizer(texts), "labels": [i % 2 for i in range(8)]})
    args = config(
        output_dir=str(tmp_path),
        task_weight=0.0,
        logits_weight=1.0,
        teacher_noise_std=2.0,
        teacher_noise_fraction=0.5,
        seed=5,
        temperature=2.0,
    )
    trainer = DistillationTrainer(
        model=bert(1, num_layers=2, hidden=16),
        teacher_model=bert(0, num_layers=4, hidden=32),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer,
        data_collator=DataCollatorWithPadding(tiny_tokenizer),
    )
    inputs = DataCollatorWithPadding(tiny_tokenizer)([data[i] for i in range(8)])
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        s, t = trainer.model(**model_inputs).logits, trainer.teacher(**model_inputs).logits
        trainer.model.train()
        trained = trainer.compute_loss(trainer.model, inputs)
        trainer.model.eval()
        evaluated = trainer.compute_loss(trainer.model, inputs)
    noised = noisy_teacher_logits(t, std=2.0, fraction=0.5, generator=noise_generator(5, 0, 0, 0, "cpu"))
    assert not torch.equal(noised, t)
    torch.testing.assert_close(trained, kl_div_loss(s, noised, temperature=2.0))
    torch.testing.assert_close(evaluated, kl_div_loss(s, t, temperature=2.0))


REFUSALS = [
    ("negative std", dict(teacher_noise_std=-0.1), r"teacher_noise_std must be >= 0, got -0\.1"),
    ("fraction 0", dict(teacher_noise_fraction=0.0), r"teacher_noise_fraction must be in \(0, 1\], got 0\.0"),
    ("fraction > 1", dict(teacher_noise_fraction=1.5), r"teacher_noise_fraction must be in \(0, 1\], got 1\.5"),
    ("unknown mode", dict(teacher_noise_mode="gaussian"), r"teacher_noise_mode must be one of \('additive'"),
    (
        "no logit term",
        dict(teacher_noise_std=1.0, logits_weight=0.0),
        r"teacher_noise_std=1\.0 perturbs .* but logits_weight=0 \(there is no logit term\)",
    ),
    (
        "top-k + tail cache",
        dict(teacher_noise_std=1.0, teacher_cache_top_k=4, teacher_cache_top_k_tail=True),
        r"but teacher_cache_top_k_tail=True \(the teacher is log-probabilities\)",
    ),
    (
        "fused LM head",
        dict(teacher_noise_std=1.0, fused_lm_head=True),
        r"but fused_lm_head=True \(no logits are made\)",
    ),
]


@pytest.mark.parametrize("case, fields, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(case, fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)
