"""End-to-end runs of scripts/distill.py: one process under `accelerate launch`, two under `torchrun` (gloo)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import script_env, tiny_bert_config, write_tiny_tsv
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill import ModelArguments, check_max_length, load_or_make_student, load_teacher, models, parse_distill_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "bert-base-sst2_to_bert-6l", "distilbert.yaml")
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A tiny fine-tuned-looking teacher, a narrower student and small train/dev TSV files on disk."""
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **NO_DROPOUT))
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, **NO_DROPOUT))
    student.save_pretrained(root / "narrow_student")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("dev", 24)):
        write_tiny_tsv(root / f"{split}.tsv", n, g)
    return root


def load_script():
    """scripts/distill.py as a module, to run its `main(argv)` in this process (faster than a subprocess)."""
    spec = importlib.util.spec_from_file_location("distill_script", os.path.join(REPO, "scripts", "distill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(root, out, *extra):
    return [
        "--config",
        RECIPE,
        "--teacher_model_name_or_path",
        str(root / "teacher"),
        "--train_file",
        str(root / "train.tsv"),
        "--validation_file",
        str(root / "dev.tsv"),
        "--max_length",
        "16",
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_steps",
        "3",
        "--use_cpu",
        "true",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def train_losses(out) -> list[float]:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_distill_script_end_to_end(workdir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, "recipes", "accelerate_configs", "cpu.yaml"),
        os.path.join(REPO, "scripts", "distill.py"),
        *overrides(workdir, out, "--student_num_layers", "2"),
    ]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    student_dir = out / "student"
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    assert not (out / "student.tmp").exists()
    card = (student_dir / "README.md").read_text()
    assert "Accuracy kept" in card and str(workdir / "teacher") in card
    assert not any(name.startswith("projections") for name in os.listdir(student_dir))
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())
    assert len(train_losses(out)) == 3


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(workdir, tmp_path):
    """torchrun with 2 CPU processes (gloo) trains like one process with the same global batch, projections too."""
    extra = [
        "--student_model_name_or_path",
        str(workdir / "narrow_student"),
        "--attention_weight",
        "1.0",
        "--embeddings_weight",
        "1.0",
        "--seed",
        "0",
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "distill.py"), *overrides(workdir, single, *extra)],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            os.path.join(REPO, "scripts", "distill.py"),
            *overrides(workdir, double, *extra, "--per_device_train_batch_size", "4", "--ddp_backend", "gloo"),
        ],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (double / "checkpoint-3" / "projections.pt").is_file()
    one, two = train_losses(single), train_losses(double)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-3), (one, two)


# ---------------------------------------------------------------------------------------------- loading the models
def distilbert_student(path, num_labels: int = 2) -> DistilBertForSequenceClassification:
    torch.manual_seed(2)
    config = DistilBertConfig(
        vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=64, num_labels=num_labels
    )
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(path)
    return model


def test_given_student_is_loaded_with_its_own_class(tiny_teacher, tmp_path):
    """Defect 6: a saved DistilBERT student of a BERT teacher used to come back as a random BERT."""
    saved = distilbert_student(tmp_path / "distil")
    student = load_or_make_student(ModelArguments(student_model_name_or_path=str(tmp_path / "distil")), tiny_teacher)
    assert type(student) is DistilBertForSequenceClassification and student.config.n_layers == 2
    for name, tensor in saved.state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor), name


def test_given_student_without_a_head_gets_one_with_the_teachers_classes(tiny_teacher, tmp_path):
    distilbert_student(tmp_path / "tmp")
    DistilBertModel.from_pretrained(tmp_path / "tmp").save_pretrained(tmp_path / "bare")
    teacher = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    student = load_or_make_student(ModelArguments(student_model_name_or_path=str(tmp_path / "bare")), teacher)
    assert type(student) is DistilBertForSequenceClassification and student.config.num_labels == 3


def test_given_student_with_other_classes_than_the_teacher_is_refused(tiny_teacher, tmp_path):
    distilbert_student(tmp_path / "distil3", num_labels=3)
    with pytest.raises(ValueError, match=r"student's trained head has 3 classes but the teacher's has 2"):
        load_or_make_student(ModelArguments(student_model_name_or_path=str(tmp_path / "distil3")), tiny_teacher)


def test_teacher_head_with_another_class_count_is_refused(tiny_teacher, tmp_path):
    """Defect 9: the head used to be re-initialised (bare checkpoint) or fail with a RuntimeError (trained head)."""
    tiny_teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"teacher's trained head has 2 classes but the data has 3.*fine-tuned on"):
        load_teacher(ModelArguments(teacher_model_name_or_path=str(tmp_path / "teacher")), num_labels=3)


def test_bare_encoder_teacher_gets_a_fresh_head_and_a_warning(tmp_path, tiny_tokenizer, caplog):
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bare")
    tiny_tokenizer.save_pretrained(tmp_path / "bare")
    with caplog.at_level("WARNING", logger="hf_distill.models"):
        teacher, _ = load_teacher(ModelArguments(teacher_model_name_or_path=str(tmp_path / "bare")), num_labels=3)
    assert teacher.config.num_labels == 3
    assert "has no trained classification head" in caplog.text


def test_pickled_weights_are_not_loaded(tiny_teacher, tmp_path):
    """Safety: teacher and student load from safetensors only (a pickle can run code when loaded)."""
    path = tmp_path / "pickled"
    tiny_teacher.config.save_pretrained(path)
    torch.save(tiny_teacher.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="has no safetensors weights"):
        load_teacher(ModelArguments(teacher_model_name_or_path=str(path)))
    with pytest.raises(FileNotFoundError, match="student_model_name_or_path=.* has no safetensors weights"):
        load_or_make_student(ModelArguments(student_model_name_or_path=str(path)), tiny_teacher)


@pytest.mark.parametrize("trust", [False, True])
def test_every_load_passes_trust_remote_code_and_safetensors(
    tiny_teacher, tiny_tokenizer, tmp_path, monkeypatch, trust
):
    tiny_teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    tiny_teacher.save_pretrained(tmp_path / "student")
    calls = []

    def spy(cls):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, **kwargs):
            calls.append((cls.__name__, kwargs))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    for cls in (models.AutoConfig, models.AutoModelForSequenceClassification, models.AutoTokenizer):
        spy(cls)
    args = ModelArguments(
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        student_model_name_or_path=str(tmp_path / "student"),
        trust_remote_code=trust,
    )
    teacher, _ = load_teacher(args, num_labels=2)
    load_or_make_student(args, teacher)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForSequenceClassification", "AutoTokenizer"}
    for name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is trust, name
        if name.startswith("AutoModel"):
            assert kwargs.get("use_safetensors") is True


def test_max_length_beyond_the_position_embeddings_is_refused(tiny_teacher, tiny_student):
    check_max_length(64, teacher=tiny_teacher, student=tiny_student)
    with pytest.raises(ValueError, match=r"max_length=65 is longer than the teacher \(bert\).*Use max_length <= 64"):
        check_max_length(65, teacher=tiny_teacher, student=tiny_student)
    roberta = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=66,
            pad_token_id=1,
        )
    )
    # RoBERTa's positions start after the padding index: 66 - (1 + 1) tokens fit.
    check_max_length(64, student=roberta)
    with pytest.raises(ValueError, match=r"max_length=65 is longer than the student \(roberta\).*<= 64"):
        check_max_length(65, student=roberta)


# ---------------------------------------------------------------------------------------------- the command line
def test_misspelt_flag_is_refused_with_the_closest_valid_one():
    """Defect 9: today HfArgumentParser says 'Some specified arguments are not used' without a hint."""
    with pytest.raises(ValueError, match=r"'--learning_rat' \(did you mean '--learning_rate'\?\)"):
        parse_distill_args(["--config", RECIPE, "--learning_rat", "1e-3", "--output_dir", "x"])
    with pytest.raises(ValueError, match=r"'--temp' \(did you mean '--temperature'\?\)"):
        parse_distill_args(["--temp", "3", "--output_dir", "x"])  # prefixes are not silently expanded either


def test_misspelt_flag_is_refused_before_anything_is_loaded(tmp_path):
    distill = load_script()
    with pytest.raises(ValueError, match="did you mean '--student_num_layers'"):
        distill.main(
            [
                "--teacher_model_name_or_path",
                str(tmp_path / "missing"),
                "--student_num_layer",
                "2",
                "--train_file",
                str(tmp_path / "missing.tsv"),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert not (tmp_path / "out").exists()


def test_command_line_student_layers_replace_the_recipes_depth(caplog):
    """Defect 9: --student_layers 0,3 against the recipe's student_num_layers: 6 used to reach make_student as both."""
    with caplog.at_level("WARNING", logger="hf_distill.cli"):
        args = parse_distill_args(["--config", RECIPE, "--student_layers", "0,3", "--output_dir", "x"])
    assert args.model.student_layers == "0,3" and args.model.student_num_layers is None
    assert "--student_layers given on the command line replaces the recipe's student_num_layers=6" in caplog.text


@pytest.mark.parametrize(
    "model_fields,match",
    [
        (
            {"student_layers": "0,3", "student_num_layers": 3},
            r"student_layers='0,3' picks 2 teacher layers but "
            r"student_num_layers=3 asks for 3.*set student_num_layers=2",
        ),
        (
            {"student_model_name_or_path": "s", "student_num_layers": 3},
            r"student_model_name_or_path='s' loads an "
            r"existing student, but student_num_layers=3 asks to build one",
        ),
        ({"student_layers": "0,x"}, r"student_layers must be comma-separated teacher layer indices.*'0,x'"),
        ({"student_num_layers": 0}, r"student_num_layers must be >= 1, got 0"),
    ],
)
def test_conflicting_model_fields_in_one_place_are_refused(tmp_path, model_fields, match):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"teacher_model_name_or_path": "t", "output_dir": "x", **model_fields}))
    with pytest.raises(ValueError, match=match):
        parse_distill_args(["--config", str(recipe)])  # in a recipe
    flags = [item for key, value in model_fields.items() for item in (f"--{key}", str(value))]
    with pytest.raises(ValueError, match=match):
        parse_distill_args(["--output_dir", "x", *flags])  # on the command line


def test_resume_and_overwrite_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"resume must be one of \('auto', 'never'\), got 'yes'"):
        parse_distill_args(["--output_dir", "x", "--resume", "yes"])
    args = parse_distill_args(["--output_dir", "x", "--resume", "never", "--overwrite_output_dir", "true"])
    assert args.run.resume == "never" and args.run.overwrite_output_dir is True


def test_script_trains_a_distilbert_student_of_a_bert_teacher(workdir, tmp_path):
    """Defect 6 end to end: the script keeps the given DistilBERT student's class, depth and trained weights."""
    distilbert_student(tmp_path / "distil")
    out = tmp_path / "run"
    distill = load_script()
    argv = overrides(
        workdir,
        out,
        "--student_model_name_or_path",
        str(tmp_path / "distil"),
        "--max_steps",
        "2",
        "--save_steps",
        "2",
        "--hidden_weight",
        "0",
    )
    argv.remove("--validation_file")
    argv.remove(str(workdir / "dev.tsv"))
    distill.main(argv)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert type(student) is DistilBertForSequenceClassification and student.config.n_layers == 2
    assert not torch.equal(
        student.distilbert.embeddings.word_embeddings.weight,
        DistilBertForSequenceClassification.from_pretrained(
            tmp_path / "distil"
        ).distilbert.embeddings.word_embeddings.weight,
    )


def test_script_refuses_max_length_beyond_the_models(workdir, tmp_path):
    distill = load_script()
    argv = overrides(workdir, tmp_path / "run", "--student_num_layers", "2")
    argv[argv.index("--max_length") + 1] = "100"
    with pytest.raises(ValueError, match=r"max_length=100 is longer than the teacher \(bert\).*<= 64"):
        distill.main(argv)
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "run").iterdir())
