"""hf_distill.chain and scripts/chain.py: teacher-assistant chains and born-again generations on tiny models."""

import copy
import glob
import importlib.util
import json
import os

import pytest
import torch
import yaml
from conftest import tiny_bert_config, write_tiny_tsv
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, Trainer

import hf_distill.chain as chain_module
from hf_distill import run_chain
from hf_distill.benchmark_stages import STAGE_FILE
from hf_distill.chain import CHAIN_FILE, load_chain_config, plan_chain
from hf_distill.trainer import DistillationTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "recipes", "*", "chains", "*.yaml")))
HIDDEN = {"hidden_weight": 1.0, "hidden_loss": "cosine", "layer_mapping": "alternate"}
RECIPE = {"task_weight": 0.5, "logits_weight": 0.5, "temperature": 2.0, "learning_rate": 1e-3, "warmup_steps": 0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A 4-layer teacher with its tokenizer, 32 training rows (4 steps at batch 8), 16 dev rows and a KD recipe."""
    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32)).save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    g = torch.Generator().manual_seed(0)
    write_tiny_tsv(root / "train.tsv", 32, g)
    write_tiny_tsv(root / "dev.tsv", 16, g)
    (root / "kd.yaml").write_text(yaml.safe_dump(RECIPE))
    return root


def chain_config(root, out, **changes) -> dict:
    """A 4 -> 2 -> 1 layer chain, 4 steps per stage, a checkpoint every 2 steps."""
    recipe = str(root / "kd.yaml")
    config = {
        "name": "tiny",
        "output_dir": str(out),
        "teacher_model_name_or_path": str(root / "teacher"),
        "train_file": str(root / "train.tsv"),
        "validation_file": str(root / "dev.tsv"),
        "max_length": 16,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_steps": 2,
        "eval_batch_size": 16,
        "stages": [
            {"name": "ta2", "num_layers": 2, "recipe": recipe, "max_steps": 4},
            {"name": "s1", "num_layers": 1, "recipe": recipe, "max_steps": 4, "overrides": {"learning_rate": 5e-4}},
        ],
    }
    config.update(changes)
    return config


def write_config(path, config) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def run(path, config):
    return run_chain(load_chain_config(write_config(path, config)))


def stage_mtimes(out):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "**", STAGE_FILE), recursive=True)}


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def finished(workdir):
    """The chain run once, uninterrupted, recording the teacher each DistillationTrainer was given."""
    teachers = []

    class Recording(DistillationTrainer):
        def __init__(self, *args, teacher_model=None, **kwargs):
            teachers.append({k: v.detach().clone() for k, v in teacher_model.state_dict().items()})
            super().__init__(*args, teacher_model=teacher_model, **kwargs)

    out = workdir / "out_a"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chain_module, "DistillationTrainer", Recording)
        results = run(workdir / "a.yaml", chain_config(workdir, out))
    return out, results, teachers


# ---------------------------------------------------------------------------------------------------- end to end
def test_chain_runs_end_to_end(workdir, finished):
    out, results, _ = finished
    assert [r["name"] for r in results["stages"]] == ["ta2", "s1"]
    assert [(r["teacher_layers"], r["num_layers"]) for r in results["stages"]] == [(4, 2), (2, 1)]
    assert [r["layers"] for r in results["stages"]] == [[0, 3], [1]]  # first and last kept; one layer: the top one
    assert [r["original_teacher_layers"] for r in results["stages"]] == [[0, 3], [3]]
    assert [r["teacher"] for r in results["stages"]] == ["teacher", "stage1-ta2"]
    assert [r["steps"] for r in results["stages"]] == [4, 4]
    assert [r["status"] for r in results["stages"]] == ["trained", "trained"]
    assert results["stages"][0]["params"] > results["stages"][1]["params"] > 0
    assert results["teacher"]["params"] > results["stages"][0]["params"]
    for row in [results["teacher"], *results["stages"]]:
        assert 0 <= row["accuracy"] <= 1
    assert json.loads((out / CHAIN_FILE).read_text())["stages"] == json.loads(json.dumps(results["stages"]))
    for folder in ("stage1-ta2", "stage2-s1"):
        # A plain transformers model with its tokenizer; the checkpoints are gone once the stage finished.
        model = BertForSequenceClassification.from_pretrained(out / folder)
        assert model.config.num_hidden_layers == {"stage1-ta2": 2, "stage2-s1": 1}[folder]
        assert (out / folder / "tokenizer.json").is_file() or (out / folder / "vocab.txt").is_file()
        assert not (out / f"{folder}.checkpoints").exists() and not (out / f"{folder}.tmp").exists()
        assert json.loads((out / "eval" / folder / "metrics.json").read_text())["accuracy"] >= 0
        history = json.loads((out / folder / "log_history.json").read_text())
        assert {"loss_task", "loss_logits"} <= set().union(*history)


def test_each_stage_is_taught_by_the_previous_stages_saved_student(workdir, finished):
    out, _, teachers = finished
    assert len(teachers) == 2
    for taught, source in ((teachers[0], workdir / "teacher"), (teachers[1], out / "stage1-ta2")):
        saved = weights(source)
        assert set(saved) <= set(taught)
        for name, tensor in saved.items():
            assert torch.equal(taught[name], tensor), name
    # ...and the stage-1 student is not the chain's teacher (it was trained, and is shallower).
    assert len(teachers[1]) < len(teachers[0])


def test_rerun_reuses_every_stage_through_the_script(workdir, finished):
    out, results, _ = finished
    spec = importlib.util.spec_from_file_location("chain_script", os.path.join(REPO, "scripts", "chain.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mtimes = stage_mtimes(out)
    assert len(mtimes) == 5  # two stages, three evaluations
    again = script.main(["--config", str(workdir / "a.yaml"), "--set", "logging_steps=2"])  # not in any spec
    assert {s["status"] for s in again["runs"]} == {"reused"}
    assert stage_mtimes(out) == mtimes  # nothing retrained, nothing rewritten
    assert [r["accuracy"] for r in again["stages"]] == [r["accuracy"] for r in results["stages"]]


@pytest.mark.parametrize(
    "stage, change, differing",
    [
        (1, {"overrides": {"learning_rate": 2e-4}}, "training"),
        (0, {"num_layers": 3}, "layers"),
    ],
)
def test_a_changed_stage_is_refused(workdir, finished, stage, change, differing):
    out, _, _ = finished
    config = chain_config(workdir, out)
    config["stages"][stage].update(change)
    mtimes = stage_mtimes(out)
    with pytest.raises(
        ValueError, match=rf"stage{stage + 1}-\w+ was made with other settings \(differing: .*{differing}"
    ):
        run(workdir / "changed.yaml", config)
    assert stage_mtimes(out) == mtimes


def test_an_interrupted_stage_resumes_to_the_uninterrupted_weights(workdir, finished, monkeypatch):
    out_a = finished[0]
    out = workdir / "out_b"
    config = chain_config(workdir, out)
    # Stage 1 makes 4 training steps; stage 2 is interrupted during its step 3, after its checkpoint at step 2.
    original_step, calls = Trainer.training_step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("simulated interruption")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run(workdir / "b.yaml", config)
    monkeypatch.setattr(Trainer, "training_step", original_step)
    assert (out / "stage1-ta2" / STAGE_FILE).is_file()
    assert not (out / "stage2-s1").exists()
    assert (out / "stage2-s1.checkpoints" / "checkpoint-2").is_dir()

    # The checkpoints of stage 2 belong to its settings: another stage 2 does not resume from them.
    other = copy.deepcopy(config)
    other["stages"][1]["overrides"] = {"learning_rate": 2e-4}
    with pytest.raises(ValueError, match=r"stage2-s1.checkpoints holds checkpoints of other settings"):
        run(workdir / "other.yaml", other)

    results = run(workdir / "b.yaml", config)
    assert [r["status"] for r in results["stages"]] == ["reused", "resumed"]
    assert results["stages"][1]["steps"] == 4
    assert not (out / "stage2-s1.checkpoints").exists()
    for folder in ("stage1-ta2", "stage2-s1"):
        resumed, uninterrupted = weights(out / folder), weights(out_a / folder)
        assert set(resumed) == set(uninterrupted)
        for name in resumed:
            assert torch.equal(resumed[name], uninterrupted[name]), (folder, name)


def test_born_again_generations(workdir):
    """Two generations of the teacher's own depth: one from the current teacher's layers, one re-initialised."""
    recipe = str(workdir / "kd.yaml")
    config = chain_config(
        workdir,
        workdir / "out_ban",
        validation_file=None,  # no eval split: nothing evaluated
        stages=[
            {"name": "gen1", "recipe": recipe, "max_steps": 1, "overrides": HIDDEN},
            {"name": "gen2", "recipe": recipe, "max_steps": 1, "init": "scratch"},
        ],
    )
    results = run(workdir / "ban.yaml", config)
    first, second = results["stages"]
    assert (first["num_layers"], first["layers"], first["original_teacher_layers"]) == (4, [0, 1, 2, 3], [0, 1, 2, 3])
    assert (second["num_layers"], second["layers"], second["original_teacher_layers"]) == (4, None, None)
    assert first["params"] == second["params"] == results["stages"][0]["params"]
    assert first["accuracy"] is None and "accuracy" not in results["teacher"]
    history = json.loads((workdir / "out_ban" / "stage1-gen1" / "log_history.json").read_text())
    assert "loss_hidden" in set().union(*history)  # a stage's overrides switch a term on for that stage alone
    gen2 = BertForSequenceClassification.from_pretrained(workdir / "out_ban" / "stage2-gen2")
    assert not hasattr(gen2.config, "distillation_teacher_layers")  # nothing was copied into it
    assert not (workdir / "out_ban" / "eval").exists()


# ---------------------------------------------------------------------------------------------------- refusals
def _stage(workdir, **kw):
    return {"recipe": str(workdir / "kd.yaml"), **kw}


# (case id, function of workdir -> config changes, regex of the error)
BAD_CONFIGS = [
    ("deeper than the chain's teacher", lambda w: {"stages": [_stage(w, num_layers=5)]},
     r"stages\[0\] \(kd\): num_layers=5 asks for 5 layers but the chain's teacher has 4: a student cannot be deeper"),
    ("deeper than its stage teacher", lambda w: {"stages": [_stage(w, num_layers=2), _stage(w, num_layers=3)]},
     r"stages\[1\] \(kd\): num_layers=3 asks for 3 layers but its teacher, stage 1's student, has 2"),
    ("layers deeper than the teacher", lambda w: {"stages": [_stage(w, num_layers=2), _stage(w, layers=[0, 1, 1])]},
     r"stages\[1\] \(kd\): layers=\[0, 1, 1\] asks for 3 layers but its teacher, stage 1's student, has 2"),
    ("layer out of range", lambda w: {"stages": [_stage(w, layers="0,4")]},
     r"stages\[0\] \(kd\): layers=\[0, 4\] contains \[4\], outside the teacher's layers: valid indices are 0..3"),
    ("bad layers", lambda w: {"stages": [_stage(w, layers="0,two")]}, r"stages\[0\].layers must list teacher layer"),
    ("empty chain", lambda w: {"stages": []}, r"stages must list at least one stage, got \[\]"),
    ("stage not a mapping", lambda w: {"stages": ["kd.yaml"]}, r"stages\[0\] must be a mapping of"),
    ("unknown key", lambda w: {"temprature": 2.0}, r"unknown key\(s\) \['temprature'\] in chain config"),
    ("unknown stage key", lambda w: {"stages": [_stage(w, num_layer=2)]},
     r"unknown key\(s\) in stages\[0\]: 'num_layer' \(did you mean 'num_layers'\?\)"),
    ("unknown override", lambda w: {"stages": [_stage(w, overrides={"temprature": 2.0})]},
     r"unknown key\(s\) in stages\[0\].overrides: 'temprature' \(did you mean 'temperature'\?\)"),
    ("owned override", lambda w: {"stages": [_stage(w, overrides={"max_steps": 3})]},
     r"stages\[0\].overrides sets \['max_steps'\], which the chain sets.*Use stages\[0\].max_steps"),
    ("bad override value", lambda w: {"stages": [_stage(w, overrides={"temperature": 0})]},
     r"stages\[0\] \(.*kd.yaml \+ overrides\): temperature must be > 0, got 0"),
    ("teacher cache", lambda w: {"stages": [_stage(w, overrides={"use_teacher_cache": True})]},
     r"stages\[0\] \(.*\) sets use_teacher_cache: a chain does not cache its teachers"),
    ("unknown init", lambda w: {"stages": [_stage(w, init="random")]},
     r"stages\[0\].init must be one of \['teacher_layers', 'scratch'\], got 'random'"),
    ("scratch with layers", lambda w: {"stages": [_stage(w, init="scratch", layers=[0, 1])]},
     r"stages\[0\].layers=\[0, 1\] picks teacher layers to copy, but init: scratch copies nothing"),
    ("no recipe", lambda w: {"stages": [{"num_layers": 2}]}, r"stages\[0\].recipe is required"),
    ("missing recipe", lambda w: {"stages": [{"recipe": str(w / "nope.yaml")}]},
     r"stages\[0\].recipe=.*nope.yaml' does not exist"),
    ("bad name", lambda w: {"stages": [_stage(w, name="a/b")]}, r"stages\[0\].name='a/b' must be a folder name"),
    ("bad max_steps", lambda w: {"stages": [_stage(w, max_steps=0)]},
     r"stages\[0\].max_steps must be an integer >= 1"),
    ("no teacher", lambda w: {"teacher_model_name_or_path": None}, r"teacher_model_name_or_path is required"),
    ("missing teacher", lambda w: {"teacher_model_name_or_path": str(w / "no" / "such" / "teacher")},
     r"teacher_model_name_or_path=.*teacher' does not exist"),
]  # fmt: skip


@pytest.mark.parametrize("changes, message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_before_any_training(workdir, tmp_path, monkeypatch, changes, message):
    def no_training(*args, **kwargs):
        raise AssertionError("a bad config reached training")

    monkeypatch.setattr(chain_module, "train_with_resume", no_training)
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(tmp_path / "bad.yaml", chain_config(workdir, out, **changes(workdir)))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, REPO) for p in SHIPPED])
def test_shipped_chain_configs_load_and_plan(path):
    config = load_chain_config(path)
    plans = plan_chain(config, config.source_root, teacher_depth=12)  # all-mpnet-base-v2: 12 layers
    assert plans[0].teacher_depth == 12
    assert all(p.num_layers <= p.teacher_depth for p in plans)
    assert all(not os.path.isabs(s.recipe) for s in config.stages)  # no machine paths in the repository


def test_shipped_ta_chain_is_12_6_3():
    (path,) = [p for p in SHIPPED if os.path.basename(p) == "ta_chain_12-6-3.yaml"]
    config = load_chain_config(path)
    plans = plan_chain(config, config.source_root, teacher_depth=12)
    assert [(p.teacher_depth, p.num_layers) for p in plans] == [(12, 6), (6, 3)]
    assert plans[0].original_layers == [0, 2, 4, 7, 9, 11]  # DistilBERT's alternating layers
    assert plans[1].original_layers == [0, 7, 11]
