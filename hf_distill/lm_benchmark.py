"""The language-model benchmark: a causal-LM teacher, a student from its alternating layers, and rows that train the
student on the same text for the same steps (plain LM fine-tuning, distillation under each divergence, through the
sparse teacher cache, on-policy), compared by perplexity on held-out documents.

    python scripts/benchmark.py --config benchmarks/smollm2_lm.yaml     # a YAML with `kind: lm`

Stages, each in its own folder under `output_dir` (finished folders reused, training resumed from checkpoints, a
folder of other settings refused: the machinery of `hf_distill.benchmark_stages`):

    student_init/       the student from the teacher's layers (`make_student`), before any training
    rows/<row>/         the student trained by the row's recipe for `max_steps` optimizer steps on the train blocks
    teacher_cache/      the teacher's (top-k) outputs, for rows whose recipe sets `use_teacher_cache: true`
    eval/<model>/       perplexity on the held-out blocks of the teacher, student_init and every row
    results.json, results.md

and, with `results_file`, the record (`benchmarks/results/<name>.json`, `"kind": "lm"`) whose table `BENCHMARKS.md`
shows (`format_lm_table`). The baseline row (`baseline_recipe`: the task loss alone, i.e. next-token cross-entropy
on the text) is "the student after plain LM fine-tuning on the same budget".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed

from .benchmark_config import is_folder_name, read_config_file
from .benchmark_report import (
    BOOTSTRAP_RESAMPLES,
    bootstrap_percentiles,
    git_state,
    results_record,
    write_json_atomic,
)
from .benchmark_stages import (
    BENCHMARK_OWNED_KEYS,
    METRICS_FILE,
    fingerprint,
    recipe_training_args,
    resolve_teacher,
    run_stage,
    run_trainer_stage,
    save_student_from_layers,
)
from .config import DistillationConfig
from .lm_data import RDATASETS_PREFIX, load_documents, split_documents, token_blocks
from .trainer import DistillationTrainer

LM_KIND = "lm"
# Training arguments the benchmark owns (the budget and the bookkeeping), whatever a recipe says.
LM_OWNED_KEYS = (*BENCHMARK_OWNED_KEYS, "teacher_cache_dir")  # the cache folder is the benchmark's too
LM_PATH_FIELDS = ("output_dir", "train_source", "eval_source", "baseline_recipe", "results_file")


@dataclass
class LMBenchmarkConfig:
    """What the LM benchmark compares (flat YAML keys; relative paths against the repository holding the file).

    Parameters:
        kind (`str`): `lm` (what sends a YAML to this benchmark).
        name (`str`), output_dir (`str`, *optional*: `outputs/benchmarks/<name>`), seed (`int`, defaults to 42).
        teacher_model_name_or_path (`str`): a causal LM (directory, `~`-path or Hub id).
        train_source (`str`): the training text (`hf_distill.lm_data`: a file or `rdatasets:<package>/<item>`).
        eval_source (`str`, *optional*) or eval_fraction (`float`, *optional*): the held-out text: another source,
            or that fraction of `train_source`'s documents (split by documents, seeded). Exactly one.
        text_column (`str`, defaults to `"text"`): the documents' column in a table source.
        block_size (`int`, defaults to 128): tokens per training / evaluation block.
        max_train_blocks, max_eval_blocks (`int`, *optional*): the first N blocks of each.
        student_num_layers (`int`, *optional*), student_layers (`str`, *optional*): as in `make_student`.
        max_steps (`int`): optimizer steps of every row (the budget), per_device_train_batch_size (`int`, defaults
            to 8), gradient_accumulation_steps (`int`, defaults to 1).
        baseline_name (`str`, defaults to `"lm_finetune"`), baseline_recipe (`str`): the plain LM fine-tuning row
            (task loss only).
        rows (`dict[str, str]`): row name -> recipe (DistillationConfig and optimizer keys).
        prompt_tokens (`int`, *optional*): for on-policy rows (a recipe with `lmbda > 0` or `seq_kd`, see
            `hf_distill.on_policy`): the first `prompt_tokens` tokens of each training block are its prompt (label
            -100) and the rest its completion, which such a row's student (or teacher) replaces by its own. Required
            when a row is on-policy; the other rows train on whole blocks, as without it.
        eval_batch_size (`int`, defaults to 8), logging_steps (`int`, defaults to 5), save_steps (`int`, defaults to
            25), results_file (`str`, *optional*, e.g. `benchmarks/results/{name}.json`).
    """

    kind: str = LM_KIND
    name: str = "lm_benchmark"
    output_dir: str | None = None
    seed: int = 42
    teacher_model_name_or_path: str | None = None
    train_source: str | None = None
    eval_source: str | None = None
    eval_fraction: float | None = None
    text_column: str = "text"
    block_size: int = 128
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None
    student_num_layers: int | None = None
    student_layers: str | None = None
    max_steps: int | None = None
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    baseline_name: str = "lm_finetune"
    baseline_recipe: str | None = None
    rows: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int | None = None
    eval_batch_size: int = 8
    logging_steps: int = 5
    save_steps: int = 25
    results_file: str | None = None
    source_root: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.kind != LM_KIND:
            raise ValueError(f"kind must be {LM_KIND!r} for the LM benchmark, got {self.kind!r}.")
        for name in ("teacher_model_name_or_path", "train_source", "baseline_recipe", "max_steps"):
            if getattr(self, name) in (None, ""):
                raise ValueError(f"{name} is required in an LM benchmark config (see hf_distill.lm_benchmark).")
        if (self.eval_source is None) == (self.eval_fraction is None):
            raise ValueError(
                f"set exactly one of eval_source (held-out text) and eval_fraction (a share of train_source's "
                f"documents), got eval_source={self.eval_source!r}, eval_fraction={self.eval_fraction!r}."
            )
        for name, minimum in (
            ("max_steps", 1), ("per_device_train_batch_size", 1), ("gradient_accumulation_steps", 1),
            ("block_size", 2), ("eval_batch_size", 1), ("logging_steps", 1), ("save_steps", 1),
        ):  # fmt: skip
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}.")
        if not isinstance(self.rows, dict) or not all(isinstance(v, str) for v in self.rows.values()):
            raise ValueError(
                f"rows must map row names to one recipe file each, got {self.rows!r}. E.g. rows: "
                "{forward_kl: recipes/smollm2_to_smollm2-15l/forward_kl.yaml}."
            )
        if self.prompt_tokens is not None and (
            isinstance(self.prompt_tokens, bool) or not isinstance(self.prompt_tokens, int)
            or not 1 <= self.prompt_tokens < self.block_size
        ):  # fmt: skip
            raise ValueError(
                f"prompt_tokens must be an int in [1, block_size - 1] = [1, {self.block_size - 1}], got "
                f"{self.prompt_tokens!r}: the prompt an on-policy row's completions continue, e.g. 32."
            )
        for name in [self.baseline_name, *self.rows]:
            if name in ("teacher", "student_init") or not is_folder_name(name):
                raise ValueError(f"row name {name!r} must be a plain folder name other than teacher / student_init.")
        if isinstance(self.student_layers, (list, tuple)):
            self.student_layers = ",".join(str(i) for i in self.student_layers)


def load_lm_benchmark_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> LMBenchmarkConfig:
    """Read an LM benchmark YAML, apply `overrides` (command-line paths made absolute against the cwd), validate."""
    return read_config_file(
        path, overrides, LMBenchmarkConfig, LM_PATH_FIELDS, "LM benchmark config",
        is_path=lambda value: not value.startswith(RDATASETS_PREFIX),
    )  # fmt: skip


def load_any_benchmark_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None):
    """`load_lm_benchmark_config` for a YAML with `kind: lm`, else `load_benchmark_config` (the classification one)."""
    from .benchmark_config import load_benchmark_config

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    lm = isinstance(values, dict) and values.get("kind") == LM_KIND
    return (load_lm_benchmark_config if lm else load_benchmark_config)(path, overrides)


def perplexity(model, blocks, batch_size: int) -> dict[str, Any]:
    """Held-out perplexity: exp of the mean next-token negative log-likelihood over every predicted token; with each
    block's summed negative log-likelihood and its number of predicted tokens (`block_nll`, `block_tokens`), for the
    interval of a difference between two models (`nll_difference_interval`)."""
    model.eval()
    block_nll, block_tokens = [], []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = default_data_collator([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, L - 1), 0 at -100
            block_nll += nll.sum(1).tolist()
            block_tokens += (targets != -100).sum(1).tolist()
    total, count = math.fsum(block_nll), sum(block_tokens)
    return {"perplexity": math.exp(total / count), "nll_per_token": total / count, "eval_tokens": count,
            "block_nll": block_nll, "block_tokens": block_tokens}  # fmt: skip


def nll_difference_interval(
    block_nll, block_tokens, baseline_block_nll, baseline_block_tokens, *, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """95% paired bootstrap interval of `nll per token - the baseline's nll per token` over the held-out blocks.

    Each resample draws the blocks with replacement and takes, on those blocks, each model's summed negative
    log-likelihood over its summed predicted tokens; both models are scored on the same drawn blocks (paired), so the
    interval is how much the difference could move with other held-out text of the same kind. A difference `d` in nll
    per token is a perplexity ratio `exp(d)`. The 2.5th and 97.5th percentiles are returned.
    """
    nll, tokens = np.asarray(block_nll, dtype=np.float64), np.asarray(block_tokens, dtype=np.float64)
    base_nll, base_tokens = np.asarray(baseline_block_nll, np.float64), np.asarray(baseline_block_tokens, np.float64)
    if nll.shape != base_nll.shape or not np.array_equal(tokens, base_tokens):
        raise ValueError(
            f"the two models were scored on different blocks ({nll.shape[0]} vs {base_nll.shape[0]}, or other token "
            "counts): evaluate both on the same held-out blocks."
        )

    def difference(drawn: np.ndarray) -> np.ndarray:
        return (nll[drawn].sum(1) - base_nll[drawn].sum(1)) / tokens[drawn].sum(1)

    return bootstrap_percentiles(difference, len(nll), resamples=resamples, seed=seed)


class LMBenchmark:
    def __init__(self, config: LMBenchmarkConfig, root: str | os.PathLike):
        self.config, self.root = config, Path(root)
        self.out = self._path(config.output_dir or f"outputs/benchmarks/{config.name}")
        self.stages: list = []

    def _path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.root / path

    def _source(self, value: str) -> str:
        return value if value.startswith(RDATASETS_PREFIX) else str(self._path(value))

    @cached_property
    def teacher_path(self) -> str:
        return resolve_teacher(self.config.teacher_model_name_or_path, self.root)

    @cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.teacher_path)

    @cached_property
    def teacher(self):
        model = AutoModelForCausalLM.from_pretrained(self.teacher_path, dtype=torch.float32)
        return model.eval().requires_grad_(False)

    @cached_property
    def blocks(self) -> dict[str, Any]:
        c = self.config
        train_docs = load_documents(self._source(c.train_source), c.text_column)
        if c.eval_source is not None:
            eval_docs = load_documents(self._source(c.eval_source), c.text_column)
        else:
            train_docs, eval_docs = split_documents(train_docs, c.eval_fraction, c.seed)
        train = token_blocks(train_docs, self.tokenizer, c.block_size, c.max_train_blocks)
        held = token_blocks(eval_docs, self.tokenizer, c.block_size, c.max_eval_blocks)
        print(f"[data] {len(train):,} train blocks, {len(held):,} held-out blocks of {c.block_size} tokens")
        return {"train": train, "eval": held}

    def _data_spec(self) -> dict[str, Any]:
        keys = ("seed", "train_source", "eval_source", "eval_fraction", "text_column", "block_size")
        return {k: getattr(self.config, k) for k in (*keys, "max_train_blocks", "max_eval_blocks")}

    def student_init_stage(self) -> dict[str, Any]:
        c = self.config
        spec = {"stage": "student_init", "teacher": c.teacher_model_name_or_path, "num_layers": c.student_num_layers,
                "layers": c.student_layers}  # fmt: skip

        def work(tmp: Path) -> dict:
            return save_student_from_layers(self.teacher, self.tokenizer, tmp, c.student_num_layers, c.student_layers)

        self.stages.append(run_stage(self.out / "student_init", spec, work))
        return spec

    def _on_policy(self, name: str, recipe_path: str, training: dict[str, Any]) -> bool:
        """Whether the row's recipe is on-policy (`lmbda` / `seq_kd`); refused when there are no prompts for it."""
        if not (training.get("lmbda", 0) > 0 or training.get("seq_kd")):
            return False
        if self.config.prompt_tokens is None:
            raise ValueError(
                f"row {name!r} is on-policy (its recipe {recipe_path} sets lmbda / seq_kd), which continues each "
                "training block's prompt, but prompt_tokens is not set. Set prompt_tokens in the benchmark config "
                f"(e.g. 32 of block_size={self.config.block_size}: the completion is the rest)."
            )
        return True

    def row_stage(self, name: str, recipe_path: str, init_spec: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        c = self.config
        training = recipe_training_args(self._path(recipe_path), LM_OWNED_KEYS)
        if training.get("use_teacher_cache"):
            training["teacher_cache_dir"] = str(self.out / "teacher_cache")  # one cache, shared by the rows
        spec = {
            "stage": f"rows/{name}",
            "start": fingerprint(init_spec),
            "recipe": {k: v for k, v in training.items() if k != "teacher_cache_dir"},
            "max_steps": c.max_steps,
            "batch": c.per_device_train_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            **self._data_spec(),
        }
        train = self.blocks["train"]
        if self._on_policy(name, recipe_path, training):
            spec["prompt_tokens"] = c.prompt_tokens  # only here: the other rows' specs do not change with it
            train = prompted_blocks(train, c.prompt_tokens)
        stage_dir = self.out / "rows" / name

        def make_trainer(output_dir: str) -> DistillationTrainer:
            set_seed(c.seed)
            student = AutoModelForCausalLM.from_pretrained(self.out / "student_init", dtype=torch.float32)
            args = DistillationConfig(
                output_dir=output_dir, max_steps=c.max_steps,
                per_device_train_batch_size=c.per_device_train_batch_size,
                gradient_accumulation_steps=c.gradient_accumulation_steps, seed=c.seed, eval_strategy="no",
                save_strategy="steps", save_steps=c.save_steps, save_total_limit=1, logging_steps=c.logging_steps,
                report_to="none", disable_tqdm=False, **training,
            )  # fmt: skip
            return DistillationTrainer(
                model=student, teacher_model=self.teacher, args=args, train_dataset=train,
                processing_class=self.tokenizer, data_collator=default_data_collator,
            )  # fmt: skip

        result = run_trainer_stage(stage_dir, spec, make_trainer)
        self.stages.append(result)
        return stage_dir, {"recipe": recipe_path, "steps": result.info.get("global_step"), "seconds": result.seconds,
                           "spec": spec}  # fmt: skip

    def eval_stage(self, name: str, model_dir: str | Path, model_spec: dict[str, Any]) -> dict[str, Any]:
        spec = {"stage": f"eval/{name}", "model": fingerprint(model_spec), **self._data_spec(),
                "eval_batch_size": self.config.eval_batch_size, "per_block": True}  # fmt: skip

        def work(tmp: Path) -> dict:
            model = self.teacher if name == "teacher" else AutoModelForCausalLM.from_pretrained(model_dir)
            metrics = perplexity(model, self.blocks["eval"], self.config.eval_batch_size)
            metrics["params"] = sum(p.numel() for p in model.parameters())
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            return {"metrics": metrics}

        result = run_stage(self.out / "eval" / name, spec, work)
        self.stages.append(result)
        return result.info["metrics"]

    def run(self) -> dict[str, Any]:
        c = self.config
        rows = {c.baseline_name: c.baseline_recipe, **c.rows}
        for name, recipe in rows.items():  # every row's recipe is read and checked before any stage runs
            self._on_policy(name, recipe, recipe_training_args(self._path(recipe), LM_OWNED_KEYS))
        self.out.mkdir(parents=True, exist_ok=True)
        init_spec = self.student_init_stage()
        trained = {name: self.row_stage(name, recipe, init_spec) for name, recipe in rows.items()}
        teacher_spec = {"teacher": c.teacher_model_name_or_path}
        results_rows = [
            {"name": "teacher", "recipe": None, **self.eval_stage("teacher", self.teacher_path, teacher_spec)},
            {"name": "student_init", "recipe": None,
             **self.eval_stage("student_init", self.out / "student_init", init_spec)},
        ]  # fmt: skip
        for name, (folder, info) in trained.items():
            metrics = self.eval_stage(name, folder, info["spec"])
            results_rows.append({"name": name, "recipe": Path(info["recipe"]).stem, "train_steps": info["steps"],
                                 "train_seconds": info["seconds"], **metrics})  # fmt: skip
        teacher_ppl = results_rows[0]["perplexity"]
        base = next(r for r in results_rows if r["name"] == c.baseline_name)
        for row in results_rows:
            row["perplexity_vs_teacher"] = row["perplexity"] / teacher_ppl
            row["nll_vs_baseline"] = row["nll_per_token"] - base["nll_per_token"]
            if row is not base:
                args = (row["block_nll"], row["block_tokens"], base["block_nll"], base["block_tokens"])
                row["nll_vs_baseline_ci95"] = list(nll_difference_interval(*args, seed=c.seed))
        results = {
            "benchmark": c.name,
            "kind": LM_KIND,
            "config": {k: v for k, v in dataclasses.asdict(c).items() if k != "source_root"},
            "teacher": self.teacher_path,
            "output_dir": str(self.out),
            "budget": {"max_steps": c.max_steps, "per_device_train_batch_size": c.per_device_train_batch_size,
                       "gradient_accumulation_steps": c.gradient_accumulation_steps, "block_size": c.block_size,
                       "train_blocks": len(self.blocks["train"]), "eval_blocks": len(self.blocks["eval"])},
            "torch_threads": torch.get_num_threads(),
            "rows": results_rows,
            "stages": [{"path": s.path, "status": s.status, "seconds": round(s.seconds, 1)} for s in self.stages],
        }  # fmt: skip
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        table = format_lm_table(results_rows, c.baseline_name)
        (self.out / "results.md").write_text(f"# LM benchmark `{c.name}`\n\n{table}\n")
        results["paths"] = {"results_json": str(self.out / "results.json"), "results_md": str(self.out / "results.md")}
        return results


def prompted_blocks(blocks, prompt_tokens: int):
    """`blocks` with the labels of each block's first `prompt_tokens` positions set to -100: a prompt to continue,
    and a completion of the other positions (the data of an on-policy row)."""

    def mask(batch):
        return {"labels": [[-100] * prompt_tokens + ids[prompt_tokens:] for ids in batch["labels"]]}

    return blocks.map(mask, batched=True, desc=f"prompts of {prompt_tokens} tokens")


def format_lm_table(rows: list[dict[str, Any]], baseline: str = "baseline") -> str:
    """Markdown table of LM benchmark rows: held-out perplexity, its ratio to the teacher's, the nll difference to
    the `baseline` row with its 95% paired bootstrap interval over the held-out blocks, size and training."""

    def num(value, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    def interval(row) -> str:
        ci = row.get("nll_vs_baseline_ci95")
        return "-" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"

    lines = [
        f"| model | recipe | held-out perplexity | × teacher | nll / token | vs {baseline} (nll / token) | 95% CI vs "
        f"{baseline} | params (M) | train steps | train (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = None if r.get("params") is None else r["params"] / 1e6
        cells = [r["name"], r.get("recipe") or "-", num(r.get("perplexity"), ".2f"),
                 num(r.get("perplexity_vs_teacher"), ".3f"), num(r.get("nll_per_token"), ".4f"),
                 num(r.get("nll_vs_baseline"), "+.4f"), interval(r), num(params, ".1f"),
                 num(r.get("train_steps"), "d"), num(r.get("train_seconds"), ".0f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_lm_benchmark(config: LMBenchmarkConfig, root: str | os.PathLike | None = None, *, command: str | None = None):
    """Run (or resume, or reuse) every stage; with `results_file`, write the record (`"kind": "lm"`)."""
    root = root if root is not None else config.source_root
    if root is None:
        raise ValueError("root is None and the config was not read from a file: pass root=<the repository root>.")
    start = time.perf_counter()
    bench = LMBenchmark(config, root)
    started = git_state(bench.root)
    results = bench.run()
    if config.results_file:
        path = bench._path(config.results_file.format(name=config.name))
        command = command or f"run_lm_benchmark(name={config.name!r})"
        seconds = time.perf_counter() - start
        record = results_record(results, command=command, root=bench.root, started=started, invocation_seconds=seconds)
        write_json_atomic(path, {"kind": LM_KIND, **record})
        results["paths"]["record"] = str(path)
    return results
