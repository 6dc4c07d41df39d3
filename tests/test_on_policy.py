"""On-policy distillation (GKD, `lmbda` / `seq_kd`, hf_distill.on_policy) on tiny causal LMs built in-process.

The batches a window trains on are built from each row's prompt and a generated completion (prompt, padding and
everything after the EOS unlabelled); the window is counted over those batches, so its logit term equals a slow
per-token divergence over the generated completion tokens of the whole window, and so do the gradients. The lmbda
schedule is a pure function of (seed, step, micro-batch), a resumed run makes the same choices and samples the same
completions, seq_kd samples with the teacher, and lmbda = 0 is bit for bit the trainer without the mechanism.
"""

import copy

import pytest
import torch
from test_lm_losses import rel_diff
from test_trainer import lm_dataset
from test_trainer_lm import causal_lm
from transformers import DataCollatorForTokenClassification, Trainer, TrainerCallback

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.on_policy import (
    STUDENT,
    TEACHER,
    _sampling_seed,
    completion_batch,
    completion_source,
    generate_completions,
    generation_config_of,
    split_prompts,
)
from hf_distill.trainer import KD_POSITIONS

BETA, T = 0.3, 2.0


@pytest.fixture
def collator(tiny_tokenizer):
    return DataCollatorForTokenClassification(tiny_tokenizer)  # right-pads with id 0, label -100, mask 0


def on_policy_trainer(tmp_path, collator, dataset=None, student=None, teacher=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, seed=0, per_device_train_batch_size=4,
        max_steps=1, save_strategy="no", logging_steps=1, learning_rate=1e-1, optim="sgd", max_grad_norm=0.0,
        task_weight=0.0, logits_weight=1.0, logits_loss="generalized_jsd", jsd_beta=BETA, temperature=T,
        lmbda=1.0, max_new_tokens=6,
    )  # fmt: skip
    kwargs.update(overrides)
    return DistillationTrainer(
        model=student if student is not None else causal_lm("llama", hidden=16, seed=1),
        teacher_model=teacher if teacher is not None else causal_lm("llama", seed=0),
        args=DistillationConfig(**kwargs),
        train_dataset=dataset if dataset is not None else lm_dataset(8),
        data_collator=collator,
    )


def record_generated(trainer):
    """Record (global step, micro-batch, dataset batch, generated batch) of every replacement, and each window's
    batches and counts as the Trainer receives them."""
    generated, windows = [], []
    make, fetch = trainer._generated_batch, trainer.get_batch_samples

    def generated_batch(batch, source, micro):
        out = make(batch, source, micro)
        generated.append((trainer.state.global_step, micro, source, {k: v.clone() for k, v in batch.items()}, out))
        return out

    def get_batch_samples(*args, **kwargs):
        batches, counts = fetch(*args, **kwargs)
        windows.append(([{k: v.clone() for k, v in b.items()} for b in batches], counts.clone()))
        return batches, counts

    trainer._generated_batch, trainer.get_batch_samples = generated_batch, get_batch_samples
    return generated, windows


class GradientRecorder(TrainerCallback):
    """The student's gradients of the window, just before the optimizer step."""

    def __init__(self, model, grads):
        self.model, self.grads = model, grads

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.update({n: p.grad.detach().clone() for n, p in self.model.named_parameters()})


def seed_where(wanted, lmbda=0.5, seq_kd=False):
    """The first seed whose schedule gives `wanted[(step, micro)]` for each key."""
    for seed in range(1000):
        if all(completion_source(seed, s, m, lmbda, seq_kd) == want for (s, m), want in wanted.items()):
            return seed
    raise AssertionError("no seed found")


# --------------------------------------------------------------------------------------------------------------------
# Building the batches
# --------------------------------------------------------------------------------------------------------------------


def test_split_prompts_left_pads_the_real_tokens_before_the_first_label():
    ids = torch.tensor(
        [[11, 12, 13, 14, 15, 0], [21, 22, 23, 24, 0, 0], [0, 31, 32, 33, 34, 35], [41, 42, 43, 0, 0, 0]]
    )
    mask = (ids != 0).long()
    labels = torch.tensor(
        [
            [-100, -100, 13, 14, 15, -100],  # prompt of 2, right padding
            [-100, -100, -100, 24, -100, -100],  # prompt of 3
            [-100, -100, -100, 32, 33, 34],  # left padding, then a prompt of 2
            [-100, -100, -100, -100, -100, -100],  # nothing labelled: all prompt
        ]
    )
    prompt_ids, prompt_mask = split_prompts(ids, mask, labels)
    assert prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert torch.where(prompt_mask.bool(), prompt_ids, -1).tolist() == [
        [-1, 11, 12],
        [21, 22, 23],
        [-1, 31, 32],
        [41, 42, 43],
    ]
    assert prompt_mask.dtype == torch.long


@pytest.mark.parametrize("attention_mask", [True, False])
def test_split_prompts_refuses_a_row_without_a_prompt(attention_mask):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    labels = torch.tensor([[-100, 6, 7], [8, 9, 10]])  # row 1: plain LM text, labels == input_ids
    with pytest.raises(ValueError, match=r"row 1 of a batch has none: its first real token is labelled\. Mark"):
        split_prompts(ids, torch.ones_like(ids) if attention_mask else None, labels)


EOS = 2
# (generated tokens of one row after its prompt, eos ids) -> completion tokens kept (labelled)
COMPLETIONS = [
    ([7, 8, 9, 10], EOS, [7, 8, 9, 10]),  # no EOS: all max_new_tokens
    ([7, EOS, 0, 0], EOS, [7, EOS]),  # EOS kept and labelled, generate's filler after it dropped
    ([EOS, 9, EOS, 4], EOS, [EOS]),  # EOS first: a completion of one token
    ([7, 3, 9, EOS], [EOS, 3], [7, 3]),  # several stop ids (Llama 3's eot + eos)
    ([7, EOS, 9, 10], None, [7, EOS, 9, 10]),  # no EOS id: nothing ends early
]


@pytest.mark.parametrize("completion, eos, kept", COMPLETIONS)
def test_completion_batch_labels_the_completion_up_to_its_eos_and_right_pads(completion, eos, kept):
    # Two rows: a 2-token prompt (left-padded to 3) with `completion`, and a 3-token prompt with 4 plain tokens.
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sequences = torch.tensor([[0, 51, 52, *completion], [61, 62, 63, 4, 5, 6, 7]])
    batch = completion_batch(prompt_mask, sequences, eos, pad_token_id=0)
    rows = [[51, 52, *kept], [61, 62, 63, 4, 5, 6, 7]]
    length = max(map(len, rows))
    assert batch["input_ids"].tolist() == [r + [0] * (length - len(r)) for r in rows]
    assert batch["attention_mask"].tolist() == [[1] * len(r) + [0] * (length - len(r)) for r in rows]
    assert batch["labels"].tolist() == [
        [-100, -100, *kept] + [-100] * (length - len(rows[0])),
        [-100, -100, -100, 4, 5, 6, 7] + [-100] * (length - len(rows[1])),
    ]


def test_generate_completions_restores_mode_rng_and_ignores_the_checkpoint_settings():
    student = causal_lm("llama", hidden=16, seed=1).train()
    prompt_ids, prompt_mask = torch.tensor([[0, 11, 12], [21, 22, 23]]), torch.tensor([[0, 1, 1], [1, 1, 1]])

    class Args:
        max_new_tokens, generation_temperature, generation_top_k, generation_top_p = 5, 1.0, 0, 1.0
        gradient_checkpointing = False

    config = generation_config_of(Args, EOS, 0)
    state = torch.random.get_rng_state()
    first = generate_completions(student, prompt_ids, prompt_mask, config, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream (dropout, data order) is untouched
    assert student.training
    assert first.shape == (2, 3 + 5) and torch.equal(first[:, :3], prompt_ids)
    # A checkpoint's own settings (here a greedy-making top_k=1 and a repetition penalty) must not change the samples.
    student.generation_config.top_k, student.generation_config.repetition_penalty = 1, 5.0
    saved = student.generation_config
    assert torch.equal(generate_completions(student, prompt_ids, prompt_mask, config, seed=7), first)
    assert student.generation_config is saved
    assert not torch.equal(generate_completions(student, prompt_ids, prompt_mask, config, seed=8), first)


# --------------------------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------------------------


def test_the_schedule_is_a_function_of_seed_step_and_micro_batch():
    keys = [(step, micro) for step in range(500) for micro in range(4)]
    draws = [completion_source(0, s, m, 0.3, False) for s, m in keys]
    assert draws == [completion_source(0, s, m, 0.3, False) for s, m in keys]  # the same on every call / process
    assert abs(draws.count(STUDENT) / len(keys) - 0.3) < 0.03
    assert set(draws) == {STUDENT, None}
    assert draws != [completion_source(1, s, m, 0.3, False) for s, m in keys]  # the seed changes the choices
    assert all(completion_source(0, s, m, 0.0, False) is None for s, m in keys)  # lmbda = 0: off
    assert all(completion_source(0, s, m, 1.0, False) == STUDENT for s, m in keys)  # lmbda = 1: every batch
    # TRL's order: the student's draw first, then seq_kd (the teacher) for the other batches.
    with_seq_kd = [completion_source(0, s, m, 0.3, True) for s, m in keys]
    assert with_seq_kd == [TEACHER if d is None else d for d in draws]
    assert all(completion_source(0, s, m, 1.0, True) == STUDENT for s, m in keys)
    assert all(completion_source(0, s, m, 0.0, True) == TEACHER for s, m in keys)


# --------------------------------------------------------------------------------------------------------------------
# The loss: exact over the generated window
# --------------------------------------------------------------------------------------------------------------------


def slow_gjsd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Generalized JSD at one position in float64, from the definition (TRL's beta: the teacher's weight), times T²."""
    p_s, p_t = torch.softmax(s.double() / T, -1), torch.softmax(t.double() / T, -1)
    m = BETA * p_t + (1 - BETA) * p_s
    return T**2 * (BETA * (p_t * (p_t / m).log()).sum() + (1 - BETA) * (p_s * (p_s / m).log()).sum())


def slow_window_loss(student, teacher, batches):
    """Sum of the divergence over every completion token of the window (the logits at j - 1 predict token j), over
    the number of those tokens."""
    total, count = 0.0, 0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = student(**inputs).logits
        with torch.no_grad():
            t = teacher(**inputs).logits
        for row, j in (batch["labels"] != -100).nonzero().tolist():
            assert j >= 1
            total = total + slow_gjsd(s[row, j - 1], t[row, j - 1])
            count += 1
    return total / count, count


@pytest.mark.parametrize("mode", ["plain", "fused"])
def test_an_on_policy_window_is_the_slow_divergence_over_its_completion_tokens(tmp_path, collator, mode):
    """Two micro-batches of 4 in one window: the first drawn on-policy, the second the dataset's. The logged term and
    the update equal the slow divergence summed over both batches' scored tokens (generated completions; the
    dataset's labels) over their total: the window was counted after the replacement."""
    seed = seed_where({(0, 0): STUDENT, (0, 1): None})
    teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
    with torch.no_grad():  # a peaked teacher: a divergence far from 0, whose fp32 value is accurate to 1e-5
        teacher.lm_head.weight.mul_(30.0)
    before = copy.deepcopy(student)
    fused = {"fused_lm_head": True, "logits_chunk_size": 5} if mode == "fused" else {}
    trainer = on_policy_trainer(
        tmp_path, collator, student=student, teacher=teacher, seed=seed, lmbda=0.5, gradient_accumulation_steps=2,
        **fused,
    )  # fmt: skip
    generated, windows = record_generated(trainer)
    grads = {}
    trainer.add_callback(GradientRecorder(student, grads))
    trainer.train()

    (batches, counts), = windows  # fmt: skip
    (step, micro, source, dataset_batch, batch), = generated  # fmt: skip
    assert (step, micro, source) == (0, 0, STUDENT) and student.training
    assert batches[0]["input_ids"].equal(batch["input_ids"])
    # The prompt (the dataset's first 3 tokens) is kept, the dataset's completion replaced by up to 6 sampled tokens.
    assert batch["input_ids"][:, :3].equal(dataset_batch["input_ids"][:, :3])
    assert (batch["labels"][:, :3] == -100).all() and (batch["labels"][:, 3:] != -100).any()
    assert (batch["attention_mask"].sum(1) <= 3 + 6).all()
    assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()

    expected, count = slow_window_loss(before, teacher, batches)
    assert int(counts[KD_POSITIONS]) == count  # the window's count is that of the batches trained on
    logged = next(h for h in trainer.state.log_history if "loss_logits" in h)["loss_logits"]
    assert rel_diff(torch.tensor(logged), expected.float()) <= 1e-5
    expected.backward()
    assert grads.keys() == {n for n, _ in before.named_parameters()}
    for name, p in before.named_parameters():
        assert rel_diff(grads[name], p.grad) <= 1e-5, name


def test_seq_kd_trains_on_the_teachers_completions(tmp_path, collator):
    """seq_kd with lmbda = 0: every batch's completion is sampled by the teacher (the student never generates), and
    the task term (kept: sequence-level KD) is the student's cross-entropy on those completions."""
    teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
    before = copy.deepcopy(student)
    calls = {"student": 0, "teacher": 0}
    for role, model in (("student", student), ("teacher", teacher)):

        def counted(*args, _role=role, _generate=model.generate, **kwargs):
            calls[_role] += 1
            return _generate(*args, **kwargs)

        model.generate = counted
    trainer = on_policy_trainer(tmp_path, collator, student=student, teacher=teacher, lmbda=0.0, seq_kd=True,
                                task_weight=0.5)  # fmt: skip
    generated, _ = record_generated(trainer)
    trainer.train()
    assert calls == {"student": 0, "teacher": 1}
    (_, micro, source, dataset_batch, batch), = generated  # fmt: skip
    assert source == TEACHER
    prompt_ids, prompt_mask = split_prompts(dataset_batch["input_ids"], dataset_batch["attention_mask"],
                                            dataset_batch["labels"])  # fmt: skip
    config = generation_config_of(trainer.args, EOS, 0)
    again = generate_completions(teacher, prompt_ids, prompt_mask, config, _sampling_seed(0, 0, micro, 0))
    want = completion_batch(prompt_mask, again, EOS, 0)
    assert all(batch[k].equal(want[k]) for k in want)
    logged = next(h for h in trainer.state.log_history if "loss_task" in h)["loss_task"]
    with torch.no_grad():
        assert rel_diff(torch.tensor(logged), before(**batch).loss) <= 1e-5  # transformers' shifted LM loss


# --------------------------------------------------------------------------------------------------------------------
# Off means off; resume makes the same choices
# --------------------------------------------------------------------------------------------------------------------


class WithoutOnPolicy(DistillationTrainer):
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return Trainer.get_batch_samples(self, epoch_iterator, num_batches, device)


def test_lmbda_zero_is_bit_identical_to_the_trainer_without_on_policy(tmp_path, collator):
    runs = {}
    for name, cls in (("default", DistillationTrainer), ("without", WithoutOnPolicy)):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        config = DistillationConfig(
            output_dir=str(tmp_path / name), report_to="none", use_cpu=True, seed=0, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, max_steps=2, save_strategy="no", logging_steps=1, learning_rate=1e-1,
            optim="sgd", logits_loss="generalized_jsd",
        )  # fmt: skip
        assert config.lmbda == 0 and not config.seq_kd
        trainer = cls(model=student, teacher_model=teacher, args=config, train_dataset=lm_dataset(16),
                      data_collator=collator)  # fmt: skip
        trainer.train()
        logs = [
            {k: v for k, v in h.items() if k.startswith("loss") or k == "grad_norm"} for h in trainer.state.log_history
        ]
        runs[name] = (logs, [p.detach().clone() for p in student.parameters()])
    assert runs["default"][0] == runs["without"][0] and runs["default"][0][0]["loss_logits"] > 0
    assert all(torch.equal(a, b) for a, b in zip(runs["default"][1], runs["without"][1]))


def test_a_resumed_run_makes_the_same_choices_and_samples(tmp_path, collator):
    seed = seed_where({(2, 0): STUDENT, (3, 0): None})
    runs = {}
    for name in ("uninterrupted", "resumed"):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        trainer = on_policy_trainer(
            tmp_path, collator, lm_dataset(16), student, teacher, seed=seed, lmbda=0.5, max_steps=4,
            save_strategy="steps", save_steps=2,
        )  # fmt: skip
        generated, _ = record_generated(trainer)
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2") if name == "resumed" else None)
        losses = {h["step"]: h["loss_logits"] for h in trainer.state.log_history if "loss_logits" in h}
        runs[name] = (generated, losses, [p.detach().clone() for p in student.parameters()])
    whole, resumed = runs["uninterrupted"], runs["resumed"]
    later = [g for g in whole[0] if g[0] >= 2]
    assert [g[:3] for g in later] == [g[:3] for g in resumed[0]] and (2, 0, STUDENT) in [g[:3] for g in later]
    assert all(a[4][k].equal(b[4][k]) for a, b in zip(later, resumed[0]) for k in a[4])
    assert {3, 4} <= set(resumed[1])  # (steps 1 and 2 come from the checkpoint's trainer state)
    assert all(resumed[1][s] == pytest.approx(whole[1][s], rel=1e-6) for s in (3, 4))
    assert all(rel_diff(a, b) <= 1e-6 for a, b in zip(whole[2], resumed[2]))


# --------------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------------

ON = dict(lmbda=0.5, task_weight=0.0)
CONFIG_ERRORS = [
    (dict(lmbda=1.5), r"lmbda must be in \[0, 1\], got 1.5\. .*0 is off, 1 every batch"),
    (dict(lmbda=-0.1), r"lmbda must be in \[0, 1\], got -0.1"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an int >= 1, got 0\. Use e.g. 128"),
    (dict(generation_temperature=0.0), r"generation_temperature must be > 0, got 0.0\. Use 1.0 .*not the loss's"),
    (dict(generation_top_k=-1), r"generation_top_k must be an int >= 0, got -1\. Use 0"),
    (dict(generation_top_p=0.0), r"generation_top_p must be in \(0, 1\], got 0.0\. Use 1.0"),
    (dict(generation_top_p=1.5), r"generation_top_p must be in \(0, 1\], got 1.5"),
    (dict(use_teacher_cache=True, **ON), r"lmbda=0.5 trains on completions .* Set use_teacher_cache=False"),
    (dict(use_teacher_cache=True, seq_kd=True), r"seq_kd=True trains on completions .* Set use_teacher_cache=False"),
    (dict(distill_on="all_tokens", **ON), r"distill_on='all_tokens' would score the prompt too\. Set distill_on"),
    (dict(lmbda=0.5, task_weight=0.5), r"lmbda=0.5 with task_weight=0.5: .* Set task_weight=0"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_ERRORS)
def test_config_refuses_bad_values_naming_field_value_and_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)


def test_seq_kd_alone_keeps_the_task_term(tmp_path):
    config = DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, seq_kd=True)
    assert config.task_weight == 0.5 and config.lmbda == 0


def test_trainer_refuses_non_causal_lms_and_data_without_prompts(tmp_path, collator, tiny_teacher, tiny_student):
    with pytest.raises(
        ValueError, match=r"lmbda=1.0 generates completions with the student's `generate`, which needs"
    ):
        DistillationTrainer(
            model=tiny_student, teacher_model=tiny_teacher, data_collator=collator,
            args=DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, lmbda=1.0,
                                    task_weight=0.0),
        )  # fmt: skip
    plain_text = lm_dataset(8, prompt=0)  # labels == input_ids: nothing to continue
    with pytest.raises(ValueError, match=r"row 0 of a batch has none: its first real token is labelled"):
        on_policy_trainer(tmp_path, collator, plain_text)


def test_batches_it_cannot_rebuild_are_refused(tmp_path, collator):
    trainer = on_policy_trainer(tmp_path, collator)
    batch = collator([lm_dataset(2)[i] for i in range(2)])
    with pytest.raises(ValueError, match=r"\['token_type_ids'\] would no longer line up with the new tokens"):
        trainer._generated_batch({**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}, STUDENT, 0)
    with pytest.raises(ValueError, match=r"no labels\. Collate only those three"):
        trainer._generated_batch({k: v for k, v in batch.items() if k != "labels"}, STUDENT, 0)
