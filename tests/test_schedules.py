"""Schedules (hf_distill.schedules): values against the formulas, parsing and refusals, applied before each step's
loss, and a resumed run sees the values of the uninterrupted one."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS, tiny_bert_config
from datasets import Dataset
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.schedules import TermSchedule, TermSchedules, parse_schedule, parse_schedules

# (schedule, max_steps, {step: value}) from the module docstring's formulas, computed by hand.
VALUES = [
    (TermSchedule("temperature", 4.0, 1.0), 10, {0: 4.0, 5: 2.5, 10: 1.0, 12: 1.0}),
    (
        TermSchedule("temperature", 4.0, 1.0, kind="cosine"),
        10,
        {0: 4.0, 5: 2.5, 10: 1.0, 2: 1 + 3 * (1 + math.cos(0.2 * math.pi)) / 2},
    ),
    (TermSchedule("logits_weight", 1.0, 0.0, end_step=4), 10, {0: 1.0, 1: 0.75, 4: 0.0, 9: 0.0}),
    (TermSchedule("hidden_weight", 2.0, start_step=3), 10, {0: 0.0, 2: 0.0, 3: 2.0, 9: 2.0}),
    (TermSchedule("relation_weight", 0.0, 8.0, start_step=2, end_step=6), 10, {1: 0.0, 2: 0.0, 4: 4.0, 6: 8.0}),
    (TermSchedule("temperature", 3.0, 1.0, start_step=5), 15, {0: 3.0, 4: 3.0, 5: 3.0, 10: 2.0, 15: 1.0}),
    (TermSchedule("attention_weight", 1.0, 3.0, kind="cosine", start_step=2, end_step=4), None, {3: 2.0, 4: 3.0}),
]


@pytest.mark.parametrize("schedule, max_steps, expected", VALUES)
def test_values_follow_the_formulas(schedule, max_steps, expected):
    for step, value in expected.items():
        assert schedule.value(step, max_steps) == pytest.approx(value), step


def test_callback_sets_the_field_from_the_global_step():
    args = SimpleNamespace(temperature=2.0, hidden_weight=1.0)
    callback = TermSchedules([TermSchedule("temperature", 4.0, 1.0), TermSchedule("hidden_weight", 1.0, start_step=2)])
    for step, temperature, weight in ((0, 4.0, 0.0), (1, 3.0, 0.0), (3, 1.0, 1.0)):
        callback.on_step_begin(args, SimpleNamespace(global_step=step, max_steps=3), None)
        assert (args.temperature, args.hidden_weight) == (pytest.approx(temperature), weight)


def test_entries_parse_from_mappings_and_strings():
    assert parse_schedule("field=temperature start=4 end=1 kind=cosine end_step=100") == TermSchedule(
        "temperature", 4.0, 1.0, kind="cosine", end_step=100
    )
    assert parse_schedule({"field": "relation_weight", "start": 25, "start_step": 100}) == TermSchedule(
        "relation_weight", 25.0, 25.0, start_step=100
    )
    assert parse_schedule("field=hidden_weight, start=1, end=0") == TermSchedule("hidden_weight", 1.0, 0.0)


def config(**kw):
    return DistillationConfig(**{"output_dir": "unused", "report_to": "none", "use_cpu": True, **kw})


REFUSALS = [
    ("unknown key", ["field=temperature start=4 stop=1"], r"schedules: entry .* unknown keys \['stop'\]"),
    ("no start", [{"field": "temperature", "end": 1.0}], r"lacks field/start"),
    ("not key=value", ["temperature 4 -> 1"], r"schedules: could not read 'temperature 4 -> 1'; write key=value"),
    ("bad number", ["field=temperature start=four"], r"schedules: could not read the numbers of"),
    ("unknown kind", ["field=temperature start=4 end=1 kind=step"], r"kind must be one of \('linear', 'cosine'\)"),
    ("not a term", ["field=learning_rate start=1"], r"field must be 'temperature' or a loss weight"),
    ("no such weight", ["field=foo_weight start=1"], r"DistillationConfig has no field 'foo_weight'"),
    ("temperature 0", ["field=temperature start=4 end=0"], r"temperature end must be > 0, got 0\.0"),
    ("negative weight", ["field=logits_weight start=-1"], r"logits_weight start must be >= 0, got -1\.0"),
    ("end before start", ["field=temperature start=4 start_step=5 end_step=5"], r"end_step must be an int > start_"),
    ("twice", ["field=temperature start=4", "field=temperature start=3"], r"\['temperature'\] scheduled more than"),
    ("weight off", ["field=hidden_weight start=1"], r"hidden_weight is scheduled but hidden_weight=0.*Set hidden_"),
]


@pytest.mark.parametrize("case, schedules, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field(case, schedules, message):
    with pytest.raises(ValueError, match=message):
        config(schedules=schedules)


def test_temperature_schedule_is_refused_on_a_top_k_tail_cache():
    with pytest.raises(ValueError, match=r"temperature is scheduled, but teacher_cache_top_k_tail=True"):
        config(schedules=["field=temperature start=4 end=1"], teacher_cache_top_k=4, teacher_cache_top_k_tail=True)


def test_parse_schedules_without_a_config_only_parses():
    assert parse_schedules(["field=hidden_weight start=1"]) == [TermSchedule("hidden_weight", 1.0)]


# --------------------------------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------------------------------


class RecordingTrainer(DistillationTrainer):
    """Records, at every training micro-batch, the step and the values the loss is computed with."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append((self.state.global_step, self.args.temperature, self.args.logits_weight))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run(tmp_path, tokenizer, resume=None):
    texts = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(16)]
    data = Dataset.from_dict({**tokenizer(texts), "labels": [i % 2 for i in range(16)]})
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16))
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16))
    args = config(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        save_steps=2,
        seed=0,
        schedules=[
            "field=temperature start=4 end=1 kind=cosine",
            {"field": "logits_weight", "start": 0.5, "end": 1.5, "start_step": 1},
        ],
    )
    trainer = RecordingTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer.seen


def test_values_are_set_before_each_steps_loss_and_a_resume_sees_the_same(tmp_path, tiny_tokenizer):
    seen = run(tmp_path, tiny_tokenizer)
    temperature = TermSchedule("temperature", 4.0, 1.0, kind="cosine")
    weight = TermSchedule("logits_weight", 0.5, 1.5, start_step=1)
    expected = [(s, temperature.value(s, 4), weight.value(s, 4)) for s in range(4) for _ in range(2)]
    assert [(s, pytest.approx(t), pytest.approx(w)) for s, t, w in expected] == seen
    resumed = run(tmp_path, tiny_tokenizer, resume=str(tmp_path / "checkpoint-2"))
    assert resumed == seen[4:]
