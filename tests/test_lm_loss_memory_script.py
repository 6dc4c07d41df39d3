"""benchmarks/lm_loss_memory.py at tiny sizes: the three variants run, agree, and the JSON record has its fields."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "lm_loss_memory.py")


def test_script_writes_a_complete_record_at_tiny_sizes(tmp_path):
    out = tmp_path / "results" / "lm_loss_memory.json"
    tiny = ["--batch", "2", "--seq_len", "16", "--vocab", "100", "--hidden", "16", "--teacher_hidden", "24"]
    options = ["--chunk_size", "8", "--masked_fraction", "0.25", "--repeats", "1", "--divergence", "skew_kl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, SCRIPT, *tiny, *options, "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fused/plain: memory" in run.stdout

    record = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # written atomically: no temporary left behind
    assert record["config"] == {
        "batch": 2, "seq_len": 16, "vocab": 100, "hidden": 16, "teacher_hidden": 24, "divergence": "skew_kl",
        "temperature": 1.0, "chunk_size": 8, "masked_fraction": 0.25, "dtype": "float32", "device": "cpu",
        "repeats": 1, "seed": 0,
    }  # fmt: skip
    assert record["tokens"] == 32 and record["memory_method"]
    assert set(record["variants"]) == {"plain", "chunked", "fused"}
    for row in record["variants"].values():
        assert row["peak_memory_bytes"] >= 0 and row["seconds"] > 0 and len(row["seconds_all"]) == 1
    losses = [row["loss"] for row in record["variants"].values()]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert set(record["ratios"]) == {
        "chunked_over_plain_memory", "chunked_over_plain_time", "fused_over_plain_memory", "fused_over_plain_time",
    }  # fmt: skip
    for variant in ("chunked", "fused"):
        diffs = record["max_rel_diff"][variant]
        assert set(diffs) == {"loss", "grad_student_hidden", "grad_student_weight"}
        assert max(diffs.values()) <= 1e-5
    assert record["targets"] == {
        "fused_over_plain_memory_max": 0.2, "fused_over_plain_time_max": 1.3, "max_rel_diff": 1e-5
    }  # fmt: skip
    assert record["meets_targets"]["exactness"] is True
    assert set(record["meets_targets"]) == {"memory", "time", "exactness"}
    # The record carries the table BENCHMARKS.md shows, made from its own figures, and the commit it ran at.
    from hf_distill.benchmark_report import record_table

    table = record_table(out)
    assert table == record["markdown"] and table.count("\n") == 5
    fused = record["variants"]["fused"]
    assert f"| fused | {fused['peak_memory_mib']:,.1f} | {record['ratios']['fused_over_plain_memory']:.3f}× |" in table
    assert "| plain |" in table and "| 1.000× |" in table and "commit" in record
