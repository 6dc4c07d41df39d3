"""The benchmark's chain rows (hf_distill.benchmark_chains): a teacher-assistant chain and born-again generations as
rows of a tiny benchmark on the real SST-2 files, each stage taught by the previous stage's saved model."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import tiny_bert_config
from safetensors.torch import load_file
from transformers import AutoConfig, BertForSequenceClassification, Trainer

import hf_distill.benchmark as benchmark_module
import hf_distill.benchmark_chains as chains_module
from hf_distill.benchmark import STAGE_FILE, Benchmark, load_benchmark_config, run_benchmark
from hf_distill.losses import kl_div_loss
from hf_distill.trainer import DistillationTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2"))
RECIPES = os.path.join(REPO, "recipes", "minilm-sst2_to_minilm-l3")
KD = os.path.join(RECIPES, "vanilla_kd.yaml")
BENCHMARK = os.path.join(REPO, "benchmarks", "sst2_minilm_l3.yaml")
CHAINS = {
    "ta_chain": [{"recipe": KD, "num_layers": 3}, KD],  # 4 -> 3 -> 2 layers
    "born_again": [KD, KD],  # two generations of the 2-layer student
}
needs_sst2 = pytest.mark.skipif(not os.path.isfile(os.path.join(SST2, "train.tsv")), reason="SST-2 files not found")


def end_to_end(test):
    """A test over tiny benchmark runs (about 15 s each on one thread) on the real SST-2 files."""
    return pytest.mark.slow(needs_sst2(test))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A 4-layer classifier without dropout (so the logged training loss can be recomputed exactly), its head scaled
    up so that its models' logits, hence the KD losses of different teachers, differ clearly."""
    folder = tmp_path_factory.mktemp("chains") / "teacher"
    torch.manual_seed(0)
    config = tiny_bert_config(num_layers=4, hidden=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertForSequenceClassification(config)
    with torch.no_grad():
        teacher.classifier.weight.mul_(100.0)
    teacher.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def bench_config(teacher_dir, out, **changes):
    """32 labelled rows at batch 16: 2 steps per stage, a checkpoint and a log every step; a 2-layer student."""
    values = {
        "name": "tiny_chains",
        "output_dir": str(out),
        "teacher_model_name_or_path": str(teacher_dir),
        "teacher_hub_fallback": None,
        "finetune_teacher": False,
        "train_file": os.path.join(SST2, "train.tsv"),
        "validation_file": os.path.join(SST2, "dev.tsv"),
        "max_length": 24,
        "max_train_samples": 32,
        "unlabelled_from_train": False,
        "max_unlabelled_samples": None,
        "teacher_cache": True,
        "max_eval_samples": 40,
        "student_num_layers": 2,
        "per_device_train_batch_size": 16,
        "logging_steps": 1,
        "save_steps": 1,
        "baseline_recipe": os.path.join(RECIPES, "no_kd.yaml"),
        "rows": {"vanilla_kd": [KD]},
        "chain_rows": CHAINS,
        "results_file": None,
    }
    return load_benchmark_config(BENCHMARK, {**values, **changes})


class Recorded:
    """What each row or chain stage's DistillationTrainer was given: its output folder, teacher, initial student
    weights, and its first training batch."""

    def __init__(self):
        self.runs = []

    def trainer_class(self):
        runs = self.runs

        class Recording(DistillationTrainer):
            def __init__(self, *args, model=None, teacher_model=None, **kwargs):
                runs.append(
                    {
                        "output_dir": kwargs["args"].output_dir,
                        "teacher": {k: v.detach().clone() for k, v in teacher_model.state_dict().items()},
                        "student": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    }
                )
                super().__init__(*args, model=model, teacher_model=teacher_model, **kwargs)

            def compute_loss(self, model, inputs, *args, **kwargs):
                runs[-1].setdefault("first_batch", {k: v.detach().clone() for k, v in inputs.items()})
                return super().compute_loss(model, inputs, *args, **kwargs)

        return Recording

    def of(self, stage_dir) -> dict:
        """The run of the stage in `stage_dir` (its checkpoints are `<stage_dir>.checkpoints`)."""
        (run,) = [r for r in self.runs if r["output_dir"] == f"{stage_dir}.checkpoints"]
        return run


def run_recorded(config, recorded: Recorded | None = None):
    recorded = recorded or Recorded()
    with pytest.MonkeyPatch.context() as mp:
        trainer_class = recorded.trainer_class()
        mp.setattr(chains_module, "DistillationTrainer", trainer_class)
        mp.setattr(benchmark_module, "DistillationTrainer", trainer_class)
        return run_benchmark(config, REPO), recorded


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def stage_mtimes(out):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "**", STAGE_FILE), recursive=True)}


@pytest.fixture(scope="module")
def finished(teacher_dir):
    out = teacher_dir.parent / "out_a"
    results, recorded = run_recorded(bench_config(teacher_dir, out))
    return out, results, recorded


# ---------------------------------------------------------------------------------------------------- end to end
@end_to_end
def test_chain_rows_are_rows_of_the_table(finished):
    out, results, _ = finished
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "no_kd", "vanilla_kd", "ta_chain", "born_again"]
    row_steps = results["budget"]["steps_per_student_row"]
    assert row_steps == 2 and rows["vanilla_kd"]["train_steps"] == row_steps
    for name, depths in (("ta_chain", [3, 2]), ("born_again", [2, 2])):
        row = rows[name]
        # Every stage trains a whole row's steps, and the row's train steps are honestly their sum.
        assert [s["steps"] for s in row["stages"]] == [row_steps, row_steps]
        assert row["train_steps"] == 2 * row_steps
        assert [s["teacher"] for s in row["stages"]] == [
            "teacher",
            {"ta_chain": "1-vanilla_kd"}.get(name, "vanilla_kd"),
        ]
        assert [s["num_layers"] for s in row["stages"]] == depths
        assert row["recipes"] == ["vanilla_kd", "vanilla_kd"]
        # The row's model has the benchmark's student shape: the parameters of every other student row.
        assert row["params"] == rows["vanilla_kd"]["params"] < rows["teacher"]["params"]
        assert 0 <= row["accuracy"] <= 1 and row["latency_b1_ms"] > 0 and "delta_vs_baseline_pts" in row
        assert (out / "eval" / name / "metrics.json").is_file()
        history = json.loads((out / "rows" / name / "2-vanilla_kd" / "log_history.json").read_text())
        assert {"loss_task", "loss_logits"} <= set().union(*history)
    statuses = {os.path.relpath(s["path"], out): s["status"] for s in results["stages"]}
    for path in ("rows/ta_chain/1-vanilla_kd", "rows/ta_chain/2-vanilla_kd", "rows/born_again/2-vanilla_kd"):
        assert statuses[path] == "trained"
        assert not (out / f"{path}.checkpoints").exists()
    # Born-again's generation 1 is the vanilla_kd row's stage (the same recipe, start, teacher, rows, steps and seed),
    # trained once by that row and reused by the chain, its time counted in the chain row's too.
    gen1 = rows["born_again"]["stages"][0]
    assert gen1["shared_with"] == "vanilla_kd" and gen1["path"] == str(out / "rows" / "vanilla_kd" / "1-vanilla_kd")
    assert gen1["seconds"] == rows["vanilla_kd"]["stages"][0]["seconds"] and gen1["steps"] == row_steps
    assert not (out / "rows" / "born_again" / "1-vanilla_kd").exists()
    assert [s["status"] for s in results["stages"] if s["path"] == gen1["path"]] == ["trained", "reused"]
    assert "shared_with" not in rows["ta_chain"]["stages"][0]  # an assistant of its own depth: nothing to share
    assert results["budget"]["chain_stages"] == "every stage of a chain row trains a whole row's steps"
    table = (out / "results.md").read_text()
    assert "| ta_chain | vanilla_kd → vanilla_kd |" in table and "| born_again |" in table


@end_to_end
def test_each_stage_is_taught_by_the_previous_stages_saved_model(finished, teacher_dir):
    out, _, recorded = finished
    init = weights(out / "student_init")
    ta1, ta2 = out / "rows" / "ta_chain" / "1-vanilla_kd", out / "rows" / "ta_chain" / "2-vanilla_kd"
    # Stage 1: the benchmark's teacher teaches a 3-layer assistant of its alternating layers (first and last kept).
    assert_same_weights(recorded.of(ta1)["teacher"], weights(teacher_dir))
    assert AutoConfig.from_pretrained(ta1).distillation_teacher_layers == [0, 2, 3]
    assert len(recorded.of(ta1)["student"]) > len(init)
    # Stage 2: the assistant's saved model teaches a fresh student_init, the start of every row.
    assert_same_weights(recorded.of(ta2)["teacher"], weights(ta1))
    assert_same_weights(recorded.of(ta2)["student"], init)
    assert (
        AutoConfig.from_pretrained(ta2).num_hidden_layers
        == AutoConfig.from_pretrained(out / "student_init").num_hidden_layers
    )
    # Born-again: generation 1 is the vanilla KD row's model (trained once, by that row, from student_init and the
    # benchmark's teacher); generation 2 starts from student_init again and is taught by generation 1.
    gen1, gen2 = out / "rows" / "vanilla_kd" / "1-vanilla_kd", out / "rows" / "born_again" / "2-vanilla_kd"
    assert_same_weights(recorded.of(gen1)["teacher"], weights(teacher_dir))
    assert_same_weights(recorded.of(gen1)["student"], init)
    assert_same_weights(recorded.of(gen2)["teacher"], weights(gen1))
    assert_same_weights(recorded.of(gen2)["student"], init)


@end_to_end
def test_a_chain_stage_reads_its_own_teachers_outputs(finished):
    """With the teacher cache on, stage 2's logged logit loss is the one its live teacher (stage 1's model) gives:
    it never reads the benchmark teacher's cached outputs."""
    out, _, recorded = finished
    ta1, ta2 = out / "rows" / "ta_chain" / "1-vanilla_kd", out / "rows" / "ta_chain" / "2-vanilla_kd"
    batch = recorded.of(ta2)["first_batch"]
    assert any(k.startswith("teacher_cache_") for k in batch)  # the stage did read a cache
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        teacher_logits = BertForSequenceClassification.from_pretrained(ta1).eval()(**inputs).logits
        student_logits = BertForSequenceClassification.from_pretrained(out / "student_init").eval()(**inputs).logits
        wrong_logits = BertForSequenceClassification.from_pretrained(out.parent / "teacher").eval()(**inputs).logits
    live = kl_div_loss(student_logits, teacher_logits, temperature=2.0).item()
    wrong = kl_div_loss(student_logits, wrong_logits, temperature=2.0).item()
    history = json.loads((ta2 / "log_history.json").read_text())
    logged = next(h["loss_logits"] for h in history if "loss_logits" in h and h["step"] == 1)
    assert logged == pytest.approx(live, rel=1e-4, abs=1e-7)
    assert abs(wrong - live) > 1e-2 * live  # the benchmark teacher's outputs would have been noticed
    # One cache per distinct teacher: the benchmark's (vanilla KD, both stage 1s), the assistant, generation 1.
    caches = [p for p in (out / "teacher_cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(caches) == 3


@end_to_end
def test_a_rerun_reuses_every_stage(finished, teacher_dir):
    out, results, _ = finished
    mtimes = stage_mtimes(out)
    again, recorded = run_recorded(bench_config(teacher_dir, out))
    assert {s["status"] for s in again["stages"]} == {"reused"}
    assert recorded.runs == [] and stage_mtimes(out) == mtimes
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in results["rows"]]


@end_to_end
def test_a_changed_stage_1_retrains_stage_2(finished, teacher_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    other = tmp_path / "kd_other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(open(KD, encoding="utf-8")), "learning_rate": 5e-4}))
    chains = {**CHAINS, "ta_chain": [{"recipe": str(other), "num_layers": 3}, KD]}
    config = bench_config(teacher_dir, out, chain_rows=chains)
    # The new stage 1 trains; stage 2, made from the old one, is not silently reused.
    with pytest.raises(
        ValueError, match=r"2-vanilla_kd was made with other settings \(differing: \['teacher', 'teacher_files'\]\)"
    ):
        run_recorded(config)
    assert (out / "rows" / "ta_chain" / "1-kd_other" / STAGE_FILE).is_file()
    for path in ("rows/ta_chain/2-vanilla_kd", "eval/ta_chain", "eval/latency"):  # what the refusal says to delete
        shutil.rmtree(out / path)
    results, recorded = run_recorded(config)
    statuses = {os.path.relpath(s["path"], out): s["status"] for s in results["stages"]}
    assert statuses["rows/ta_chain/1-kd_other"] == "reused" and statuses["rows/ta_chain/2-vanilla_kd"] == "trained"
    assert statuses["rows/born_again/2-vanilla_kd"] == "reused"
    assert_same_weights(
        recorded.of(out / "rows" / "ta_chain" / "2-vanilla_kd")["teacher"],
        weights(out / "rows" / "ta_chain" / "1-kd_other"),
    )


@end_to_end
def test_an_interrupted_stage_resumes_to_the_uninterrupted_weights(finished, teacher_dir, tmp_path, monkeypatch):
    out_a, out = finished[0], tmp_path / "out"
    config = bench_config(teacher_dir, out, chain_rows={"ta_chain": CHAINS["ta_chain"]})
    # no_kd, vanilla_kd and the assistant make 2 steps each; stage 2 is interrupted in its step 2, after checkpoint-1.
    original_step, calls = Trainer.training_step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("simulated interruption")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run_recorded(config)
    monkeypatch.setattr(Trainer, "training_step", original_step)
    stage2 = out / "rows" / "ta_chain" / "2-vanilla_kd"
    assert (out / "rows" / "ta_chain" / "1-vanilla_kd" / STAGE_FILE).is_file() and not stage2.exists()
    assert (out / "rows" / "ta_chain" / "2-vanilla_kd.checkpoints" / "checkpoint-1").is_dir()

    results, _ = run_recorded(config)
    statuses = {os.path.relpath(s["path"], out): s["status"] for s in results["stages"]}
    assert statuses["rows/ta_chain/1-vanilla_kd"] == "reused" and statuses["rows/ta_chain/2-vanilla_kd"] == "resumed"
    assert {r["name"]: r for r in results["rows"]}["ta_chain"]["stages"][1]["steps"] == 2
    for stage in ("1-vanilla_kd", "2-vanilla_kd"):
        assert_same_weights(weights(out / "rows" / "ta_chain" / stage), weights(out_a / "rows" / "ta_chain" / stage))


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "chain_rows, message",
    [
        ([KD], r"chain_rows must map row names to lists of stages, got \["),
        ({"ta": []}, r"chain_rows.ta must list its stages in order, at least one, got \[\]"),
        ({"ta": KD}, r"chain_rows.ta must list its stages in order"),
        ({"vanilla_kd": [KD]}, r"chain row name 'vanilla_kd' is taken \(a row of rows\)"),
        ({"no_kd": [KD]}, r"chain row name 'no_kd' is taken \(the baseline\)"),
        ({"teacher": [KD]}, r"chain row name 'teacher' is taken \(the teacher's row\)"),
        ({"ta chain": [KD]}, r"chain row name 'ta chain' must be a plain folder name"),
        ({"ta": [5]}, r"chain_rows.ta\[0\] must be a recipe file or a mapping of \['recipe', 'num_layers'\], got 5"),
        ({"ta": [{"recipe": KD, "teacher": "previous"}]}, r"unknown key\(s\) in chain_rows.ta\[0\]: 'teacher'"),
        ({"ta": [{"recipe": KD, "num_layer": 3}, KD]}, r"'num_layer' \(did you mean 'num_layers'\?\)"),
        ({"ta": [{"num_layers": 3}, KD]}, r"chain_rows.ta\[0\].recipe is required"),
        ({"ta": [{"recipe": KD, "num_layers": 0}, KD]}, r"chain_rows.ta\[0\].num_layers must be an integer >= 1"),
        ({"ta": [{"recipe": KD, "num_layers": True}, KD]}, r"chain_rows.ta\[0\].num_layers must be an integer"),
        ({"ta": [KD, {"recipe": KD, "num_layers": 3}]}, r"chain_rows.ta\[1\].num_layers=3, but the last stage's"),
    ],
)
def test_bad_chain_rows_are_refused_by_the_config(chain_rows, message):
    with pytest.raises(ValueError, match=message):
        load_benchmark_config(BENCHMARK, {"chain_rows": chain_rows})


def test_chain_rows_can_be_seeded_and_labelled_only():
    config = load_benchmark_config(
        BENCHMARK, {"chain_rows": {"ta": [KD]}, "seed_rows": ["ta"], "labelled_only_rows": ["ta"]}
    )
    assert config.chain_rows == {"ta": [{"recipe": KD, "num_layers": None}]}


@pytest.mark.parametrize(
    "stages, changes, error, message",
    [
        (
            [{"recipe": KD, "num_layers": 5}, KD],
            {},
            ValueError,
            r"chain_rows.ta\[0\].num_layers=5, but its teacher, the benchmark's teacher, has 4 layers: a student "
            r"cannot be deeper than its teacher. Use num_layers <= 4.",
        ),
        (
            [{"recipe": KD, "num_layers": 1}, KD],
            {},
            ValueError,
            r"chain_rows.ta\[1\] distils the benchmark's 2-layer student \(student_init\) from the student of "
            r"chain_rows.ta\[0\], which has 1 layer: .* Give chain_rows.ta\[0\] num_layers >= 2",
        ),
        (
            [KD],
            {"student_num_layers": 5},
            ValueError,
            r"the benchmark's student \(5 layers\) is deeper than its teacher \(4\). Set student_num_layers <= 4.",
        ),
        (
            [{"recipe": "recipes/missing.yaml", "num_layers": 3}, KD],
            {},
            FileNotFoundError,
            r"chain_rows.ta\[0\].recipe='recipes/missing.yaml' does not exist \(looked in ",
        ),
        (
            ["MULTI", KD],
            {},
            ValueError,
            r"chain_rows.ta\[0\] \(.*multi.yaml\) sets teacher_weights=\[0.5, 0.5\], but a chain stage is taught",
        ),
        (
            [KD, os.path.join(RECIPES, "no_kd.yaml")],
            {"unlabelled_from_train": True, "max_unlabelled_samples": 16},
            ValueError,
            r"row 'ta', recipe .*no_kd.yaml: ",
        ),
        (
            [KD, "TEMPERATURE"],
            {},
            ValueError,
            r"chain_rows.ta\[1\] \(.*temperature.yaml\): temperature must be > 0",
        ),
    ],
)
def test_bad_chain_stages_are_refused_before_any_training(teacher_dir, tmp_path, stages, changes, error, message):
    recipe = yaml.safe_load(open(KD, encoding="utf-8"))
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump({**recipe, "teacher_weights": [0.5, 0.5]}))
    (tmp_path / "temperature.yaml").write_text(yaml.safe_dump({**recipe, "temperature": 0.0}))
    named = {"MULTI": str(tmp_path / "multi.yaml"), "TEMPERATURE": str(tmp_path / "temperature.yaml")}
    stages = [named.get(s, s) if isinstance(s, str) else s for s in stages]
    out = tmp_path / "out"
    config = bench_config(teacher_dir, out, chain_rows={"ta": stages}, **changes)
    with pytest.raises(error, match=message):
        Benchmark(config, REPO).check_chain_rows()
    with pytest.raises(error, match=message):
        run_benchmark(config, REPO)
    assert not out.exists()  # refused before any stage ran


SHIPPED = [
    p
    for p in sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.yaml")))
    if "chain_rows:" in open(p, encoding="utf-8").read()
]


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_every_shipped_chain_row_builds_its_training_arguments(path):
    """As test_benchmark.py's check of the plain rows: every stage of every shipped chain row gets a valid
    DistillationConfig as the benchmark builds it (recipe + teacher-cache arguments), and its depths fit."""
    config = load_benchmark_config(path)
    if config.teacher_model_name_or_path.startswith("package:"):
        pytest.importorskip(config.teacher_model_name_or_path[len("package:") :].partition("/")[0])
    assert config.chain_rows
    Benchmark(config, REPO).check_chain_rows()
    if os.path.basename(path) == "sst2_minilm_l3_methods.yaml":
        assert config.chain_rows == {
            "ta_chain": [
                {"recipe": os.path.relpath(KD, REPO), "num_layers": 4},
                {"recipe": os.path.relpath(KD, REPO), "num_layers": None},
            ],
            "born_again": [{"recipe": os.path.relpath(KD, REPO), "num_layers": None}] * 2,
        }
