"""Combining per-seed benchmark records (`hf_distill.benchmark_combine`) into the record of all their seeds."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from hf_distill.benchmark_combine import combine_records, load_record
from hf_distill.benchmark_report import RECORD_FORMAT, format_table, paired_bootstrap

REPO = Path(__file__).resolve().parent.parent
N = 40  # dev rows


def bits(seed: int, p: float) -> str:
    rng = np.random.default_rng(seed)
    return "".join("1" if ok else "0" for ok in rng.random(N) < p)


def row(name: str, seed: int, p: float, latency: float) -> dict:
    b = bits(1000 * seed + len(name), p)
    return {
        "name": name, "recipes": [name], "accuracy": b.count("1") / N, "params": 10, "size_mb": 1.0,
        "latency_b1_ms": latency, "latency_b32_ms": 10 * latency, "train_steps": 4, "train_seconds": 1.0,
        "seeds": [seed], "dev_correct": {str(seed): b},
    }  # fmt: skip


def record(seed: int) -> dict:
    teacher = row("teacher", 42, 0.9, 2.0)  # one teacher in every part
    teacher["seeds"] = None
    rows = [teacher, row("no_kd", seed, 0.7, 1.0), row("kd", seed, 0.8, 1.0)]
    return {
        "format": RECORD_FORMAT, "benchmark": "tiny", "command": f"python scripts/benchmark.py --seed {seed}",
        "commit": "abc", "dirty": False, "date": f"2026-12-0{seed % 9}T00:00:00Z", "invocation_seconds": 10.0,
        "machine": {"cpu_count": 2}, "budget": {"train_rows": 64, "student_seeds": [seed]},
        "config": {"seed": 42, "baseline_name": "no_kd", "student_seeds": [seed], "results_file": f"r{seed}.json",
                   "max_train_samples": 64},
        "rows": rows, "stage_seconds": {"teacher": 1.0},
    }  # fmt: skip


def test_combined_record_pools_the_seeds_of_its_parts():
    parts = [record(42), record(43), record(44)]
    combined = combine_records(parts, names=["a.json", "b.json", "c.json"])
    rows = {r["name"]: r for r in combined["rows"]}
    assert combined["budget"]["student_seeds"] == [42, 43, 44] == combined["config"]["student_seeds"]
    assert [p["record"] for p in combined["parts"]] == ["a.json", "b.json", "c.json"]
    assert rows["teacher"]["dev_correct"] == parts[0]["rows"][0]["dev_correct"]
    for name, k in (("no_kd", 1), ("kd", 2)):
        per_seed = [p["rows"][k]["accuracy"] for p in parts]
        assert rows[name]["seeds"] == [42, 43, 44]
        assert rows[name]["accuracy"] == pytest.approx(np.mean(per_seed))
        assert rows[name]["accuracy_std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert rows[name]["accuracy_per_seed"] == {str(s): a for s, a in zip([42, 43, 44], per_seed)}
        assert rows[name]["dev_correct"] == {
            str(s): p["rows"][k]["dev_correct"][str(s)] for s, p in zip([42, 43, 44], parts)
        }

    def stacked(k):
        return np.stack(
            [np.array([c == "1" for c in p["rows"][k]["dev_correct"][str(s)]]) for s, p in zip([42, 43, 44], parts)]
        )

    assert rows["kd"]["delta_ci95"] == list(paired_bootstrap(stacked(2), stacked(1), seed=42))
    assert "delta_ci95" not in rows["no_kd"] and "delta_ci95" not in rows["teacher"]
    assert rows["kd"]["delta_vs_baseline_pts"] == pytest.approx(100 * (stacked(2).mean() - stacked(1).mean()))
    assert rows["kd"]["accuracy_kept_pct"] == pytest.approx(100 * rows["kd"]["accuracy"] / rows["teacher"]["accuracy"])
    assert "± std (seeds)" in format_table(combined["rows"]) and "| 3) |" not in format_table(combined["rows"])
    assert combined["command"].count("python scripts/benchmark.py") == 3
    assert parts[0]["rows"][1]["seeds"] == [42]  # the parts are left as they were


def with_extra_teacher(seed: int) -> dict:
    r = record(seed)
    extra = row("teacher-seed43", 43, 0.85, 2.0)  # the same extra teacher in every part (its seed is fixed)
    extra.update(seeds=None, teacher_seed=43)
    r["rows"].insert(1, extra)
    return r


def test_an_extra_teacher_row_is_one_model_in_every_part_not_a_seed_to_pool():
    parts = [with_extra_teacher(42), with_extra_teacher(43)]
    rows = {r["name"]: r for r in combine_records(parts)["rows"]}
    extra = parts[0]["rows"][1]
    assert rows["teacher-seed43"]["dev_correct"] == extra["dev_correct"] and rows["teacher-seed43"]["seeds"] is None
    assert rows["teacher-seed43"]["accuracy"] == extra["accuracy"] and "accuracy_std" not in rows["teacher-seed43"]
    as_bits = np.array([c == "1" for c in extra["dev_correct"]["43"]])[None]
    no_kd = np.stack(
        [np.array([c == "1" for c in p["rows"][2]["dev_correct"][str(s)]]) for s, p in zip([42, 43], parts)]
    )
    assert rows["teacher-seed43"]["delta_ci95"] == list(paired_bootstrap(as_bits, no_kd, seed=42))
    assert rows["kd"]["seeds"] == [42, 43]
    # A part whose extra teacher predicts otherwise is refused like one whose teacher does.
    other = with_extra_teacher(43)
    other["rows"][1]["dev_correct"] = {"43": "0" * N}
    with pytest.raises(ValueError, match=r"the extra teacher teacher-seed43 of part 1 differs .* dev rows"):
        combine_records([with_extra_teacher(42), other])


def changed(edit):
    parts = [record(42), record(43)]
    edit(parts[1])
    return parts


@pytest.mark.parametrize(
    "parts, match",
    [
        ([record(42)], "at least two records"),
        (changed(lambda r: r.update(benchmark="other")), "is benchmark 'other'"),
        (
            changed(lambda r: r["config"].update(max_train_samples=128)),
            r"another config .*max_train_samples: 64 -> 128",
        ),
        (changed(lambda r: r["budget"].update(train_rows=128)), r"another budget .*train_rows"),
        # A key one part lacks (the field came later) counts as its default: another value differs.
        (changed(lambda r: r["config"].update(augment_top_k=20)), r"another config .*augment_top_k: 15 -> 20"),
        (changed(lambda r: r["rows"].pop()), "has rows"),
        (changed(lambda r: r["rows"][0].update(dev_correct={"42": "0" * N})), "teacher of part 1 differs .* dev rows"),
        (changed(lambda r: r["rows"][1].pop("dev_correct")), "row 'no_kd' has no dev_correct"),
        ([record(42), record(42)], r"seed\(s\) \['42'\] of part 1 are in an earlier part"),
    ],
)
def test_parts_that_are_not_seeds_of_one_benchmark_are_refused(parts, match):
    with pytest.raises(ValueError, match=match):
        combine_records(copy.deepcopy(parts))


def test_script_combines_records_into_one(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    paths = []
    for seed in (42, 43):
        paths.append(tmp_path / f"r{seed}.json")
        paths[-1].write_text(json.dumps(record(seed)))
    out = tmp_path / "all.json"
    script.main(["--combine", *map(str, paths), "--into", str(out)])
    combined = load_record(out)
    assert combined["budget"]["student_seeds"] == [42, 43]
    assert "seeds [42, 43], from 2 records" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--into"):
        script.main(["--combine", *map(str, paths)])
    with pytest.raises(SystemExit, match="in an earlier part"):
        script.main(["--combine", str(paths[0]), str(paths[0]), "--into", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_a_record_names_the_commit_its_run_started_from(tmp_path, monkeypatch):
    """A run of hours can outlive commits: the record's commit is the one at the start, the end's is added when it
    differs (a record once named the commit of its end)."""
    from hf_distill import benchmark_report

    states = iter([{"commit": "bbb", "dirty": True}])
    monkeypatch.setattr(benchmark_report, "git_state", lambda root: next(states))
    results = {
        "benchmark": "tiny", "config": {"output_dir": str(tmp_path)}, "budget": {}, "rows": [],
        "stages": [], "output_dir": str(tmp_path),
    }  # fmt: skip
    record = benchmark_report.results_record(
        results, command="c", root=tmp_path, started={"commit": "aaa", "dirty": False}
    )
    assert (record["commit"], record["dirty"]) == ("aaa", False)
    assert (record["commit_at_end"], record["dirty_at_end"]) == ("bbb", True)
    states = iter([{"commit": "aaa", "dirty": False}])
    same = benchmark_report.results_record(
        results, command="c", root=tmp_path, started={"commit": "aaa", "dirty": False}
    )
    assert same["commit"] == "aaa" and "commit_at_end" not in same


def test_a_key_an_older_part_lacks_counts_as_its_default():
    """A part run before a config field existed combines with one that records the field at its default."""
    old, new = record(42), record(43)
    new["config"].update(augment_n_per_row=4, augment_top_k=15, student_init_from="teacher", general_rows=[])
    combined = combine_records([old, new])
    assert combined["budget"]["student_seeds"] == [42, 43]


def test_a_comparison_block_shows_every_student_row_against_one_row(tmp_path):
    """`<!-- results: PATH against=kd -->`: points over the row `kd` and their paired interval, from dev_correct."""
    from hf_distill.benchmark_report import comparison_table, stale_results_blocks, update_results_blocks

    r = record(42)
    (tmp_path / "r.json").write_text(json.dumps(r))
    table = comparison_table(r["rows"], "kd", seed=42)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert list(rows) == ["no_kd", "kd"]  # the teacher is left out
    as_bits = {x["name"]: np.array([c == "1" for c in x["dev_correct"]["42"]])[None] for x in r["rows"]}
    delta = 100 * (as_bits["no_kd"].mean() - as_bits["kd"].mean())
    low, high = paired_bootstrap(as_bits["no_kd"], as_bits["kd"], seed=42)
    assert f"| {delta:+.2f} | [{low:+.2f}, {high:+.2f}] | 4 |" in rows["no_kd"]
    assert "| +0.00 | - | 4 |" in rows["kd"]
    doc = "<!-- results: r.json against=kd -->\nold\n<!-- /results -->\n"
    fresh = update_results_blocks(doc, tmp_path)
    assert fresh == f"<!-- results: r.json against=kd -->\n{table}<!-- /results -->\n"
    assert stale_results_blocks(doc, tmp_path) == ["r.json"] and stale_results_blocks(fresh, tmp_path) == []
    with pytest.raises(ValueError, match=r"against='vanilla' is not a row of this record"):
        comparison_table(r["rows"], "vanilla")
