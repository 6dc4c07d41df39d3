"""Paths (issue 7, defect 13): recipes resolve their relative paths against the repository holding them (or their own
folder), never against the working directory; command-line values stay as typed; no path of one machine is shipped."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, script_env, tiny_bert_config
from transformers import BertForSequenceClassification, HfArgumentParser

from hf_distill import DataArguments, ModelArguments, load_benchmark_config, load_recipe
from hf_distill.recipes import display_path, recipe_root

REPO = Path(__file__).resolve().parents[1]
MINILM_RECIPE = REPO / "recipes" / "minilm-sst2_to_minilm-l3" / "distilbert.yaml"
BERT_RECIPE = REPO / "recipes" / "bert-base-sst2_to_bert-6l" / "distilbert.yaml"
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_shipped_recipe_paths_resolve_against_the_repository_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(os.path.relpath(MINILM_RECIPE))
    assert recipe["train_file"] == str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv")
    assert recipe["validation_file"] == str(REPO.parent / "shared" / "data" / "sst2" / "dev.tsv")
    assert recipe["output_dir"] == str(REPO / "outputs" / "minilm-sst2_to_minilm-l3" / "distilbert")
    assert recipe["teacher_model_name_or_path"] == str(REPO / "outputs" / "benchmarks" / "sst2_minilm_l3" / "teacher")
    assert recipe["student_num_layers"] == 3 and recipe["temperature"] == 2.0  # other values untouched


def test_hub_ids_in_a_recipe_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(BERT_RECIPE)
    assert recipe["teacher_model_name_or_path"] == "textattack/bert-base-uncased-SST-2"
    assert recipe["dataset_name"] == "glue"
    assert recipe["output_dir"] == str(REPO / "outputs" / "bert-base-sst2_to_bert-6l" / "distilbert")


@pytest.mark.parametrize("marker", ["pyproject.toml", ".git", None])
def test_recipe_root_is_the_nearest_repository_else_the_recipe_folder(tmp_path, monkeypatch, marker):
    project = tmp_path / "project"
    (project / "recipes" / "x").mkdir(parents=True)
    if marker == ".git":
        (project / ".git").mkdir()
    elif marker:
        (project / marker).write_text("")
    (project / "models" / "teacher").mkdir(parents=True)
    path = project / "recipes" / "x" / "kd.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "train_file": "data/train.tsv",
                "validation_file": "/abs/dev.tsv",
                "output_dir": "outputs/run",
                "teacher_cache_dir": "~/caches",
                "teacher_model_name_or_path": "models/teacher",  # one '/', but a local directory of the repository
                "student_model_name_or_path": "org/student",  # a Hub id: no such local path
                "tokenizer_name_or_path": "./tok",
                "teacher_adapter_name_or_path": "./adapters/teacher",  # a local PEFT adapter
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    root = project if marker else project / "recipes" / "x"
    assert recipe_root(path) == root
    recipe = load_recipe(path)
    assert recipe["train_file"] == str(root / "data" / "train.tsv")
    assert recipe["validation_file"] == "/abs/dev.tsv"
    assert recipe["output_dir"] == str(root / "outputs" / "run")
    assert recipe["teacher_cache_dir"] == os.path.expanduser("~/caches")
    expected_teacher = str(project / "models" / "teacher") if marker else "models/teacher"  # not under recipes/x
    assert recipe["teacher_model_name_or_path"] == expected_teacher
    assert recipe["student_model_name_or_path"] == "org/student"
    assert recipe["tokenizer_name_or_path"] == str(root / "tok")
    assert recipe["teacher_adapter_name_or_path"] == str(root / "adapters" / "teacher")


def test_command_line_paths_stay_relative_to_the_cwd(tmp_path, monkeypatch):
    """As scripts/distill.py parses: the recipe gives the parser's defaults, the command line overrides them."""
    monkeypatch.chdir(tmp_path)
    parser = HfArgumentParser((ModelArguments, DataArguments))
    parser.set_defaults(train_file=load_recipe(MINILM_RECIPE)["train_file"])
    _, data = parser.parse_args_into_dataclasses(args=["--validation_file", "mine/dev.tsv"])
    assert data.validation_file == "mine/dev.tsv"  # as typed, relative to where the user is
    assert data.train_file == str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv")  # from the recipe


def test_display_path_is_repository_relative():
    assert display_path(str(MINILM_RECIPE), REPO) == "recipes/minilm-sst2_to_minilm-l3/distilbert.yaml"
    assert display_path(str(REPO.parent / "shared" / "x.tsv"), REPO) == "../shared/x.tsv"
    assert display_path("/somewhere/else/x.tsv", REPO) == "/somewhere/else/x.tsv"
    assert display_path("org/model", REPO) == "org/model"


@pytest.mark.slow
def test_distill_script_run_from_another_cwd_uses_the_recipes_files(tmp_path, tiny_tokenizer):
    """The recipe's relative train/dev files, teacher and output_dir are those next to the recipe, not in the cwd."""
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=32, **NO_DROPOUT)).save_pretrained(
        project / "models" / "tiny" / "teacher"
    )
    tiny_tokenizer.save_pretrained(project / "models" / "tiny" / "teacher")
    (project / "data").mkdir()
    for split in ("train", "dev"):
        rows = ["sentence\tlabel"] + [f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}\t{i % 2}" for i in range(16)]
        (project / "data" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    recipe = yaml.safe_load(BERT_RECIPE.read_text())
    recipe.pop("dataset_name"), recipe.pop("dataset_config")
    recipe.update(
        teacher_model_name_or_path="models/tiny/teacher",
        student_num_layers=1,
        train_file="data/train.tsv",
        validation_file="data/dev.tsv",
        output_dir="outputs/run",
        max_length=16,
        max_steps=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        eval_strategy="no",
        save_strategy="no",
        warmup_steps=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    (project / "recipes" / "kd.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = script_env()
    cmd = [sys.executable, str(REPO / "scripts" / "distill.py"), "--config", "../project/recipes/kd.yaml"]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (project / "outputs" / "run" / "student" / "model.safetensors").is_file()
    assert os.listdir(elsewhere) == []  # nothing written where the command was run
    card = (project / "outputs" / "run" / "student" / "README.md").read_text()
    assert "`recipes/kd.yaml`" in card and "`data/train.tsv`" in card


# ---------------------------------------------------------------------------------------------------- benchmarks
def test_benchmark_config_paths_resolve_against_its_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_benchmark_config(os.path.relpath(REPO / "benchmarks" / "sst2_minilm_l3.yaml"))
    assert config.train_file == "../shared/data/sst2/train.tsv"  # kept as written: stage fingerprints use it
    assert Path(config.source_root) == REPO


def test_benchmark_command_line_paths_stay_relative_to_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_benchmark_config(REPO / "benchmarks" / "sst2_minilm_l3.yaml", {"output_dir": "quick"})
    assert config.output_dir == str(tmp_path / "quick")


def load_bench_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", REPO / "scripts" / "bench_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_speed_finds_shared_data_relative_to_the_repository(tmp_path):
    source = (REPO / "scripts" / "bench_speed.py").read_text()
    # No absolute path in a string literal (the old script named the shared data by this machine's path), and not the
    # folder this checkout lies in, whatever it is called.
    assert not re.findall(r"[\"']/[A-Za-z]\w*/", source)
    assert str(REPO.parent) not in source
    bench = load_bench_speed()
    args = bench.parse_args([])
    assert Path(args.shared_dir) == REPO.parent / "shared"
    assert Path(bench.sst2_train_file(args)) == REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
    assert Path(args.cache_dir) == REPO / "outputs" / "bench_speed" / "teacher_cache"
    args = bench.parse_args(["--shared-dir", str(tmp_path)])
    assert Path(bench.sst2_train_file(args)) == tmp_path / "data" / "sst2" / "train.tsv"


def test_benchmarks_md_holds_no_absolute_path_of_this_machine():
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert not re.findall(r"(?<![\w.])/(?:work|home|tmp|root|Users|mnt)/\S*", text)
