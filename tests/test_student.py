"""Tests for hf_distill.student: layer choice, make_student for every supported family, save/reload, errors, CLI."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import tiny_bert_config
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MPNetConfig,
    MPNetForSequenceClassification,
    MPNetModel,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

from hf_distill.student import LAYER_PATHS, default_student_layers, get_base_model, get_layers, make_student

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, HEADS, DEPTH = 64, 32, 4, 4


# ---- Tiny configs: one factory per family, depth as the only argument ----


def bert_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return tiny_bert_config(vocab_size=VOCAB, num_layers=num_layers, hidden=HIDDEN, heads=HEADS)


def roberta_config(num_layers: int = DEPTH, config_class: type = RobertaConfig) -> PreTrainedConfig:
    # RoBERTa positions start after pad_token_id, hence max_position_embeddings > sequence length + 2.
    return config_class(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip


def xlm_roberta_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return roberta_config(num_layers, XLMRobertaConfig)


def distilbert_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=num_layers, n_heads=HEADS, hidden_dim=2 * HIDDEN,
        max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip


def mpnet_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return MPNetConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2,
    )  # fmt: skip


def gpt2_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=num_layers, n_head=HEADS, n_positions=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, use_cache=False,
    )  # fmt: skip


def llama_config(num_layers: int = DEPTH, tie_word_embeddings: bool = False) -> PreTrainedConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings, use_cache=False,
    )  # fmt: skip


def llama_tied_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return llama_config(num_layers, tie_word_embeddings=True)


def qwen2_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    # A sliding window shorter than the test sequences on layers >= 2, so layer_types really matter:
    # 4 layers -> ["full", "full", "sliding", "sliding"].
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
        use_cache=False,
    )  # fmt: skip


def qwen3_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HIDDEN // HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
    )  # fmt: skip


def mistral_config(num_layers: int = DEPTH) -> PreTrainedConfig:
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=64, sliding_window=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
    )  # fmt: skip


class Case(NamedTuple):
    model_class: type[PreTrainedModel]
    auto_class: type  # what a user would reload the saved student with
    make_config: Callable[..., PreTrainedConfig]
    tied: bool  # whether the model ties an output projection to the input embeddings


# Short names for the Auto classes a user would reload each student with.
BASE, SEQ_CLS, TOK_CLS = AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
MLM, CLM = AutoModelForMaskedLM, AutoModelForCausalLM

CASES = [
    pytest.param(Case(BertModel, BASE, bert_config, False), id="bert-base"),
    pytest.param(Case(BertForSequenceClassification, SEQ_CLS, bert_config, False), id="bert-seqcls"),
    pytest.param(Case(BertForMaskedLM, MLM, bert_config, True), id="bert-mlm"),
    pytest.param(Case(RobertaModel, BASE, roberta_config, False), id="roberta-base"),
    pytest.param(Case(RobertaForSequenceClassification, SEQ_CLS, roberta_config, False), id="roberta-seqcls"),
    pytest.param(Case(XLMRobertaForTokenClassification, TOK_CLS, xlm_roberta_config, False), id="xlmr-tokcls"),
    pytest.param(Case(DistilBertModel, BASE, distilbert_config, False), id="distilbert-base"),
    pytest.param(Case(DistilBertForSequenceClassification, SEQ_CLS, distilbert_config, False), id="distilbert-seqcls"),
    pytest.param(Case(DistilBertForMaskedLM, MLM, distilbert_config, True), id="distilbert-mlm"),
    pytest.param(Case(MPNetModel, BASE, mpnet_config, False), id="mpnet-base"),
    pytest.param(Case(MPNetForSequenceClassification, SEQ_CLS, mpnet_config, False), id="mpnet-seqcls"),
    pytest.param(Case(GPT2Model, BASE, gpt2_config, False), id="gpt2-base"),
    pytest.param(Case(GPT2LMHeadModel, CLM, gpt2_config, True), id="gpt2-lm"),
    pytest.param(Case(GPT2ForSequenceClassification, SEQ_CLS, gpt2_config, False), id="gpt2-seqcls"),
    pytest.param(Case(LlamaModel, BASE, llama_config, False), id="llama-base"),
    pytest.param(Case(LlamaForCausalLM, CLM, llama_config, False), id="llama-lm"),
    pytest.param(Case(LlamaForCausalLM, CLM, llama_tied_config, True), id="llama-lm-tied"),
    pytest.param(Case(LlamaForSequenceClassification, SEQ_CLS, llama_config, False), id="llama-seqcls"),
    pytest.param(Case(Qwen2Model, BASE, qwen2_config, False), id="qwen2-base"),
    pytest.param(Case(Qwen2ForCausalLM, CLM, qwen2_config, False), id="qwen2-lm"),
    pytest.param(Case(Qwen2ForTokenClassification, TOK_CLS, qwen2_config, False), id="qwen2-tokcls"),
    pytest.param(Case(Qwen3ForCausalLM, CLM, qwen3_config, False), id="qwen3-lm"),
    pytest.param(Case(MistralForCausalLM, CLM, mistral_config, False), id="mistral-lm"),
]


# ---- Helpers ----


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls: intra-op threads only add sync overhead (10x+ slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_teacher(case: Case, num_layers: int = DEPTH) -> PreTrainedModel:
    torch.manual_seed(0)
    return case.model_class(case.make_config(num_layers)).eval()


def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 8 tokens (ids above the special tokens), the second right-padded by 2."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def output(model: PreTrainedModel) -> torch.Tensor:
    out = model(**batch())
    return out.logits if "logits" in out else out.last_hidden_state


def teacher_with_only(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """Reference: the teacher itself, running only the chosen layers (each keeping its own attention type)."""
    reference = copy.deepcopy(teacher)
    parent_path, _, name = LAYER_PATHS[teacher.config.model_type].rpartition(".")
    parent = get_base_model(reference)
    parent = parent.get_submodule(parent_path) if parent_path else parent
    setattr(parent, name, nn.ModuleList([getattr(parent, name)[layer] for layer in layers]))
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [teacher.config.layer_types[layer] for layer in layers]
    return reference


def tied_groups(model: PreTrainedModel) -> list[list[str]]:
    """state_dict keys that share storage (tied weights), as sorted groups."""
    by_storage: dict[int, list[str]] = {}
    for key, tensor in model.state_dict().items():
        by_storage.setdefault(tensor.data_ptr(), []).append(key)
    return sorted(sorted(keys) for keys in by_storage.values() if len(keys) > 1)


# ---- default_student_layers ----


@pytest.mark.parametrize(
    "num_teacher, num_student, expected",
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),  # DistilBERT's choice from BERT-base
        (6, 3, [0, 3, 5]),
        (4, 2, [0, 3]),
        (4, 1, [3]),
        (1, 1, [0]),
        (4, 4, [0, 1, 2, 3]),
        (24, 4, [0, 8, 15, 23]),
    ],
)
def test_default_student_layers(num_teacher, num_student, expected):
    assert default_student_layers(num_teacher, num_student) == expected


def test_default_student_layers_spread_evenly_and_keep_both_ends():
    for big in range(1, 40):
        for small in range(1, big + 1):
            layers = default_student_layers(big, small)
            assert len(layers) == small
            assert all(later > earlier for earlier, later in zip(layers, layers[1:]))
            assert layers[-1] == big - 1
            if small > 1:
                assert layers[0] == 0
                assert layers == [int(i * (big - 1) / (small - 1) + 0.5) for i in range(small)]


@pytest.mark.parametrize(
    "num_teacher, num_student, match",
    [(12, 0, "between 1 and num_teacher_layers=12"), (4, 5, r"deeper than its teacher \(4 layers\)"), (0, 1, ">= 1")],
)
def test_default_student_layers_errors(num_teacher, num_student, match):
    with pytest.raises(ValueError, match=match):
        default_student_layers(num_teacher, num_student)


# ---- make_student on every supported family ----


@pytest.mark.parametrize("layers", [None, [1, 2]], ids=["default-layers", "layers-1-2"])
@pytest.mark.parametrize("case", CASES)
def test_student_copies_chosen_teacher_layers(case, layers):
    teacher = build_teacher(case)
    student = make_student(teacher, layers=layers, verbose=False)
    chosen = layers or [0, 3]  # default for 4 -> 2

    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(get_layers(student)) == 2
    assert student.config.distillation_teacher_layers == chosen

    # Student layer i is teacher layer chosen[i], tensor for tensor.
    for student_layer, teacher_layer in zip(get_layers(student), [get_layers(teacher)[i] for i in chosen]):
        student_state, teacher_state = student_layer.state_dict(), teacher_layer.state_dict()
        assert student_state.keys() == teacher_state.keys()
        assert all(torch.equal(student_state[key], teacher_state[key]) for key in student_state)

    # Everything outside the layer stack (embeddings, MPNet's shared bias, norms, pooler, head) is copied unchanged.
    layers_prefix = next(name for name, module in student.named_modules() if module is get_layers(student)) + "."
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    outside = [key for key in student_state if not key.startswith(layers_prefix)]
    assert outside == [key for key in teacher_state if not key.startswith(layers_prefix)]
    for key in outside:
        assert torch.equal(student_state[key], teacher_state[key]), key

    # Same ties as the teacher, and no tensor shared with it (training the student must not touch the teacher).
    assert tied_groups(student) == tied_groups(teacher)
    assert bool(tied_groups(student)) == case.tied
    teacher_storage = {tensor.data_ptr() for tensor in teacher.state_dict().values()}
    assert not teacher_storage & {tensor.data_ptr() for tensor in student.state_dict().values()}

    # Outputs differ from the teacher's only because of depth: the teacher running just the chosen layers matches.
    torch.testing.assert_close(output(student), output(teacher_with_only(teacher, chosen)), rtol=0, atol=0)
    assert not torch.allclose(output(student), output(teacher))


@pytest.mark.parametrize("case", CASES)
def test_student_with_all_teacher_layers_is_the_teacher(case):
    teacher = build_teacher(case)
    student = make_student(teacher, num_layers=DEPTH, verbose=False)
    assert student.config.distillation_teacher_layers == list(range(DEPTH))
    torch.testing.assert_close(output(student), output(teacher), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_student_save_and_reload_with_auto_class(case, tmp_path):
    teacher = build_teacher(case)
    student = make_student(teacher, layers=[1, 3], verbose=False).eval()
    student.save_pretrained(tmp_path)

    reloaded, info = case.auto_class.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is type(teacher)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.distillation_teacher_layers == [1, 3]
    assert reloaded.config.num_hidden_layers == 2
    assert tied_groups(reloaded) == tied_groups(student)
    torch.testing.assert_close(output(reloaded.eval()), output(student), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_config, model_class, field",
    [
        (gpt2_config, GPT2Model, "n_layer"),
        (distilbert_config, DistilBertModel, "n_layers"),
        (bert_config, BertModel, "num_hidden_layers"),
    ],
)
def test_depth_is_saved_under_the_family_field_name(make_config, model_class, field, tmp_path):
    make_student(model_class(make_config(4)), num_layers=3, verbose=False).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved[field] == 3
    assert saved["distillation_teacher_layers"] == [0, 2, 3]


def test_qwen2_layer_types_follow_the_chosen_layers():
    teacher = Qwen2ForCausalLM(qwen2_config(6))  # layers 0-1 full attention, 2-5 sliding window
    student = make_student(teacher, layers=[0, 1, 4], verbose=False)
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    # max_window_layers still describes layer_types, so a config rebuilt from it agrees.
    assert student.config.max_window_layers == 2
    rebuilt = Qwen2Config(**{**student.config.to_dict(), "layer_types": None})
    assert rebuilt.layer_types == student.config.layer_types
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [None, None, 4]


def test_mpnet_relative_attention_bias_is_shared_and_copied_as_is():
    teacher = MPNetForSequenceClassification(mpnet_config(4))
    student = make_student(teacher, num_layers=2, verbose=False)
    bias = student.mpnet.encoder.relative_attention_bias.weight
    assert torch.equal(bias, teacher.mpnet.encoder.relative_attention_bias.weight)
    assert bias.shape == (teacher.config.relative_attention_num_buckets, HEADS)


def test_student_keeps_teacher_dtype_per_tensor():
    teacher = LlamaForCausalLM(llama_tied_config(4)).to(torch.bfloat16)
    teacher.model.norm.weight.data = teacher.model.norm.weight.data.float()  # a module kept in fp32
    student = make_student(teacher, verbose=False)
    assert student.dtype == torch.bfloat16 and student.config.dtype == torch.bfloat16
    assert student.model.norm.weight.dtype == torch.float32
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight


def test_student_is_trainable_even_if_teacher_is_frozen():
    teacher = BertForSequenceClassification(bert_config()).requires_grad_(False).eval()
    student = make_student(teacher, verbose=False)
    assert all(param.requires_grad for param in student.parameters())
    assert not student.training


def test_verbose_summary(capsys):
    make_student(BertForSequenceClassification(bert_config(12)), num_layers=6)
    printed = capsys.readouterr().out
    assert "12 -> 6 layers" in printed
    for student_layer, teacher_layer in enumerate([0, 2, 4, 7, 9, 11]):
        assert f"teacher layer {teacher_layer:>3} -> student layer {student_layer:>3}" in printed
    assert "% kept" in printed and "bert.pooler.dense" in printed and "classifier" in printed


def test_gpt2_inverse_layer_idx_scaling_warns(caplog):
    config = gpt2_config(4)
    config.scale_attn_by_inverse_layer_idx = True
    with caplog.at_level(logging.WARNING, logger="hf_distill.student"):
        make_student(GPT2Model(config), verbose=False)
    assert "scale_attn_by_inverse_layer_idx" in caplog.text


# ---- Errors ----


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_layers": 3, "layers": [0, 1]}, r"num_layers=3 disagrees with layers=\[0, 1\]"),
        ({"num_layers": 0}, r"num_layers must be between 1 and 4 .*got 0"),
        ({"num_layers": 5}, r"num_layers=5 but a student cannot be deeper than its teacher \(4 layers\)"),
        ({"layers": [0, 4]}, r"contains \[4\].*valid indices are 0\.\.3"),
        ({"layers": [-1, 2]}, r"contains \[-1\].*valid indices are 0\.\.3"),
        ({"layers": [1, 1]}, r"strictly increasing.*got \[1, 1\]"),
        ({"layers": [2, 1]}, r"strictly increasing.*got \[2, 1\]"),
        ({"layers": []}, r"at least one teacher layer"),
        ({"layers": [0.5, 1]}, r"layers must be integer"),
    ],
)
def test_make_student_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_student(BertModel(bert_config()), verbose=False, **kwargs)


def test_make_student_refuses_to_tie_weights_the_teacher_has_untied():
    teacher = LlamaForCausalLM(llama_tied_config())
    teacher.lm_head.weight = nn.Parameter(teacher.lm_head.weight.detach() + 1)  # config says tied, weights are not
    with pytest.raises(ValueError, match=r"ties 'lm_head.weight' to 'model.embed_tokens.weight'.*differ"):
        make_student(teacher, verbose=False)


def test_make_student_rejects_unsupported_family():
    config = ElectraConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"model_type 'electra' is not supported; supported model types are \["):
        make_student(ElectraModel(config))


def test_make_student_rejects_non_transformers_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        make_student(nn.Linear(2, 2))


# ---- scripts/make_student.py ----


def load_script():
    spec = importlib.util.spec_from_file_location("make_student_script", REPO_ROOT / "scripts" / "make_student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    """A 4-layer BERT classifier and its tokenizer saved like a Hub checkpoint."""
    torch.manual_seed(0)
    path = tmp_path / "teacher"
    BertForSequenceClassification(bert_config()).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_script_end_to_end(teacher_dir, tmp_path, tiny_tokenizer):
    out = tmp_path / "students" / "bert-2l"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "scripts/make_student.py", "--teacher", str(teacher_dir), "--output_dir", str(out)]
    result = subprocess.run([*command, "--layers", "0,3"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "teacher layer   3 -> student layer   1" in result.stdout

    assert os.listdir(out.parent) == ["bert-2l"]  # no staging directory left behind
    student = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert student.config.distillation_teacher_layers == [0, 3]
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    expected = make_student(teacher, layers=[0, 3], verbose=False).eval()
    torch.testing.assert_close(output(student), output(expected), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tiny_tokenizer.get_vocab()


def test_script_task_and_missing_tokenizer(tmp_path):
    teacher_dir = tmp_path / "teacher"
    BertForSequenceClassification(bert_config()).save_pretrained(teacher_dir)  # no tokenizer files
    out = tmp_path / "student"
    load_script().main(
        ["--teacher", str(teacher_dir), "--output_dir", str(out), "--num_layers", "3", "--task", "base"]
    )
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    assert not any(name.startswith(("tokenizer", "vocab")) for name in os.listdir(out))


def test_script_overwrite_output_dir(teacher_dir, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--teacher", str(teacher_dir), "--output_dir", str(out)])
    script.main(["--teacher", str(teacher_dir), "--output_dir", str(out), "--overwrite_output_dir"])
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["student", "teacher"]


@pytest.mark.parametrize(
    "teacher, extra_args, match",
    [
        ("{tmp}/no/such/teacher", [], "--teacher .* is neither an existing local directory nor a valid Hub id"),
        ("{teacher}", ["--layers", "0,x"], "--layers must be comma-separated integers"),
        ("{teacher}", ["--num_layers", "2", "--layers", "0,1"], "--layers: not allowed with argument --num_layers"),
        ("{teacher}", ["--num_layers", "9"], r"student cannot be deeper than its teacher \(4 layers\)"),
        ("{teacher}", ["--layers", "0,4"], r"valid indices are 0\.\.3"),
    ],
)
def test_script_argument_errors(teacher, extra_args, match, teacher_dir, tmp_path, capsys):
    teacher = teacher.format(tmp=tmp_path, teacher=teacher_dir)
    with pytest.raises(SystemExit):
        load_script().main(["--teacher", teacher, "--output_dir", str(tmp_path / "out"), *extra_args])
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
