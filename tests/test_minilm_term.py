"""The MiniLM term of DistillationTrainer (hf_distill.minilm_term): the logged value against the pure loss on
query / key / value projections computed independently of the trainer's hooks (BERT 64/4 heads -> 32/2 heads, MPNet,
Llama with grouped-query attention), gradients, its normalisation under gradient accumulation, hooks that never
outlive a step, and refusals."""

import math

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import (
    BertForSequenceClassification,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses.minilm import MINILM_RELATIONS, attention_relation_loss, relation_log_probs
from hf_distill.minilm_term import QKV_PATHS, build_minilm_term, capture_qkv
from hf_distill.student import get_layers

MINILM_ONLY = dict(task_weight=0.0, logits_weight=0.0, minilm_weight=1.0, minilm_relation_heads=4)
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def bert(seed: int, **kw):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**{**NO_DROPOUT, **kw}))


def mpnet(seed: int, hidden: int, heads: int, layers: int):
    torch.manual_seed(seed)
    config = MPNetConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=66, num_labels=2, **NO_DROPOUT,
    )  # fmt: skip
    return MPNetForSequenceClassification(config)


def llama(seed: int, hidden: int, heads: int, kv_heads: int, layers: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


MODELS = {
    # teacher hidden 64 / 4 heads -> student hidden 32 / 2 heads
    "bert": (lambda: bert(0, num_layers=4, hidden=64, heads=4), lambda: bert(1, num_layers=2, hidden=32, heads=2)),
    "mpnet": (lambda: mpnet(0, 64, 4, 3), lambda: mpnet(1, 32, 2, 2)),
    # grouped-query attention: keys / values of 2 heads (32 wide) for 4 query heads; the student's 16 for 32
    "llama": (lambda: llama(0, 64, 4, 2, 3), lambda: llama(1, 32, 2, 1, 2)),
}


def dataset(tokenizer, n: int = 16, labels: bool = True) -> Dataset:
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(
            WORDS[j]
            for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]
    columns = dict(tokenizer(texts, truncation=True, max_length=16))
    if labels:
        columns["labels"] = [i % 2 for i in range(n)]
    return Dataset.from_dict(columns)


def make_trainer(tmp_path, tokenizer, family="bert", teacher=None, student=None, **overrides):
    defaults = dict(per_device_train_batch_size=8, max_steps=2, save_strategy="no", report_to="none", use_cpu=True)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), seed=0, **{**defaults, **MINILM_ONLY, **overrides})
    make_teacher, make_student = MODELS[family]
    return DistillationTrainer(
        model=student if student is not None else make_student(),
        teacher_model=teacher if teacher is not None else make_teacher(),
        args=args,
        train_dataset=dataset(tokenizer, labels=family != "llama"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def batch(trainer, rows: range):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def logged(trainer) -> dict[str, float]:
    trainer.log({})
    return trainer.state.log_history[-1]


def independent_qkv(model, inputs, layer: int) -> dict[str, torch.Tensor]:
    """The layer's q / k / v, computed from its input hidden state by calling the projections directly (no hooks)."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]  # the input of block `layer`
        block = get_layers(model)[layer]
        if model.config.model_type == "llama":
            hidden = block.input_layernorm(hidden)
        modules = [block.get_submodule(path) for path in QKV_PATHS[model.config.model_type]]
        return {name: module(hidden) for name, module in zip("qkv", modules)}


def expected_loss(trainer, inputs, relations, heads, t_layer, s_layer) -> float:
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = independent_qkv(trainer.model, model_inputs, s_layer)
    t = independent_qkv(trainer.teacher, model_inputs, t_layer)
    causal = trainer.model.config.model_type == "llama"
    total = 0.0
    for relation in relations.split(","):
        left, right = MINILM_RELATIONS[relation]
        total += attention_relation_loss(
            s[left], s[right], t[left], t[right], inputs["attention_mask"], relation_heads=heads, causal=causal
        ).item()
    return total


# --------------------------------------------------------------------------------------------------------------------
# The logged term against the pure loss
# --------------------------------------------------------------------------------------------------------------------

# (family, relations, relation heads, minilm_layer, teacher layer, student layer)
CASES = [
    ("bert", "qq,kk,vv", 4, None, 3, 1),
    ("bert", "attention,vv", 2, "1->0", 1, 0),
    ("bert", "kk", 8, "-2->0", 2, 0),
    ("mpnet", "qq,kk,vv", 4, None, 2, 1),
    ("mpnet", "attention,vv", 2, "0->1", 0, 1),
    ("llama", "qq,kk,vv", 2, None, 2, 1),
]


@pytest.mark.parametrize("family, relations, heads, layer, t_layer, s_layer", CASES)
def test_logged_minilm_equals_the_pure_loss_on_independent_projections(
    tmp_path, tiny_tokenizer, family, relations, heads, layer, t_layer, s_layer
):
    trainer = make_trainer(
        tmp_path, tiny_tokenizer, family, minilm_relations=relations, minilm_relation_heads=heads, minilm_layer=layer
    )
    inputs = batch(trainer, range(8))
    assert inputs["attention_mask"].min() == 0  # the batch is padded
    counts = trainer._get_num_items_in_batch([inputs], trainer.args.device)
    trainer.model.train()
    returned = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=counts)
    value = logged(trainer)["loss_minilm"]
    trainer.model.eval()
    expected = expected_loss(trainer, inputs, relations, heads, t_layer, s_layer)
    assert expected > 0
    assert value == pytest.approx(expected, rel=1e-5)
    assert returned.item() == pytest.approx(expected, rel=1e-5)  # minilm_weight = 1, the only term


def test_the_attention_relation_at_the_models_head_count_is_their_attention(tiny_tokenizer):
    # MiniLM's attention transfer: with relation heads = attention heads, softmax(Q K^T / sqrt(d)) per head is BERT's
    # attention distribution over the real keys.
    model = bert(0, num_layers=2, hidden=32, heads=4, attn_implementation="eager").eval()
    inputs = DataCollatorWithPadding(tiny_tokenizer)([dataset(tiny_tokenizer, labels=False)[i] for i in range(4)])
    qkv = independent_qkv(model, inputs, 1)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions[1]
    relation = relation_log_probs(qkv["q"], qkv["k"], inputs["attention_mask"], relation_heads=4).exp()
    torch.testing.assert_close(relation, attentions, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Gradients and gradient accumulation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relations, reached", [("qq,kk,vv", "qkv"), ("attention", "qk"), ("vv", "v")])
def test_gradient_reaches_the_students_projections_of_the_layer_only(tmp_path, tiny_tokenizer, relations, reached):
    trainer = make_trainer(tmp_path, tiny_tokenizer, minilm_relations=relations)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch(trainer, range(8))).backward()
    last = get_layers(trainer.model)[1]
    for name, path in zip("qkv", QKV_PATHS["bert"]):
        grad = last.get_submodule(path).weight.grad
        if name in reached:
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        else:
            assert grad is None or grad.abs().sum() == 0, name
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert trainer.model.classifier.weight.grad is None  # nothing after the layer's attention enters the term


def test_under_gradient_accumulation_micro_batches_add_up_to_their_concatenation(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, minilm_relations="attention,vv", minilm_relation_heads=2)
    first, second, whole = batch(trainer, range(5)), batch(trainer, range(5, 8)), batch(trainer, range(8))
    lengths = {b["input_ids"].shape[1] for b in (first, second, whole)}
    assert len(lengths) > 1  # padded to different lengths
    counts = trainer._get_num_items_in_batch([first, second], trainer.args.device)
    trainer.model.eval()
    with torch.no_grad():
        parts = [trainer.compute_loss(trainer.model, b, num_items_in_batch=counts).item() for b in (first, second)]
        window_logged = logged(trainer)["loss_minilm"]
        concatenated = trainer.compute_loss(trainer.model, whole).item()  # no counts: its own real tokens
    assert sum(parts) == pytest.approx(concatenated, rel=1e-5)
    assert window_logged == pytest.approx(concatenated, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Hooks never outlive a step; training
# --------------------------------------------------------------------------------------------------------------------


def projection_hooks(model, family: str) -> int:
    return sum(
        len(block.get_submodule(path)._forward_hooks) for block in get_layers(model) for path in QKV_PATHS[family]
    )


def test_hooks_are_removed_after_each_step_and_on_errors(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer)
    trainer.compute_loss(trainer.model, batch(trainer, range(4)))
    assert projection_hooks(trainer.model, "bert") == 0 and projection_hooks(trainer.teacher, "bert") == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture_qkv(trainer.model, trainer.minilm, "student"):
            assert projection_hooks(trainer.model, "bert") == 3
            raise RuntimeError("boom")
    assert projection_hooks(trainer.model, "bert") == 0


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_trains_and_saves_a_plain_student(tmp_path, tiny_tokenizer, family):
    teacher_make, student_make = MODELS[family]
    teacher, student = teacher_make(), student_make()
    keys = set(student.state_dict())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(
        tmp_path,
        tiny_tokenizer,
        family,
        teacher=teacher,
        student=student,
        task_weight=0.5,
        logits_weight=0.5,
        minilm_weight=1.0,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-2,
    )
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and all(math.isfinite(entry["loss_minilm"]) for entry in history)
    assert all(torch.equal(v, before[k]) for k, v in trainer.teacher.state_dict().items())
    trainer.save_model(str(tmp_path / "saved"))
    saved = type(student).from_pretrained(str(tmp_path / "saved"))
    assert set(saved.state_dict()) == keys  # nothing of the term is saved with the student
    assert projection_hooks(trainer.model, family) == 0


def test_gradient_checkpointing_keeps_the_captured_block_differentiable(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer)
    trainer.model.activation_checkpointing_enable({"use_reentrant": True})
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch(trainer, range(8))).backward()
    query = get_layers(trainer.model)[1].attention.self.query.weight.grad
    assert query is not None and query.abs().sum() > 0
    assert all(getattr(block, "gradient_checkpointing", True) for block in get_layers(trainer.model))


# --------------------------------------------------------------------------------------------------------------------
# Refusals: (case, callable taking (tmp_path, tokenizer), message regex)
# --------------------------------------------------------------------------------------------------------------------


def config(**kw):
    return DistillationConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


REFUSALS = [
    (
        "unknown relation",
        lambda p, t: config(minilm_relations="qq,qk"),
        r"minilm_relations must be comma-separated names from \['attention', 'kk', 'qq', 'vv'\].*'qq,qk' "
        r"\(unknown \['qk'\]\)",
    ),
    ("relation twice", lambda p, t: config(minilm_relations="vv,vv"), r"got 'vv,vv' \(a relation named twice\)"),
    ("empty relations", lambda p, t: config(minilm_relations=""), r"minilm_relations must be .* got ''"),
    (
        "zero relation heads",
        lambda p, t: config(minilm_relation_heads=0),
        r"minilm_relation_heads must be an int >= 1, got 0",
    ),
    ("two layer pairs", lambda p, t: config(minilm_layer="1->0,3->1"), r"minilm_layer must be one 'teacher->student'"),
    ("bad layer syntax", lambda p, t: config(minilm_layer="3-1"), r"minilm_layer must be one .* got '3-1'"),
    (
        "teacher cache",
        lambda p, t: config(minilm_weight=1.0, use_teacher_cache=True),
        r"minilm_weight=1.0 needs the teacher's query / key / value projections, which the teacher cache does not "
        r"store\. Set use_teacher_cache=False",
    ),
    (
        "layer outside the teacher",
        lambda p, t: make_trainer(p, t, minilm_layer="4->1"),
        r"minilm_layer='4->1' names teacher layer 4, outside the teacher's layers 0\.\.3",
    ),
    (
        "layer outside the student",
        lambda p, t: make_trainer(p, t, minilm_layer="3->-3"),
        r"names student layer -3, outside the student's layers 0\.\.1",
    ),
    (
        "relation heads not dividing the widths",
        lambda p, t: make_trainer(p, t, minilm_relation_heads=3),
        r"minilm_relation_heads=3 must divide every projection width .* layer 3 of the teacher has widths "
        r"\{'q': 64, 'k': 64, 'v': 64\}.*\[1, 2, 4, 8, 16, 32, 64\]",
    ),
    (
        "attention under grouped-query attention",
        lambda p, t: make_trainer(p, t, "llama", minilm_relations="attention", minilm_relation_heads=2),
        r"includes 'attention' .* the teacher's queries are 64 wide and its keys 32 \(grouped-query attention\)\. "
        r"Use minilm_relations='qq,kk,vv'",
    ),
]


@pytest.mark.parametrize("case, make, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(tmp_path, tiny_tokenizer, case, make, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, tiny_tokenizer)


def test_an_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match=r"knows for model types \[.*\], not 'gpt2'\. Set minilm_weight=0"):
        build_minilm_term(config(minilm_weight=1.0, minilm_relation_heads=2), lm, lm)
    assert build_minilm_term(config(minilm_weight=0.0), lm, lm) is None


def test_a_lora_student_reads_its_adapted_projections(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(
        bert(1, num_layers=2, hidden=32, heads=2),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "key", "value"]),
    )
    trainer = make_trainer(tmp_path, tiny_tokenizer, student=student, eval_strategy="no")
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch(trainer, range(8))).backward()
    adapted = get_layers(trainer.model)[1].attention.self.query
    assert (
        adapted.lora_B["default"].weight.grad.abs().sum() > 0
    )  # the hook saw the LoRA layer's output (B starts at 0)
    assert projection_hooks(trainer.model, "bert") == 0
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert math.isfinite(metrics["eval_loss_minilm"]) and metrics["eval_loss_minilm"] > 0
