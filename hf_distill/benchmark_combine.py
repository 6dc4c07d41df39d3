"""Combine the records of one benchmark run a training seed at a time (one seed per session, say) into the record a
single run over all those seeds would have written.

    python scripts/benchmark.py --combine benchmarks/results/sst2_mpnet_l6_seed42.json \\
        benchmarks/results/sst2_mpnet_l6_seed43.json benchmarks/results/sst2_mpnet_l6_seed44.json \\
        --into benchmarks/results/sst2_mpnet_l6.json

A part is a record of the same benchmark under `student_seeds` of its own (`--set "student_seeds=[43]"`): the
teacher, the data subset and the student's initialisation come from `seed` in every part, so the parts differ only in
the students' training seeds. `combine_records` refuses parts that differ in anything else (configuration, budget,
rows, dev rows, the teacher's dev predictions) or that share a seed, and then recomputes what depends on all the
seeds from each part's per-dev-row correctness (`dev_correct`): each row's mean accuracy and its standard deviation
over the seeds, the points over the baseline, and the paired bootstrap interval pooled over the seeds. Size,
latency and training time are the first part's (its first seed's models are the ones timed, as in one run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark_report import (
    RECORD_FORMAT,
    add_relative_metrics,
    correct_by_seed,
    is_teacher_row,
    paired_bootstrap,
)

# Fields that may differ between the parts of one benchmark: the seeds each part trained and where it was written.
PER_PART_CONFIG = ("student_seeds", "results_file")


def config_defaults() -> dict[str, Any]:
    """`BenchmarkConfig`'s defaults: a key a part's record lacks (the field came after that run) counts as its default,
    which is what the field's introduction kept the run doing (fields are added with a default that changes
    nothing, as the stages' fingerprints require)."""
    import dataclasses

    from .benchmark_config import BenchmarkConfig

    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(BenchmarkConfig)
        if f.init and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    }


def load_record(path: str | Path) -> dict[str, Any]:
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: record format {record.get('format')!r}, this code reads format {RECORD_FORMAT}.")
    return record


def _bits(row: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    if not row.get("dev_correct"):
        raise ValueError(
            f"{where}: row {row['name']!r} has no dev_correct (per-dev-row correctness), so its seeds cannot be "
            "pooled; rerun that part with the current code."
        )
    return correct_by_seed(row)


def combine_records(records: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """One record from `records`, parts of the same benchmark under disjoint student seeds (see the module doc).

    `names` label the parts in errors and in the combined record's `parts` (default: part 0, part 1, ...).
    """
    if len(records) < 2:
        raise ValueError(f"combine needs at least two records, got {len(records)}.")
    names = names or [f"part {i}" for i in range(len(records))]
    first, first_name = records[0], names[0]

    defaults = config_defaults()

    def config_of(record):
        config = {**defaults, **record["config"]}
        return {k: v for k, v in config.items() if k not in PER_PART_CONFIG}

    def budget_of(record):
        return {k: v for k, v in record["budget"].items() if k != "student_seeds"}

    for record, name in zip(records[1:], names[1:]):
        if record["benchmark"] != first["benchmark"]:
            raise ValueError(f"{name} is benchmark {record['benchmark']!r}, {first_name} is {first['benchmark']!r}.")
        for what, get in (("config", config_of), ("budget", budget_of)):
            a, b = get(first), get(record)
            differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if differing:
                changes = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differing)
                raise ValueError(
                    f"{name} ran another {what} than {first_name} ({changes}): only student_seeds may differ "
                    "between the parts of one benchmark."
                )
        if [r["name"] for r in record["rows"]] != [r["name"] for r in first["rows"]]:
            raise ValueError(
                f"{name} has rows {[r['name'] for r in record['rows']]}, {first_name} has "
                f"{[r['name'] for r in first['rows']]}."
            )
        for k, row in enumerate(first["rows"]):
            if not is_teacher_row(row):
                continue
            teacher, mine = _bits(row, first_name), _bits(record["rows"][k], name)
            (t,), (m,) = teacher.values(), mine.values()
            if t.shape != m.shape or (t != m).any():
                n = "a different number of" if t.shape != m.shape else f"{int((t != m).sum())} of the"
                which = "teacher" if row["name"] == "teacher" else f"extra teacher {row['name']}"
                raise ValueError(
                    f"the {which} of {name} differs from the {which} of {first_name}: its dev predictions differ on "
                    f"{n} dev rows. The parts must share their teachers (same seed, data, code and threads), or "
                    "their students are not seeds of one experiment."
                )

    rows, pooled = [], {}  # pooled: row name -> (seeds, dev rows) correctness, for the intervals
    baseline = first["config"]["baseline_name"]
    for k, row in enumerate(first["rows"]):
        parts = [record["rows"][k] for record in records]
        combined = dict(row)
        if is_teacher_row(row) and row["name"] != "teacher":  # an extra teacher: one model, its interval as in a part
            pooled[row["name"]] = np.stack(list(_bits(row, names[0]).values()))
        if not is_teacher_row(row):  # a teacher (the teacher, an extra teacher) is the same model in every part
            seeds, bits, accuracy = [], {}, {}
            for part, name in zip(parts, names):
                part_bits = _bits(part, name)
                overlap = set(part_bits) & set(bits)
                if overlap:
                    raise ValueError(
                        f"row {row['name']!r}: seed(s) {sorted(overlap)} of {name} are in an earlier part too; each "
                        "part must train other student_seeds."
                    )
                per_seed = part.get("accuracy_per_seed") or {str(part["seeds"][0]): part["accuracy"]}
                seeds += part["seeds"]
                bits.update(part_bits)
                accuracy.update({str(s): float(v) for s, v in per_seed.items()})
            values = [accuracy[str(s)] for s in seeds]  # two parts or more: two seeds or more
            combined.update(
                seeds=seeds,
                accuracy=float(np.mean(values)),
                accuracy_std=float(np.std(values, ddof=1)),
                accuracy_per_seed={str(s): accuracy[str(s)] for s in seeds},
                dev_correct={str(s): "".join("1" if ok else "0" for ok in bits[str(s)]) for s in seeds},
            )
            pooled[row["name"]] = np.stack([bits[str(s)] for s in seeds])
        rows.append(combined)
    add_relative_metrics(rows, baseline=baseline)
    for row in rows:
        row.pop("delta_ci95", None)
        if row["name"] not in ("teacher", baseline):
            row["delta_ci95"] = list(
                paired_bootstrap(pooled[row["name"]], pooled[baseline], seed=first["config"]["seed"])
            )

    seeds = list(dict.fromkeys(s for record in records for s in record["budget"]["student_seeds"]))
    parts = [
        {
            "record": name,
            "student_seeds": record["budget"]["student_seeds"],
            **{k: record.get(k) for k in ("command", "commit", "dirty", "date", "invocation_seconds", "machine")},
            "stage_seconds": record.get("stage_seconds"),
        }
        for record, name in zip(records, names)
    ]
    return {
        "format": RECORD_FORMAT,
        "benchmark": first["benchmark"],
        "command": " && ".join(p["command"] for p in parts if p["command"]),
        "commit": first.get("commit"),
        "dirty": any(p["dirty"] for p in parts),
        "date": max(p["date"] for p in parts if p["date"]),
        "invocation_seconds": sum(p["invocation_seconds"] or 0 for p in parts),
        "machine": first.get("machine"),
        "budget": {**first["budget"], "student_seeds": seeds},
        "config": {**first["config"], "student_seeds": seeds, "results_file": None},
        "rows": rows,
        "parts": parts,
        "stage_seconds": first.get("stage_seconds"),
    }
