"""DistillationTrainer on tiny causal LMs (Llama, GPT-2, built in-process): the LM divergences, the chunked logit term
(`logits_chunk_size`) and the fused LM-head path (`fused_lm_head`).

Every divergence's logit term is the pure loss applied by hand to the shifted logits at the labelled positions, in
each of the three ways; chunked and fused equal plain in the logged terms and in the student's gradients (within
1e-5 relative: max |a - b| / max |b| per tensor); gradient accumulation equals the full batch with the fused path;
prompt and padding positions never count; and the fused path creates no (tokens x vocabulary) tensor in training.
"""

import math

import pytest
import torch
from conftest import tiny_bert_config
from test_lm_losses import rel_diff
from test_trainer import lm_dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    BertForSequenceClassification,
    DataCollatorForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses import KD_LOGIT_LOSSES
from hf_distill.tasks import unwrap_peft

TERM_KEYS = ("loss_task", "loss_logits", "loss_hidden", "loss_embeddings", "loss_attention")
# Non-default parameters for every case: each must reach only the loss that takes it.
PARAMETERS = dict(jsd_beta=0.3, skew_alpha=0.2)
# (logits_loss, the keyword its pure function gets)
DIVERGENCES = [
    ("kl", {}),
    ("reverse_kl", {}),
    ("jsd", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("total_variation", {}),
    ("skew_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 0.2}),
]
MODES = {"plain": {}, "chunked": {"logits_chunk_size": 7}, "fused": {"fused_lm_head": True, "logits_chunk_size": 7}}


def causal_lm(arch: str, hidden: int = 32, layers: int = 2, seed: int = 0, vocab: int = 64):
    """A tiny causal LM without dropout (train-mode forwards are repeatable); 4 heads, so attention maps match."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def collator(tiny_tokenizer):
    return DataCollatorForTokenClassification(tiny_tokenizer)  # pads with id 0, label -100, mask 0


def lm_trainer(tmp_path, teacher, student, collator, dataset=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, seed=0, per_device_train_batch_size=8,
        max_steps=1, save_strategy="no", logging_steps=1, learning_rate=1e-1, optim="sgd", max_grad_norm=0.0,
        task_weight=0.5, logits_weight=0.5, temperature=2.0, **PARAMETERS,
    )  # fmt: skip
    kwargs.update(overrides)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(**kwargs),
        train_dataset=dataset if dataset is not None else lm_dataset(16),
        data_collator=collator,
    )


def batch_of(collator, n: int = 8):
    dataset = lm_dataset(n)
    return collator([dataset[i] for i in range(n)])


def scored_positions(batch) -> torch.Tensor:
    """The logits at i predict token i + 1: position i counts where labels[i + 1] != -100."""
    labels = batch["labels"]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    return positions


def terms_and_grads(trainer, batch):
    """One training step's logged terms and the student's (and projections') gradients."""
    trainer.model.train()
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, batch, counts)
    trainer.log({})
    terms = {k: v for k, v in trainer.state.log_history[-1].items() if k in TERM_KEYS}
    named = [*trainer.model.named_parameters(), *trainer.projections.named_parameters(prefix="projections")]
    return terms, {n: p.grad.detach().clone() for n, p in named if p.requires_grad}


def assert_same(actual, expected, tolerance=1e-5):
    (terms, grads), (want_terms, want_grads) = actual, expected
    assert terms.keys() == want_terms.keys()
    for key in terms:
        assert rel_diff(torch.tensor(terms[key]), torch.tensor(want_terms[key])) <= tolerance, key
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert rel_diff(grads[name], want_grads[name]) <= tolerance, name


# --------------------------------------------------------------------------------------------------------------------
# Each divergence, each way: the pure loss on the shifted labelled positions, and the plain path's gradients
# --------------------------------------------------------------------------------------------------------------------

CASES = [(name, kw, mode) for name, kw in DIVERGENCES for mode in MODES] + [
    ("mse", {}, "plain"),
    ("mse", {}, "chunked"),
]


@pytest.mark.parametrize("logits_loss, keywords, mode", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_logit_term_is_the_pure_loss_on_the_shifted_labelled_positions(
    tmp_path, collator, logits_loss, keywords, mode
):
    batch = batch_of(collator)
    teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**inputs).logits, teacher(**inputs).logits
        expected_task = student(**batch).loss  # transformers' own shifted causal-LM loss
    positions = scored_positions(batch)
    assert 0 < positions.sum() < batch["attention_mask"].sum()  # prompts, padding and last positions are left out
    expected = KD_LOGIT_LOSSES[logits_loss](s[positions], t[positions], temperature=2.0, **keywords)

    def run(mode):
        trainer = lm_trainer(
            tmp_path / mode, teacher, student, collator, logits_loss=logits_loss, **MODES[mode]
        )  # fmt: skip
        return terms_and_grads(trainer, batch)

    result = run(mode)
    terms = result[0]
    assert rel_diff(torch.tensor(terms["loss_logits"]), expected) <= 1e-5
    assert rel_diff(torch.tensor(terms["loss_task"]), expected_task) <= 1e-5
    if mode != "plain":
        assert_same(result, run("plain"))


@pytest.mark.parametrize("mode", ["chunked", "fused"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_term_and_gradient_equals_the_plain_path(tmp_path, collator, arch, mode):
    """With hidden-state, embedding and attention matching on (narrower student: projections) the fused forward
    captures the same layers, and every term and gradient equals the plain path's."""
    batch = batch_of(collator)
    results = {}
    for run in ("plain", mode):
        teacher, student = causal_lm(arch, seed=0, layers=4), causal_lm(arch, hidden=16, seed=1)
        trainer = lm_trainer(
            tmp_path / run, teacher, student, collator, logits_loss="generalized_jsd", hidden_weight=1.0,
            embeddings_weight=1.0, attention_weight=1.0, **MODES[run],
        )  # fmt: skip
        assert len(trainer.projections) > 0
        results[run] = terms_and_grads(trainer, batch)
    assert set(results["plain"][0]) == set(TERM_KEYS)
    assert_same(results[mode], results["plain"])


@pytest.mark.parametrize("case", ["all_tokens", "unlabelled"])
def test_fused_equals_plain_on_every_real_token_and_on_unlabelled_batches(tmp_path, collator, case):
    """distill_on="all_tokens" scores every real token (the last one too); a batch without labels has no task term
    and scores its real tokens whatever distill_on says."""
    batch = batch_of(collator)
    if case == "unlabelled":
        batch.pop("labels")
    results = {}
    for mode in ("plain", "fused"):
        teacher, student = causal_lm("gpt2", seed=0), causal_lm("gpt2", hidden=16, seed=1)
        trainer = lm_trainer(
            tmp_path / mode, teacher, student, collator, logits_loss="total_variation", distill_on="all_tokens",
            **MODES[mode],
        )  # fmt: skip
        results[mode] = terms_and_grads(trainer, batch)
    assert ("loss_task" in results["plain"][0]) == (case == "all_tokens")
    assert_same(results["fused"], results["plain"])


def test_gradient_accumulation_matches_the_full_batch_with_the_fused_path(tmp_path, tiny_tokenizer):
    """Two micro-batches of 4 give the update of one batch of 8. Every batch is padded to 16 positions, so that
    the rows' forward passes are the same in both runs (padding still varies from row to row)."""
    collator = DataCollatorForTokenClassification(tiny_tokenizer, pad_to_multiple_of=16)
    updates = []
    for bs, ga in ((8, 1), (4, 2)):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer = lm_trainer(
            tmp_path / f"ga{ga}", teacher, student, collator, lm_dataset(8), fused_lm_head=True, logits_chunk_size=5,
            per_device_train_batch_size=bs, gradient_accumulation_steps=ga, logits_loss="skew_reverse_kl",
        )  # fmt: skip
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    for name in updates[0]:
        assert rel_diff(updates[1][name], updates[0][name]) <= 1e-5, name


# --------------------------------------------------------------------------------------------------------------------
# What never counts, and what is never made
# --------------------------------------------------------------------------------------------------------------------


def perturb_uncounted(model, keep: torch.Tensor):
    """Change the decoder body's output (hence the logits) at every position outside `keep`."""

    def hook(module, args, output):
        hidden = output.last_hidden_state
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)) * 100
        output.last_hidden_state = torch.where(keep[..., None], hidden, hidden + noise)
        return output

    return unwrap_peft(model).get_decoder().register_forward_hook(hook)


@pytest.mark.parametrize("mode", list(MODES))
def test_prompt_padding_and_last_positions_never_count(tmp_path, collator, mode):
    batch = batch_of(collator)
    keep = scored_positions(batch)
    results = []
    for perturbed in (False, True):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        trainer = lm_trainer(tmp_path / str(perturbed), teacher, student, collator, **MODES[mode])
        handles = [perturb_uncounted(m, keep) for m in (student, teacher)] if perturbed else []
        results.append(terms_and_grads(trainer, batch))
        for handle in handles:
            handle.remove()
    assert_same(results[1], results[0], tolerance=1e-6)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op makes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("fused", [True, False])
def test_fused_training_makes_no_tokens_by_vocabulary_tensor(tmp_path, collator, fused):
    vocab = 96  # distinct from every width of the models (16, 32, 64), so a last dimension of 96 is the vocabulary
    teacher, student = causal_lm("llama", seed=0, vocab=vocab), causal_lm("llama", hidden=16, seed=1, vocab=vocab)
    trainer = lm_trainer(
        tmp_path, teacher, student, collator, fused_lm_head=fused, logits_chunk_size=16 if fused else None
    )  # fmt: skip
    batch = batch_of(collator)
    tokens = batch["input_ids"].numel()
    head_positions = []
    for model in (student, teacher):
        model.lm_head.register_forward_hook(lambda m, a, out: head_positions.append(out.shape[-2]))
    trainer.model.train()
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    with ShapeRecorder() as recorder:
        trainer.training_step(trainer.model, batch, counts)
    vocabulary_rows = [math.prod(s[:-1]) for s in recorder.shapes if len(s) >= 2 and s[-1] == vocab]
    if fused:
        assert head_positions == [0, 0]  # both LM heads ran on no position
        # Chunks of 16 positions, and the (H, V) views of the LM-head weights (H = 16, 32): never the 88 tokens.
        assert max(vocabulary_rows) <= 32 < tokens
    else:  # the check sees the plain path's logits
        assert head_positions == [batch["input_ids"].shape[1]] * 2 and max(vocabulary_rows) >= tokens
    assert all(p.grad is not None for p in student.parameters())


def test_fused_evaluation_returns_logits_for_metrics_only_and_the_same_losses(tmp_path, collator):
    eval_data = lm_dataset(8)
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {}

    metrics = {}
    for mode in ("plain", "fused"):
        teacher, student = causal_lm("llama", seed=0), causal_lm("llama", hidden=16, seed=1)
        trainer = lm_trainer(tmp_path / mode, teacher, student, collator, **MODES[mode])
        trainer.compute_metrics = compute_metrics
        metrics[mode] = trainer.evaluate(eval_data)
        if mode == "fused":
            assert seen["shape"][-1] == 64 and seen["shape"][0] == 8  # (rows, length, vocabulary) predictions
            positions = []
            student.lm_head.register_forward_hook(lambda m, a, out, seen=positions: seen.append(out.shape[-2]))
            trainer.compute_metrics = None  # the loss only: no logits are made
            trainer.evaluate(eval_data)
            assert positions and set(positions) == {0}
    for key in ("eval_loss", "eval_loss_task", "eval_loss_logits"):
        assert metrics["fused"][key] == pytest.approx(metrics["plain"][key], rel=1e-5)


def test_peft_lora_student_with_fused_lm_head(tmp_path, collator):
    peft = pytest.importorskip("peft")
    batch = batch_of(collator)
    results = {}
    for mode in ("plain", "fused"):
        teacher = causal_lm("llama", seed=0)
        student = peft.get_peft_model(
            causal_lm("llama", seed=1),
            peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]),
        )
        # Two steps: LoRA's B starts at 0, so A changes from the second step on.
        trainer = lm_trainer(tmp_path / mode, teacher, student, collator, max_steps=2, **MODES[mode])
        results[mode] = terms_and_grads(trainer, batch)
        if mode == "fused":
            before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
            trainer.train()
            assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters() if p.requires_grad)
    assert results["fused"][1] and all("lora" in n for n in results["fused"][1])
    assert_same(results["fused"], results["plain"])


# --------------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    (dict(jsd_beta=1.5), r"jsd_beta must be in \[0, 1\], got 1.5\. .*0 is the forward KL"),
    (dict(jsd_beta=-0.1), r"jsd_beta must be in \[0, 1\], got -0.1"),
    (dict(skew_alpha=1.0), r"skew_alpha must be in \[0, 1\), got 1.0\. .*DistiLLM uses 0.1"),
    (dict(logits_chunk_size=0), r"logits_chunk_size must be an int >= 1 or None, got 0\. Use e.g. 1024"),
    (dict(fused_lm_head=True, logits_loss="mse"), r"fused_lm_head=True .* logits_loss='mse' compares raw logits"),
    (dict(fused_lm_head=True, use_teacher_cache=True), r"fused_lm_head=True needs the teacher's last hidden states"),
    (
        dict(use_teacher_cache=True, teacher_cache_top_k=4, logits_loss="generalized_jsd", jsd_beta=1.0),
        r"logits_loss='generalized_jsd' with jsd_beta=1 \(the reverse KL\) is not defined",
    ),
    (dict(logits_loss="skew"), r"logits_loss must be one of \[.*'skew_kl'.*\], got 'skew'"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_ERRORS)
def test_config_refuses_bad_values_naming_field_value_and_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)


def test_the_loss_parameter_goes_only_to_the_loss_that_takes_it(tmp_path):
    config = DistillationConfig(output_dir=str(tmp_path), report_to="none", **PARAMETERS)
    expected = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
    for name in KD_LOGIT_LOSSES:
        config.logits_loss = name
        assert config.logits_loss_kwargs == expected.get(name, {}), name


def scaled_head(model):
    model.lm_head.register_forward_hook(lambda m, a, out: out * 2)  # logits that are not lm_head(hidden)
    return model


def softcapped(model):
    model.config.final_logit_softcapping = 30.0
    return model


def lora_on_head(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["lm_head"]))


def bert(**kw):
    return BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, **kw))


TRAINER_ERRORS = [
    ("vocabulary", lambda: (causal_lm("llama"), causal_lm("llama", vocab=96)), {}, r"vocab_size differs: teacher 64"),
    ("sequence classifier", lambda: (bert(), bert()), {}, r"but the student is a BertForSequenceClassification"),
    ("softcapping", lambda: (causal_lm("llama"), softcapped(causal_lm("llama"))), {}, r"final_logit_softcapping=30"),
    ("scaled logits", lambda: (scaled_head(causal_lm("gpt2")), causal_lm("gpt2")), {}, r"the teacher .* otherwise"),
    ("lora on lm_head", lambda: (causal_lm("llama"), lora_on_head(causal_lm("llama"))), {}, r"plain nn.Linear"),
]


@pytest.mark.parametrize("case, models, overrides, message", TRAINER_ERRORS, ids=[c[0] for c in TRAINER_ERRORS])
def test_fused_lm_head_refuses_models_it_would_get_wrong(tmp_path, collator, case, models, overrides, message):
    if case == "lora on lm_head":
        pytest.importorskip("peft")
    teacher, student = models()
    with pytest.raises(ValueError, match=message):
        lm_trainer(tmp_path, teacher, student, collator, fused_lm_head=True, **overrides)


def test_chunking_a_sequence_classifier_and_the_lm_divergences_on_regression_are_refused(tmp_path, collator):
    with pytest.raises(ValueError, match=r"logits_chunk_size=8 chunks a token-level logit term .* logits_chunk_size"):
        lm_trainer(tmp_path, bert(), bert(), collator, logits_chunk_size=8)
    with pytest.raises(ValueError, match=r"logits_loss='total_variation' with a regression head .* logits_loss='mse'"):
        lm_trainer(tmp_path, bert(num_labels=1), bert(num_labels=1), collator, logits_loss="total_variation")
