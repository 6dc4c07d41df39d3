"""PEFT: LoRA students (`peft`), saved as an adapter or merged (`save_merged`), and adapter teachers
(`teacher_adapter_name_or_path`), on tiny models built here."""

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_bert_config, write_tiny_tsv
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model
from test_scripts import REPO, load_script, overrides
from test_trainer import tiny_dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorWithPadding,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_distill import (
    DistillationConfig,
    DistillationTrainer,
    ModelArguments,
    load_teacher,
    make_student,
    parse_distill_args,
)
from hf_distill.peft_setup import (
    apply_lora,
    check_peft_run,
    check_peft_trainer,
    export_peft_student,
    save_peft_student,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
# Merging adds B @ A * scale to each targeted weight in fp32: the merged model's logits equal the PEFT model's up to
# rounding of that sum (observed ~1e-7 on these models).
MERGE_ATOL = 1e-5


def bert(cls=BertForSequenceClassification, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(tiny_bert_config(**{**NO_DROPOUT, **kw})).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def tiny_distilbert(seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=64)
    return DistilBertForSequenceClassification(config)


def tiny_deberta(seed: int = 0) -> DebertaV2ForSequenceClassification:
    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(config)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


IDS = torch.randint(5, 64, (3, 9), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- wrapping the student
@pytest.mark.parametrize(
    "make,settings,task,trained_head",
    [
        (lambda: bert(), LORA, "SEQ_CLS", ["classifier"]),
        (lambda: bert(), {}, "SEQ_CLS", ["classifier"]),  # `peft: {}`: PEFT's defaults (BERT: query, value)
        (lambda: bert(BertForTokenClassification), LORA, "TOKEN_CLS", ["classifier"]),
        (lambda: tiny_llama(), {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "CAUSAL_LM", []),
        # PEFT's "classifier" matches DistilBERT's pre_classifier too (modules_to_save are name suffixes).
        (
            lambda: tiny_distilbert(),
            {"target_modules": ["q_lin", "v_lin"]},
            "SEQ_CLS",
            ["pre_classifier", "classifier"],
        ),
        # DeBERTa's head has a pooler outside the base model, which PEFT's default misses: hf-distill adds it.
        (lambda: tiny_deberta(), {"target_modules": ["query_proj"]}, "SEQ_CLS", ["pooler", "classifier"]),
    ],
    ids=[
        "bert-seq-cls",
        "bert-defaults",
        "bert-token-cls",
        "llama-causal-lm",
        "distilbert-seq-cls",
        "deberta-seq-cls",
    ],
)
def test_lora_student_trains_only_the_adapter_and_a_classifiers_head(make, settings, task, trained_head):
    student = apply_lora(make(), settings)
    assert isinstance(student, PeftModel) and student.peft_config["default"].task_type == task
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    head = trainable - lora
    assert lora, "no LoRA parameter is trained"
    assert all(".modules_to_save." in name for name in head), head
    assert {name.split(".")[2] for name in head} == set(trained_head)  # base_model.model.<head module>...
    base = student.get_base_model()
    body = getattr(base, base.base_model_prefix)
    assert not [n for n, p in body.named_parameters() if p.requires_grad and ".lora_" not in n]


def distil_trainer(tmp_path, tiny_tokenizer, peft_settings=LORA, **overrides):
    teacher = bert(num_layers=4, hidden=32)
    student = apply_lora(make_student(teacher, num_layers=2), peft_settings)
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
        save_steps=6, logging_steps=1, report_to="none", use_cpu=True, seed=0, task_weight=0.5, logits_weight=0.5,
        hidden_weight=1.0, **overrides,
    )  # fmt: skip
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_dataset(tiny_tokenizer),
        processing_class=tiny_tokenizer,
        data_collator=DataCollatorWithPadding(tiny_tokenizer),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    """A LoRA student distilled from a tiny BERT for 6 steps, with its parameters before training."""
    trainer = distil_trainer(tmp_path_factory.mktemp("lora"), tiny_tokenizer)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in trainer.teacher.named_parameters()}
    trainer.train()
    return SimpleNamespace(trainer=trainer, before=before, teacher_before=teacher_before)


def test_lora_distillation_changes_only_the_adapter_and_the_head(trained):
    model = trained.trainer.model
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), trained.before[name])
        # lora_A and lora_B both move (B starts at zero, so A gets gradient from step 2 on).
        assert changed == p.requires_grad, (name, changed)
    for name, p in trained.trainer.teacher.named_parameters():
        assert torch.equal(p.detach(), trained.teacher_before[name]), name
    losses = [e["loss"] for e in trained.trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert os.path.isfile(os.path.join(trained.trainer.args.output_dir, "checkpoint-6", "adapter_model.safetensors"))


def test_saved_adapter_and_its_base_reload_to_the_same_outputs(trained, tmp_path):
    trainer = trained.trainer
    exported = export_peft_student(trainer.model, merged=False)
    folder, base = tmp_path / "student", tmp_path / "student_base"
    save_peft_student(trainer, exported, str(folder), "card\n", merged=False, base_folder=str(base))
    assert isinstance(trainer.model, PeftModel) and any(".lora_A." in n for n, _ in trainer.model.named_parameters())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(
        os.listdir(folder)
    )
    assert not any(name.endswith((".bin", ".pt")) for name in os.listdir(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["task_type"] == "SEQ_CLS"
    assert "## LoRA" in (folder / "README.md").read_text()
    expected = logits(trainer.model, IDS)
    # Exactly: the base weights and the adapter are stored as trained, and the forward is the same computation.
    torch.testing.assert_close(logits(AutoPeftModelForSequenceClassification.from_pretrained(folder), IDS), expected)
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), folder)
    torch.testing.assert_close(logits(reloaded, IDS), expected)


def test_merged_student_reloads_with_plain_transformers(trained, tmp_path):
    trainer = trained.trainer
    exported = export_peft_student(trainer.model, merged=True)
    folder = tmp_path / "merged"
    save_peft_student(trainer, exported, str(folder), "card\n", merged=True, base_folder=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(merged) is BertForSequenceClassification
    assert not any("lora" in name or "modules_to_save" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged, IDS), logits(trainer.model, IDS), atol=MERGE_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- the adapter teacher
def save_teacher_with_adapter(root, tokenizer, task_type="SEQ_CLS"):
    """A base teacher on disk and a LoRA adapter of it whose A, B and trained head are all non-trivial."""
    bert(num_layers=2, hidden=32).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = BertForSequenceClassification.from_pretrained(root / "base")
    torch.manual_seed(3)
    config = LoraConfig(task_type=task_type, init_lora_weights=False, **LORA)
    adapted = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p))
    adapted.save_pretrained(root / "adapter")
    return adapted.eval()


def test_teacher_base_plus_adapter_gives_the_peft_models_logits(tmp_path, tiny_tokenizer):
    adapted = save_teacher_with_adapter(tmp_path, tiny_tokenizer)
    args = ModelArguments(
        teacher_model_name_or_path=str(tmp_path / "base"), teacher_adapter_name_or_path=str(tmp_path / "adapter")
    )
    teacher, _ = load_teacher(args, num_labels=2)
    assert type(teacher) is BertForSequenceClassification  # merged: no adapter layers left in the forward
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any("lora" in name for name in teacher.state_dict())
    torch.testing.assert_close(logits(teacher, IDS), logits(adapted, IDS), atol=MERGE_ATOL, rtol=0)
    plain, _ = load_teacher(ModelArguments(teacher_model_name_or_path=str(tmp_path / "base")), num_labels=2)
    assert not torch.allclose(logits(plain, IDS), logits(teacher, IDS), atol=1e-3)  # the adapter acted


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("peft_e2e")
    save_teacher_with_adapter(root, tiny_tokenizer)
    bert(num_layers=4, hidden=32).save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("dev", 24)):
        write_tiny_tsv(root / f"{split}.tsv", n, g)
    recipe = {
        "student_num_layers": 2,
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "key", "value"]},
        "text_column": "sentence",
        "label_column": "label",
        "temperature": 2.0,
        "task_weight": 0.5,
        "logits_weight": 0.5,
        "report_to": "none",
    }
    (root / "lora.yaml").write_text(yaml.safe_dump(recipe))
    return root


def script_argv(root, out, *extra):
    argv = overrides(root, out, *extra)
    argv[argv.index("--config") + 1] = str(root / "lora.yaml")
    return argv


def test_script_saves_a_lora_student_as_adapter_and_base(e2e, tmp_path):
    out = tmp_path / "run"
    load_script().main(script_argv(e2e, out))
    student = AutoPeftModelForSequenceClassification.from_pretrained(out / "student")
    assert student.peft_config["default"].r == 4 and student.peft_config["default"].task_type == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(out / "student_base")
    assert base.config.num_hidden_layers == 2
    card = (out / "student" / "README.md").read_text()
    assert "## LoRA" in card and "student_base" in card and "r = 4" in card
    run_config = json.loads((out / "run_config.json").read_text())["settings"]
    assert run_config["peft"]["target_modules"] == ["query", "key", "value"]
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not torch.allclose(logits(student, IDS), logits(base, IDS))  # the adapter was trained


def test_script_merges_the_student_and_takes_an_adapter_teacher(e2e, tmp_path):
    out = tmp_path / "run"
    argv = script_argv(e2e, out, "--save_merged", "true", "--peft", '{"r": 2, "target_modules": ["value"]}')
    argv[argv.index("--teacher_model_name_or_path") + 1] = str(e2e / "base")
    argv += ["--teacher_adapter_name_or_path", str(e2e / "adapter"), "--student_num_layers", "1"]
    load_script().main(argv)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert type(student) is BertForSequenceClassification and student.config.num_hidden_layers == 1
    assert not (out / "student_base").exists()
    assert "adapter is merged" in (out / "student" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "fields,error,match",
    [
        ({"peft": {"rank": 8}}, ValueError, r"peft has unknown LoRA key\(s\): 'rank'"),
        ({"peft": {"lora_alpah": 16}}, ValueError, r"'lora_alpah' \(did you mean 'lora_alpha'\?\)"),
        ({"peft": {"r": 0}}, ValueError, r"peft.r must be an integer >= 1 \(the LoRA rank\), got 0"),
        ({"peft": {"lora_alpha": -1}}, ValueError, r"peft.lora_alpha must be a number > 0.*got -1"),
        ({"peft": {"lora_dropout": 1.5}}, ValueError, r"peft.lora_dropout must be in \[0, 1\), got 1.5"),
        ({"peft": {"target_modules": 5}}, ValueError, r"peft.target_modules must be a list of module names"),
        ({"peft": {"modules_to_save": "classifier"}}, ValueError, r"peft.modules_to_save must be a list"),
        ({"peft": {"inference_mode": True}}, ValueError, r"inference_mode=True, which hf-distill sets itself"),
        ({"peft": {"peft_type": "IA3"}}, ValueError, r"peft.peft_type='IA3': hf-distill trains LoRA students only"),
        ({"peft": {"task_type": "SEQ_2_SEQ_LM"}}, ValueError, r"peft.task_type='SEQ_2_SEQ_LM' is not one"),
        (
            {"peft": "r=8"},
            ValueError,
            r"peft must be a mapping of LoRA settings, got the text 'r=8', which is not JSON",
        ),
        ({"peft": [8]}, ValueError, r"peft must be a mapping of LoRA settings \(LoraConfig fields\), got \[8\]"),
        ({"save_merged": True}, ValueError, r"save_merged=True merges a LoRA adapter into the student, but peft is"),
    ],
)
def test_bad_peft_fields_are_refused_when_parsed(fields, error, match):
    with pytest.raises(error, match=match):
        ModelArguments(teacher_model_name_or_path="t", **fields)


def test_shipped_lora_recipe_parses_to_a_peft_mapping():
    recipe = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3", "lora_kd.yaml")
    args = parse_distill_args(["--config", recipe, "--output_dir", "x"])
    assert args.model.peft == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["query", "key", "value"],
    }
    assert args.model.save_merged is False


def test_peft_on_the_command_line_is_json():
    args = ModelArguments(peft='{"r": 2, "target_modules": ["query"]}')
    assert args.peft == {"r": 2, "target_modules": ["query"]}


@pytest.mark.parametrize(
    "make,settings,match",
    [
        (bert, {"target_modules": ["query", "qkv"]}, r"peft.target_modules names \['qkv'\], which match no module.*"
         r"linear layers are named \[.*'query'"),
        (bert, {"target_modules": "nothing.*"}, r"peft.target_modules='nothing.\*' \(a regular expression"),
        (bert, {"modules_to_save": ["head"]}, r"peft.modules_to_save names \['head'\], which match no module.*"
         r"\['classifier'\]"),
        (bert, {"task_type": "CAUSAL_LM"}, r"peft.task_type='CAUSAL_LM', but the student .* has a SEQ_CLS head"),
        (lambda: bert(BertForMaskedLM), {}, r"the student is a BertForMaskedLM, whose head PEFT's LoRA wrappers"),
        (tiny_distilbert, {}, r"peft.target_modules is unset and PEFT has no default target modules for model type "
         r"'distilbert'. List them: the student's linear layers are named \['k_lin', 'lin1', 'lin2', 'out_lin', "
         r"'q_lin', 'v_lin'\]"),
    ],
    ids=["unknown-target", "regex-target", "unknown-modules-to-save", "task-type", "masked-lm", "no-default-targets"],
)  # fmt: skip
def test_lora_settings_that_do_not_fit_the_student_are_refused(make, settings, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(make(), settings)


def test_missing_peft_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"peft is set, but the peft package is not installed.*pip install"):
        ModelArguments(peft={"r": 4})


def test_adapter_push_and_sharded_engines_are_refused():
    with pytest.raises(
        ValueError, match=r"push_to_hub=True with a LoRA student saved as an adapter.*save_merged=true"
    ):
        check_peft_run(ModelArguments(peft={"r": 4}), push=True)
    check_peft_run(ModelArguments(peft={"r": 4}, save_merged=True), push=True)
    fsdp = SimpleNamespace(model=apply_lora(bert(), LORA), is_fsdp_enabled=True)
    with pytest.raises(ValueError, match=r"peft is set \(a LoRA student\) and the run uses FSDP"):
        check_peft_trainer(fsdp)
    check_peft_trainer(SimpleNamespace(model=bert(), is_fsdp_enabled=True))  # not a LoRA student: not ours to refuse


def adapter_args(root, adapter="adapter", base="base"):
    return ModelArguments(
        teacher_model_name_or_path=str(root / base), teacher_adapter_name_or_path=str(root / adapter)
    )


def test_bad_teacher_adapters_are_refused_before_the_teacher_loads(tmp_path, tiny_tokenizer):
    save_teacher_with_adapter(tmp_path, tiny_tokenizer)
    bert(num_layers=2, hidden=32, seed=5).save_pretrained(tmp_path / "other")
    tiny_tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"was trained on the base model '.*base' \(base_model_name_or_path in its "
                       r"adapter_config.json\), but teacher_model_name_or_path='.*other'"):  # fmt: skip
        load_teacher(adapter_args(tmp_path, base="other"), num_labels=2)
    with pytest.raises(FileNotFoundError, match=r"teacher_adapter_name_or_path='.*missing' does not exist"):
        load_teacher(adapter_args(tmp_path, adapter="missing"), num_labels=2)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json: it is not a PEFT adapter"):
        load_teacher(adapter_args(tmp_path, adapter="other"), num_labels=2)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model.safetensors, and hf-distill loads safetensors"):
        load_teacher(adapter_args(tmp_path, adapter="pickled"), num_labels=2)


def test_teacher_adapters_of_another_task_or_shape_are_refused(tmp_path, tiny_tokenizer):
    save_teacher_with_adapter(tmp_path, tiny_tokenizer)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    with pytest.raises(ValueError, match=r"is a CAUSAL_LM adapter \(task_type in its adapter_config.json\), but the "
                       r"teacher \(BertForSequenceClassification\) has a SEQ_CLS head"):  # fmt: skip
        load_teacher(adapter_args(tmp_path), num_labels=2)
    config_path.write_text(json.dumps(config))
    # The same adapter on a narrower base of the same name: its weights do not fit.
    bert(num_layers=2, hidden=16).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"does not fit the teacher"):
        load_teacher(adapter_args(tmp_path), num_labels=2)
