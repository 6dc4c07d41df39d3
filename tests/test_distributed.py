"""Teacher placement under each distributed engine (hf_distill.placement).

Fast tests fake the accelerator state for each engine. The slow tests run this file as a 2-process worker under
`torchrun` (gloo, CPU): FSDP2 shards the teacher with a real `FullyShardedDataParallelPlugin` (accelerate has no
FSDP on CPU, so the sharding function is called directly), and DeepSpeed ZeRO-3 runs a whole `DistillationTrainer`
whose teacher was loaded partitioned by `from_pretrained` (skipped when deepspeed is not installed).

    torchrun --nproc_per_node 2 tests/test_distributed.py {fsdp2,zero3} OUT_DIR
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from transformers import BertForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_bert_config  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.features import forward_with_features  # noqa: E402
from hf_distill.placement import (  # noqa: E402
    DEEPSPEED_ZERO3,
    DEVICE,
    FSDP1,
    FSDP2,
    deepspeed_teacher_config,
    prepare_teacher,
    teacher_placement,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_accelerator(distributed_type: DistributedType, *, zero_stage: int = 0, fsdp_version: int = 2, **plugin):
    state = SimpleNamespace(distributed_type=distributed_type)
    if distributed_type == DistributedType.DEEPSPEED:
        state.deepspeed_plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config={})
    if distributed_type == DistributedType.FSDP:
        state.fsdp_plugin = SimpleNamespace(fsdp_version=fsdp_version, **plugin)
    return SimpleNamespace(state=state, device=torch.device("cpu"), num_processes=1)


# ---------------------------------------------------------------------------------------------------- fast: decisions
@pytest.mark.parametrize(
    "distributed_type, kwargs, expected",
    [
        (DistributedType.NO, {}, DEVICE),
        (DistributedType.MULTI_CPU, {}, DEVICE),
        (DistributedType.MULTI_GPU, {}, DEVICE),
        (DistributedType.DEEPSPEED, {"zero_stage": 1}, DEVICE),
        (DistributedType.DEEPSPEED, {"zero_stage": 2}, DEVICE),
        (DistributedType.DEEPSPEED, {"zero_stage": 3}, DEEPSPEED_ZERO3),
        (DistributedType.FSDP, {"fsdp_version": 1}, FSDP1),
        (DistributedType.FSDP, {"fsdp_version": 2}, FSDP2),
    ],
)
def test_teacher_placement_per_engine(distributed_type, kwargs, expected):
    assert teacher_placement(fake_accelerator(distributed_type, **kwargs)) == expected


@pytest.mark.parametrize(
    "distributed_type, kwargs",
    [(DistributedType.NO, {}), (DistributedType.MULTI_CPU, {}), (DistributedType.DEEPSPEED, {"zero_stage": 2})],
)
def test_replicated_teacher_is_moved_frozen_and_never_wrapped(tiny_teacher, distributed_type, kwargs):
    tiny_teacher.train().requires_grad_(True)
    args = SimpleNamespace(device=torch.device("cpu"), use_teacher_cache=False)
    placed = prepare_teacher(tiny_teacher, fake_accelerator(distributed_type, **kwargs), args)
    assert placed is tiny_teacher  # the same object: not DDP-wrapped, not an engine
    assert not placed.training and not any(p.requires_grad for p in placed.parameters())
    assert {p.device for p in placed.parameters()} == {torch.device("cpu")}


def test_fsdp1_teacher_is_a_replicated_copy(tiny_teacher):
    args = SimpleNamespace(device=torch.device("cpu"), use_teacher_cache=False)
    before = copy.deepcopy(tiny_teacher.state_dict())
    accelerator = fake_accelerator(DistributedType.FSDP, fsdp_version=1, cpu_ram_efficient_loading=True)
    placed = prepare_teacher(tiny_teacher, accelerator, args)  # one process: the broadcast is a no-op
    assert placed is tiny_teacher and type(placed) is BertForSequenceClassification
    assert all(torch.equal(before[k], v) for k, v in placed.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"zero_stage": 3}, {"fsdp_version": 2}])
def test_sharded_teacher_refuses_the_teacher_cache(tiny_teacher, kwargs):
    engine = DistributedType.DEEPSPEED if "zero_stage" in kwargs else DistributedType.FSDP
    args = SimpleNamespace(device=torch.device("cpu"), use_teacher_cache=True)
    with pytest.raises(ValueError, match="use_teacher_cache=True cannot be used with the teacher sharded") as err:
        prepare_teacher(tiny_teacher, fake_accelerator(engine, **kwargs), args)
    assert "use_teacher_cache=False" in str(err.value)


def test_trainer_places_the_teacher_with_prepare_teacher(tiny_teacher, tiny_student, tmp_path):
    tiny_teacher.train()
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = DistillationTrainer(model=tiny_student, teacher_model=tiny_teacher, args=args)
    assert trainer.teacher is tiny_teacher and not isinstance(
        trainer.teacher, torch.nn.parallel.DistributedDataParallel
    )
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())


# ------------------------------------------------------------------------------------------------ fast: ZeRO-3 config
STUDENT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 4,
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "none"},
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": 1000,  # explicit: kept
    },
}


def test_deepspeed_teacher_config_is_an_inference_copy_of_the_students():
    student = copy.deepcopy(STUDENT_DS_CONFIG)
    args = SimpleNamespace(
        per_device_train_batch_size=8, gradient_accumulation_steps=4, max_grad_norm=1.0, bf16=True, fp16=False
    )
    config = deepspeed_teacher_config(student, args, hidden_size=384, world_size=2)
    assert student == STUDENT_DS_CONFIG  # the student's config is not touched
    assert "optimizer" not in config and "scheduler" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero and zero["offload_param"] == {"device": "none"}
    assert zero["reduce_bucket_size"] == 384 * 384
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 384 * 384)
    assert zero["stage3_param_persistence_threshold"] == 1000
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["train_batch_size"] == 8 * 4 * 2
    assert config["gradient_clipping"] == 1.0 and config["bf16"] == {"enabled": True}


def test_deepspeed_teacher_config_names_an_unresolvable_auto():
    student = {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}, "train_micro_batch_size_per_gpu": 2}
    args = SimpleNamespace(
        per_device_train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0, bf16=False, fp16=False
    )
    with pytest.raises(ValueError, match=r"\['zero_optimization.sub_group_size'\]"):
        deepspeed_teacher_config(student, args, hidden_size=32)


# ------------------------------------------------------------------------------------------------ slow: 2 processes
def run_workers(case: str, out_dir, extra_env: dict | None = None) -> list[dict]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.abspath(__file__), case, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_fsdp2_shards_the_teacher_and_features_match(tmp_path):
    results = run_workers("fsdp2", tmp_path)
    for r in results:
        assert r["sharded"] and r["local_numel"] * 2 == pytest.approx(r["full_numel"], rel=0.05)
        assert r["max_diff"] == 0.0  # logits, hidden states and attention maps of the sharded teacher
        assert r["loss_diff"] < 1e-6  # the trainer's compute_loss with the sharded teacher
        assert r["plugin_restored"] and r["broadcast_diff"] == 0.0


@pytest.mark.slow
def test_zero3_partitioned_teacher_trains(tmp_path):
    pytest.importorskip("deepspeed")
    results = run_workers("zero3", tmp_path, {"DS_ACCELERATOR": "cpu"})
    for r in results:
        assert r["partitioned_at_load"] and r["local_numel"] * 2 == pytest.approx(r["full_numel"], rel=0.05)
        assert r["max_diff"] == 0.0 and r["steps"] == 2 and all(map(lambda x: x == x, r["losses"]))
        assert r["teacher_unchanged"]


# ---------------------------------------------------------------------------------------------------- the workers
def _tiny_pair():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32)).eval()
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=32))
    return teacher, student


def _batch(n: int = 4, length: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(5, 64, (n, length), generator=g), "attention_mask": mask}


def _features_diff(model, reference, batch) -> float:
    with torch.no_grad():
        a = forward_with_features(model, batch, hidden_layers=[1, 3], attention_layers=[1, 3], embeddings=True)
        b = forward_with_features(reference, batch, hidden_layers=[1, 3], attention_layers=[1, 3], embeddings=True)
    diffs = [(a.outputs.logits - b.outputs.logits).abs().max(), (a.embeddings - b.embeddings).abs().max()]
    diffs += [(a.hidden_states[i] - b.hidden_states[i]).abs().max() for i in (1, 3)]
    diffs += [(a.attentions[i] - b.attentions[i]).abs().max() for i in (1, 3)]
    return float(max(diffs))


def _dataset(n: int = 32):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_list(
        [{"input_ids": torch.randint(5, 64, (8,), generator=g).tolist(), "labels": i % 2} for i in range(n)]
    )


def _worker_fsdp2(out_dir: str, rank: int) -> dict:
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from hf_distill.placement import broadcast_from_main_process

    terms = dict(hidden_weight=1.0, attention_weight=1.0, embeddings_weight=1.0, layer_mapping="uniform")
    args = DistillationConfig(output_dir=out_dir, use_cpu=True, ddp_backend="gloo", report_to=[], **terms)
    teacher, student = _tiny_pair()
    reference = copy.deepcopy(teacher)
    if rank != 0:  # as with cpu_ram_efficient_loading: only the main process has the real weights
        with torch.no_grad():
            for p in teacher.parameters():
                p.normal_()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True
    )
    saved = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin),
        device=torch.device("cpu"), mixed_precision="no", is_main_process=rank == 0, torch_device_mesh=None,
        num_processes=2,
    )  # fmt: skip
    sharded = prepare_teacher(teacher, accelerator, SimpleNamespace(device=args.device, use_teacher_cache=False))
    assert sharded is teacher and isinstance(teacher, FSDPModule)
    params = list(teacher.parameters())
    batch = _batch()

    # The trainer's own loss with the sharded teacher equals the loss with the unsharded reference.
    trainer = DistillationTrainer(model=student, teacher_model=copy.deepcopy(reference), args=args)
    inputs = {**batch, "labels": torch.tensor([0, 1, 0, 1])}
    trainer.model.eval()  # no dropout: the two losses see the same student
    with torch.no_grad():
        live = trainer.compute_loss(trainer.model, inputs)
        trainer.teacher = sharded
        with_sharded = trainer.compute_loss(trainer.model, inputs)

    other = BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32))
    if rank == 0:
        other.load_state_dict(reference.state_dict())
    broadcast_from_main_process(other, "cpu")
    return {
        "sharded": all(isinstance(p, DTensor) for p in params),
        "local_numel": sum(p.to_local().numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
        "max_diff": _features_diff(sharded, reference, batch),
        "loss_diff": float((live - with_sharded).abs()),
        "plugin_restored": (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap) == saved,
        "broadcast_diff": float(max((a - b).abs().max() for a, b in zip(other.parameters(), reference.parameters()))),
    }


def _worker_zero3(out_dir: str, rank: int) -> dict:
    from transformers import DataCollatorWithPadding  # noqa: F401 (the collator below pads nothing: equal lengths)

    teacher, student = _tiny_pair()
    reference = copy.deepcopy(teacher)
    teacher_dir = os.path.join(out_dir, f"teacher{rank}")
    teacher.save_pretrained(teacher_dir)
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
    }  # fmt: skip
    args = DistillationConfig(
        output_dir=out_dir, use_cpu=True, ddp_backend="gloo", deepspeed=ds_config, report_to=[], max_steps=2,
        per_device_train_batch_size=4, logging_steps=1, save_strategy="no", hidden_weight=1.0, attention_weight=1.0,
        layer_mapping="uniform",
    )  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # as `accelerate launch` does with a DeepSpeed config
    # With ZeRO-3 configured, from_pretrained loads the teacher partitioned (deepspeed.zero.Init).
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir)
    partitioned_at_load = all(hasattr(p, "ds_id") for p in teacher.parameters())

    def collate(rows):
        return {
            "input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_dataset(), data_collator=collate
    )
    batch = _batch()
    params = list(trainer.teacher.parameters())
    local, full = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    before = _features_diff(trainer.teacher, reference, batch)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "partitioned_at_load": partitioned_at_load,
        "local_numel": local,
        "full_numel": full,
        "max_diff": before,
        "teacher_unchanged": _features_diff(trainer.teacher, reference, batch) == 0.0,
        "steps": trainer.state.global_step,
        "losses": losses,
    }


def test_benchmarks_md_parity_table_is_the_committed_result():
    """BENCHMARKS.md's parity rows are read from benchmarks/ddp_parity.json (written by benchmarks/ddp_parity.py)."""
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = json.loads((repo / "benchmarks" / "ddp_parity.json").read_text(encoding="utf-8"))
    text = (repo / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert f"**{100 * result['teacher']['dev_accuracy']:.2f}%**" in text
    for label, pair, runs in (
        ("live teacher: 1 process vs 2", "no_cache", ("1proc", "2proc")),
        ("teacher cache on: 1 process vs 2", "cache", ("1proc_cache", "2proc_cache")),
    ):
        c = result["comparisons"][pair]
        assert c["within_tolerance"]
        one, two = (100 * result["runs"][r]["eval_accuracy"] for r in runs)

        def sci(x: float) -> str:
            return f"{x:.1e}".replace("e-0", "e-")

        row = (
            f"| {label} | {sci(c['loss_max_abs_diff'])} | {sci(c['loss_max_rel_diff'])} | "
            f"{sci(c['loss_task_max_abs_diff'])} / {sci(c['loss_logits_max_abs_diff'])} | "
            f"{one:.2f} vs {two:.2f} ({c['accuracy_diff_points']:.2f} points) |"
        )
        assert row in text, row


if __name__ == "__main__":
    case, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    result = {"fsdp2": _worker_fsdp2, "zero3": _worker_zero3}[case](out, rank)
    tmp = os.path.join(out, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))
