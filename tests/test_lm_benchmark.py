"""The LM benchmark (`kind: lm`): text sources cut into blocks by whole documents, held-out perplexity against a
direct computation, rows trained on the same budget from the same student, the cache row, resume, the record and its
BENCHMARKS.md table, the script's dispatch, and the config's refusals."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import WORDS
from test_trainer_lm import causal_lm
from transformers import AutoModelForCausalLM

import hf_distill.on_policy
from hf_distill.benchmark_report import record_table
from hf_distill.lm_benchmark import (
    LMBenchmarkConfig,
    format_lm_table,
    nll_difference_interval,
    perplexity,
    prompted_blocks,
    run_lm_benchmark,
)
from hf_distill.lm_data import load_documents, split_documents, token_blocks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def lm_tokenizer(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    tiny_tokenizer.eos_token = "[SEP]"  # documents are joined with EOS
    yield tiny_tokenizer
    tiny_tokenizer.eos_token = eos


def documents(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8 + k % 5,), generator=g)) for k in range(n)]


def test_blocks_join_documents_with_eos_and_drop_the_remainder(lm_tokenizer):
    docs = documents(5)
    blocks = token_blocks(docs, lm_tokenizer, block_size=7)
    stream = [
        t for d in docs for t in lm_tokenizer(d, add_special_tokens=False)["input_ids"] + [lm_tokenizer.eos_token_id]
    ]
    assert len(blocks) == len(stream) // 7
    assert [t for b in blocks["input_ids"] for t in b] == stream[: len(blocks) * 7]
    assert blocks["labels"] == blocks["input_ids"] and all(sum(m) == 7 for m in blocks["attention_mask"])
    assert len(token_blocks(docs, lm_tokenizer, block_size=7, max_blocks=2)) == 2
    with pytest.raises(ValueError, match=r"fewer than one block of block_size=10000"):
        token_blocks(docs, lm_tokenizer, block_size=10_000)


def test_documents_split_whole_and_seeded(tmp_path):
    docs = documents(20)
    train, held = split_documents(docs, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert split_documents(docs, 0.25, seed=3) == (train, held) != split_documents(docs, 0.25, seed=4)
    (tmp_path / "d.txt").write_text("one doc\n\n  two doc  \n")
    assert load_documents(str(tmp_path / "d.txt")) == ["one doc", "two doc"]
    (tmp_path / "d.jsonl").write_text('{"body": "a b"}\n{"body": "c"}\n')
    assert load_documents(str(tmp_path / "d.jsonl"), text_column="body") == ["a b", "c"]
    with pytest.raises(ValueError, match=r"text_column='text' is not a column .*\['body'\]"):
        load_documents(str(tmp_path / "d.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"text source 'missing.txt' is not a file"):
        load_documents("missing.txt", root=tmp_path)
    with pytest.raises(ValueError, match=r"eval_fraction must be in \(0, 1\), got 1.5"):
        split_documents(docs, 1.5, seed=0)


def test_perplexity_is_exp_of_the_mean_token_nll(lm_tokenizer):
    model = causal_lm("llama", vocab=len(lm_tokenizer)).eval()
    blocks = token_blocks(documents(30), lm_tokenizer, block_size=9)
    got = perplexity(model, blocks, batch_size=4)
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert got["eval_tokens"] == nll.numel()
    assert got["nll_per_token"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert got["block_tokens"] == [ids.shape[1] - 1] * ids.shape[0]
    assert got["block_nll"] == pytest.approx(nll.sum(1).tolist(), rel=1e-5)


def test_the_nll_difference_interval_is_the_paired_bootstrap_of_ratios_of_sums():
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 20, size=30)
    base = rng.uniform(1.0, 3.0, size=30) * tokens
    better = base - rng.uniform(0.0, 0.4, size=30) * tokens  # lower nll on every block
    low, high = nll_difference_interval(better, tokens, base, tokens, resamples=2000, seed=7)
    # The slow reference: the same draws, one resample at a time.
    draws = np.random.default_rng(7).integers(0, 30, size=(2000, 30))
    diffs = [(better[d].sum() - base[d].sum()) / tokens[d].sum() for d in draws]
    assert (low, high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), rel=1e-12)
    assert high < 0 and low < (better.sum() - base.sum()) / tokens.sum() < high
    assert nll_difference_interval(base, tokens, base, tokens, resamples=100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="scored on different blocks"):
        nll_difference_interval(base[:5], tokens[:5], base, tokens)


RECIPES = {
    "lm_finetune": {"task_weight": 1.0, "logits_weight": 0.0, "learning_rate": 1e-3},
    "forward_kl": {"task_weight": 0.0, "logits_weight": 1.0, "temperature": 1.0, "learning_rate": 1e-3},
    "cached_top4": {"task_weight": 0.0, "logits_weight": 1.0, "temperature": 1.0, "learning_rate": 1e-3,
                    "use_teacher_cache": True, "teacher_cache_top_k": 4, "teacher_cache_top_k_tail": True},
}  # fmt: skip


@pytest.fixture
def lm_bench(tmp_path, lm_tokenizer):
    teacher = causal_lm("llama", layers=4, vocab=len(lm_tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    lm_tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text("\n".join(documents(60)) + "\n")
    for name, recipe in RECIPES.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    values = dict(
        kind="lm", name="tiny_lm", output_dir=str(tmp_path / "out"),
        teacher_model_name_or_path=str(tmp_path / "teacher"), train_source=str(tmp_path / "corpus.txt"),
        eval_fraction=0.2, block_size=16, student_num_layers=2,
        max_steps=3, per_device_train_batch_size=4, save_steps=50, logging_steps=1,
        baseline_recipe=str(tmp_path / "lm_finetune.yaml"),
        rows={"forward_kl": str(tmp_path / "forward_kl.yaml"), "cached_top4": str(tmp_path / "cached_top4.yaml")},
        results_file=str(tmp_path / "record.json"),
    )  # fmt: skip
    return tmp_path, values


def test_lm_benchmark_rows_record_and_resume(lm_bench):
    tmp_path, values = lm_bench
    results = run_lm_benchmark(LMBenchmarkConfig(**values), root=REPO)
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "student_init", "lm_finetune", "forward_kl", "cached_top4"]
    assert all(rows[n]["train_steps"] == 3 for n in ("lm_finetune", "forward_kl", "cached_top4"))
    assert rows["teacher"]["perplexity_vs_teacher"] == 1.0
    # Every figure is the perplexity of the saved model on the held-out blocks (documents never trained on).
    out = tmp_path / "out"
    bench_blocks = json.loads((out / "eval" / "forward_kl" / "metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "rows" / "forward_kl")
    assert rows["forward_kl"]["perplexity"] == bench_blocks["perplexity"]
    assert rows["forward_kl"]["params"] == sum(p.numel() for p in model.parameters()) < rows["teacher"]["params"]
    assert rows["student_init"]["perplexity"] != rows["forward_kl"]["perplexity"]
    assert (out / "teacher_cache").is_dir()  # the cached row built it
    # The record carries the kind, and BENCHMARKS.md's table of it is the LM table.
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["kind"] == "lm" and record["budget"]["max_steps"] == 3
    assert record_table(tmp_path / "record.json") == format_lm_table(record["rows"], "lm_finetune") + "\n"
    # Each row's nll difference to the baseline, with its paired bootstrap interval over the held-out blocks.
    assert rows["lm_finetune"]["nll_vs_baseline"] == 0 and "nll_vs_baseline_ci95" not in rows["lm_finetune"]
    for name in ("teacher", "student_init", "forward_kl", "cached_top4"):
        row, (low, high) = rows[name], rows[name]["nll_vs_baseline_ci95"]
        assert row["nll_vs_baseline"] == pytest.approx(row["nll_per_token"] - rows["lm_finetune"]["nll_per_token"])
        assert low <= row["nll_vs_baseline"] <= high
    assert "| vs lm_finetune (nll / token) | 95% CI vs lm_finetune |" in record_table(tmp_path / "record.json")
    assert "| forward_kl | forward_kl |" in record_table(tmp_path / "record.json")
    # A rerun reuses every stage; another budget is refused instead of mixed in.
    again = run_lm_benchmark(LMBenchmarkConfig(**values), root=REPO)
    assert {s["status"] for s in again["stages"]} == {"reused"}
    with pytest.raises(ValueError, match=r"rows/lm_finetune was made with other settings .*max_steps"):
        run_lm_benchmark(LMBenchmarkConfig(**{**values, "max_steps": 4}), root=REPO)


def test_the_benchmark_script_runs_a_kind_lm_config(lm_bench, monkeypatch):
    import importlib.util

    tmp_path, values = lm_bench
    values = {**values, "rows": {}, "results_file": None}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(values))
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--config", str(tmp_path / "lm.yaml")])
    assert results["kind"] == "lm" and [r["name"] for r in results["rows"]][-1] == "lm_finetune"


def test_an_on_policy_row_continues_prompts_of_prompt_tokens_and_leaves_the_other_rows_alone(lm_bench, lm_tokenizer):
    tmp_path, values = lm_bench
    blocks = token_blocks(documents(30), lm_tokenizer, block_size=8)
    masked = prompted_blocks(blocks, 3)
    assert masked["input_ids"] == blocks["input_ids"]
    assert all(m[:3] == [-100] * 3 and m[3:] == b[3:] for m, b in zip(masked["labels"], blocks["input_ids"]))

    on_policy = {"task_weight": 0.0, "logits_weight": 1.0, "logits_loss": "generalized_jsd", "temperature": 1.0,
                 "learning_rate": 1e-3, "lmbda": 1.0, "max_new_tokens": 4}  # fmt: skip
    (tmp_path / "gkd.yaml").write_text(yaml.safe_dump(on_policy))
    plain = {**values, "rows": {"forward_kl": str(tmp_path / "forward_kl.yaml")}, "results_file": None}
    run_lm_benchmark(LMBenchmarkConfig(**plain), root=REPO)
    # Refused before any training when the row has no prompts to continue.
    rows = {**plain["rows"], "gkd": str(tmp_path / "gkd.yaml")}
    with pytest.raises(ValueError, match=r"row 'gkd' is on-policy .* but prompt_tokens is not set"):
        run_lm_benchmark(LMBenchmarkConfig(**{**plain, "rows": rows, "output_dir": str(tmp_path / "new")}), root=REPO)
    assert not (tmp_path / "new").exists()  # refused before any stage, the student init included

    seen = []
    original = hf_distill.on_policy.split_prompts

    def spy(input_ids, attention_mask, labels):
        seen.append(labels.clone())
        return original(input_ids, attention_mask, labels)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_distill.on_policy, "split_prompts", spy)
        results = run_lm_benchmark(LMBenchmarkConfig(**{**plain, "rows": rows, "prompt_tokens": 5}), root=REPO)
    statuses = {s["path"].split("out/")[-1]: s["status"] for s in results["stages"]}
    assert statuses["rows/forward_kl"] == "reused" and statuses["rows/lm_finetune"] == "reused"  # specs unchanged
    assert statuses["rows/gkd"] != "reused" and {r["name"]: r for r in results["rows"]}["gkd"]["train_steps"] == 3
    # Every on-policy batch the student continued (3 steps of 4 blocks; the trainer's up-front check of the first
    # rows comes one row at a time) had exactly the first 5 tokens of each block as its prompt.
    batches = [labels for labels in seen if labels.shape[0] == 4]
    assert len(batches) == 3 and all((lab[:, :5] == -100).all() and (lab[:, 5:] != -100).all() for lab in batches)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(kind="classification"), r"kind must be 'lm'"),
        (dict(prompt_tokens=16), r"prompt_tokens must be an int in \[1, block_size - 1\] = \[1, 15\], got 16"),
        (dict(prompt_tokens=0), r"prompt_tokens must be an int in \[1, block_size - 1\]"),
        (dict(max_steps=None), r"max_steps is required"),
        (dict(eval_fraction=None), r"set exactly one of eval_source .* and eval_fraction"),
        (dict(eval_source="other.txt"), r"set exactly one of eval_source"),
        (dict(block_size=1), r"block_size must be >= 2, got 1"),
        (dict(rows={"a": ["x.yaml"]}), r"rows must map row names to one recipe file each"),
        (dict(rows={"student_init": "x.yaml"}), r"row name 'student_init' must be a plain folder name"),
    ],
)
def test_lm_benchmark_config_is_checked(lm_bench, overrides, match):
    _, values = lm_bench
    with pytest.raises(ValueError, match=match):
        LMBenchmarkConfig(**{**values, **overrides})
