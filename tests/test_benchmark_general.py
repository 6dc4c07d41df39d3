"""General (task-agnostic) distillation in the benchmark: a student from the pre-trained model's layers, its body
distilled from the pre-trained body on the training text (features only), then fine-tuned like every other row."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config
from transformers import AutoModelForSequenceClassification, BertModel, set_seed

from hf_distill import benchmark
from hf_distill.benchmark import BenchmarkConfig, fingerprint
from hf_distill.benchmark_general import general_training_args
from hf_distill.student import get_layers

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
RECIPES = REPO / "recipes" / "minilm-sst2_to_minilm-l3"
GENERAL = REPO / "recipes" / "minilm_to_minilm-l3-general" / "general_distillation.yaml"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_tokenizer):
    """A tiny pre-trained encoder without a task head (like a sentence-transformers checkpoint)."""
    path = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(num_layers=4, hidden=32)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def general_config(out: Path, pretrained: Path, **overrides) -> BenchmarkConfig:
    values = dict(
        name="tiny_general", output_dir=str(out), teacher_model_name_or_path=str(pretrained),
        teacher_learning_rate=1e-3, train_file=str(SST2 / "train.tsv"), validation_file=str(SST2 / "dev.tsv"),
        max_length=32, max_train_samples=48, max_eval_samples=32, unlabelled_from_train=True,
        max_unlabelled_samples=32, student_num_layers=2, logging_steps=1, save_steps=50,
        baseline_recipe=str(RECIPES / "no_kd.yaml"),
        rows={"vanilla_kd": [str(RECIPES / "vanilla_kd.yaml")], "general_no_kd": [str(RECIPES / "no_kd.yaml")]},
        labelled_only_rows=["general_no_kd"], student_init_from="pretrained", general_recipe=str(GENERAL),
        general_steps=3, general_rows=["general_no_kd"],
    )  # fmt: skip
    return BenchmarkConfig(**{**values, **overrides})


def body_state(model) -> dict[str, torch.Tensor]:
    base = getattr(model, model.base_model_prefix, model)
    return {k: v.clone() for k, v in base.state_dict().items()}


def test_general_rows_start_from_the_generally_distilled_body(tmp_path, pretrained):
    out = tmp_path / "bench"
    config = general_config(out, pretrained)
    results = benchmark.run_benchmark(config, root=REPO)
    rows = {r["name"]: r for r in results["rows"]}

    # student_init/: the pre-trained layers 0 and 3, without a head, with the task's classes.
    init = BertModel.from_pretrained(out / "student_init")
    base = BertModel.from_pretrained(pretrained)
    assert init.config.distillation_teacher_layers == [0, 3] and init.config.num_labels == 2
    for s, t in zip(get_layers(init), [get_layers(base)[0], get_layers(base)[3]]):
        for (name, a), (_, b) in zip(s.state_dict().items(), t.state_dict().items()):
            assert torch.equal(a, b), name

    # general/: trained for general_steps on features alone (no task or logit term), and changed the body.
    history = json.loads((out / "general" / benchmark.LOG_HISTORY_FILE).read_text())
    logged = {k for entry in history for k in entry}
    assert {"loss_hidden", "loss_attention"} <= logged and not {"loss_task", "loss_logits"} & logged
    assert max(entry.get("step", 0) for entry in history) == 3
    general = BertModel.from_pretrained(out / "general")
    changed = [k for k, v in body_state(general).items() if not torch.equal(v, body_state(init)[k])]
    assert any("encoder.layer" in k for k in changed)

    # A row of general_rows starts from general/, the others from student_init/; the fresh classification heads
    # of the two starts are the same draw (same seed), so they differ by the general stage alone.
    def stage(row):
        recipe = row.split("general_")[-1]
        return json.loads((out / "rows" / row / f"1-{recipe}" / benchmark.STAGE_FILE).read_text())

    general_spec = json.loads((out / "general" / benchmark.STAGE_FILE).read_text())["spec"]
    init_spec = json.loads((out / "student_init" / benchmark.STAGE_FILE).read_text())["spec"]
    assert stage("general_no_kd")["spec"]["start"] == fingerprint(general_spec)
    assert stage("no_kd")["spec"]["start"] == stage("vanilla_kd")["spec"]["start"] == fingerprint(init_spec)
    heads = []
    for start in ("student_init", "general"):
        set_seed(config.seed)
        heads.append(AutoModelForSequenceClassification.from_pretrained(out / start).classifier.weight)
    assert torch.equal(*heads)

    # The record says which rows started from the general stage, and its budget.
    assert rows["general_no_kd"]["general_steps"] == 3 and "general_steps" not in rows["no_kd"]
    assert results["budget"]["student_init_from"] == "pretrained" and results["budget"]["general_rows"] == [
        "general_no_kd"
    ]
    assert rows["general_no_kd"]["train_steps"] == rows["no_kd"]["train_steps"]  # the same fine-tuning budget

    # A rerun reuses every finished stage, the general one included.
    again = benchmark.run_benchmark(config, root=REPO)
    assert {s["status"] for s in again["stages"]} == {"reused"}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(student_init_from="scratch"),
         r"student_init_from must be one of \['teacher', 'pretrained'\], got 'scratch'"),
        (dict(student_init_from="teacher"),
         r"general_recipe=.* student_init_from='teacher' .*Set student_init_from: pretrained"),
        (dict(general_steps=None), r"general_steps must be a number of optimizer steps >= 1 .*got None"),
        (dict(general_steps=0), r"general_steps must be .*got 0"),
        (dict(general_rows=[]), r"general_rows must list the student rows .*got \[\]"),
        (dict(general_rows=["no_kd"]), r"general_rows must list .*got \['no_kd'\].*baseline 'no_kd'"),
        (dict(general_recipe=None), r"general_steps=3 without general_recipe"),
    ],
    ids=["init-source", "init-from-teacher", "steps-missing", "steps-zero", "rows-empty", "rows-baseline",
         "no-recipe"],
)  # fmt: skip
def test_general_keys_are_checked(tmp_path, pretrained, overrides, match):
    with pytest.raises(ValueError, match=match):
        general_config(tmp_path, pretrained, **overrides)


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"hidden_weight": 1.0, "logits_weight": 0.5}, r"sets logits_weight=0.5, .*no logits term"),
        ({"hidden_weight": 1.0, "task_weight": 1.0}, r"sets task_weight=1.0, .*no task term"),
        ({"hidden_weight": 0.0}, r"has no term: set one of hidden_weight, attention_weight, embeddings_weight"),
    ],
)
def test_a_general_recipe_trains_features_only(recipe, match):
    with pytest.raises(ValueError, match=match):
        general_training_args(recipe, "general.yaml")
    assert general_training_args({"attention_weight": 1.0}, "g.yaml") == {
        "attention_weight": 1.0,
        "task_weight": 0.0,
        "logits_weight": 0.0,
    }


def test_a_headless_student_has_no_task_loss(tmp_path, pretrained):
    """A bare body (no head) trains on feature terms only: task_weight > 0 is refused before any step."""
    from hf_distill import DistillationConfig, DistillationTrainer

    body = BertModel.from_pretrained(pretrained)
    args = DistillationConfig(output_dir=str(tmp_path), task_weight=0.5, logits_weight=0.0, hidden_weight=1.0)
    with pytest.raises(ValueError, match=r"task_weight=0.5 needs a student with a head, got BertModel.*task_weight=0"):
        DistillationTrainer(model=body, teacher_model=BertModel.from_pretrained(pretrained), args=args)
