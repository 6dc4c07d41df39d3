"""Our generalised JSD against TRL's (`GKDTrainer.generalized_jsd_loss`); benchmarks/trl_side_by_side.py, tiny.

Conventions compared like with like (see the script's docstring): the same beta (the teacher's weight), the same
reduction with labels (sum over labelled positions and the vocabulary / number of labelled positions, or / the given
``num_items_in_batch``), and ours divided by T², which TRL does not multiply by.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

from hf_distill.losses import generalized_jsd_loss  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "trl_side_by_side.py")
CASES = [(0.0, 1.0), (0.0, 2.0), (0.1, 1.0), (0.5, 1.0), (0.5, 2.0), (0.9, 0.5), (1.0, 1.0), (1.0, 3.0)]


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def logits_and_labels(seed: int = 0, shape=(3, 11), vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=g) * 3
    teacher = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.35] = -100  # prompt / padding positions
    assert 0 < (labels != -100).sum() < labels.numel()
    return student, teacher, labels


def with_grad(fn, logits):
    leaf = logits.clone().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("beta, temperature", CASES, ids=[f"beta{b}-T{t}" for b, t in CASES])
def test_generalized_jsd_equals_trl_on_labelled_positions(beta, temperature):
    student, teacher, labels = logits_and_labels()
    theirs = with_grad(
        lambda s: GKDTrainer.generalized_jsd_loss(s, teacher, labels, beta=beta, temperature=temperature), student
    )
    ours = with_grad(
        lambda s: (
            generalized_jsd_loss(s, teacher, labels != -100, temperature=temperature, beta=beta) / temperature**2
        ),
        student,
    )
    assert theirs[0] > 0
    assert rel_diff(ours[0], theirs[0]) <= 1e-5
    assert rel_diff(ours[1], theirs[1]) <= 1e-5


def test_generalized_jsd_equals_trl_with_num_items_in_batch_and_differs_by_length_without_labels():
    student, teacher, labels = logits_and_labels(seed=1)
    n = torch.tensor(int((labels != -100).sum()) * 3)  # a window three times this micro-batch
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=0.3, num_items_in_batch=n)
    ours = generalized_jsd_loss(student, teacher, labels != -100, beta=0.3, num_items_in_batch=n)
    assert rel_diff(ours, theirs) <= 1e-5
    # Without labels TRL's "batchmean" divides the sum by the batch size, ours by the number of positions.
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, None, beta=0.3)
    ours = generalized_jsd_loss(student, teacher, None, beta=0.3)
    assert rel_diff(ours * student.shape[1], theirs) <= 1e-5


def test_script_at_a_tiny_size_writes_a_record_with_its_keys(tmp_path):
    out = tmp_path / "results" / "trl_side_by_side.json"
    tiny = ["--batch", "2", "--seq_len", "24", "--vocab", "300", "--hidden", "32", "--teacher_layers", "2"]
    options = ["--student_layers", "1", "--repeats", "2", "--warmup", "0", "--betas", "0,0.5,1", "--beta", "0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRL_EXPERIMENTAL_SILENCE": "1"}
    run = subprocess.run(
        [sys.executable, SCRIPT, *tiny, *options, "--write", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ours / TRL: time" in run.stdout

    record = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # written atomically: no temporary left behind
    assert set(record) >= {
        "benchmark", "config", "commit", "command", "machine", "versions", "equality", "memory_method", "device",
        "models", "first_step", "trainers", "ratios", "created",
    }  # fmt: skip
    assert set(record["versions"]) == {"python", "torch", "transformers", "trl"}
    assert record["config"]["batch"] == 2 and record["config"]["beta"] == 0.3

    equality = record["equality"]
    assert len(equality["gkd_generalized_jsd_loss"]) == 3 * 3  # --betas x the default three temperatures
    assert equality["max_rel_diff"] <= 1e-5 and equality["meets_tolerance"] is True
    assert equality["num_items_in_batch"]["loss"] <= 1e-5
    assert equality["no_labels"]["loss"] <= 1e-5
    assert equality["distillation_trainer_chunked"]["max_rel_diff"] <= 1e-5

    first = record["first_step"]
    assert first["loss_rel_diff"] <= 1e-5  # both trainers compute the same loss on the same batch
    assert first["grad_max_rel_diff"] <= 1e-4
    assert set(record["trainers"]) == {"trl_gkd", "hf_distill"}
    for row in record["trainers"].values():
        assert len(row["seconds_all"]) == 2 and row["seconds"] > 0
        assert row["peak_memory_bytes"] >= row["peak_loss_backward_bytes"] > 0
    assert set(record["ratios"]) == {
        "hf_distill_over_trl_time", "hf_distill_over_trl_memory", "hf_distill_over_trl_loss_backward_memory",
    }  # fmt: skip
    # The record carries the tables BENCHMARKS.md shows, made from its own figures.
    from hf_distill.benchmark_report import record_table

    table = record_table(out)
    assert table == record["markdown"] and "| ours / TRL |" in table
    assert f"| hf_distill | {record['trainers']['hf_distill']['seconds']:.3f} |" in table
    assert f"{record['ratios']['hf_distill_over_trl_time']:.3f}×" in table
