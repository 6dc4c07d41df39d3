"""Configuration: `DistillationConfig(TrainingArguments)`, the scripts' model and data arguments, `LayerMatch`."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from .losses import ATTENTION_LOSSES, FUSED_DIVERGENCES, HIDDEN_LOSSES, KD_LOGIT_LOSSES
from .transfer import check_augment, check_unlabelled_source, transfer_source, unlabelled_source

LOSS_WEIGHT_FIELDS = ("task_weight", "logits_weight", "hidden_weight", "embeddings_weight", "attention_weight")
LAYER_MAPPING_STRATEGIES = ("alternate", "uniform", "last")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_CACHE_DTYPES = ("float16", "float32")
DISTILL_ON = ("labels", "all_tokens")
# The values of `PretrainedConfig.problem_type`; `DataArguments.problem_type` picks one (None: from the labels).
PROBLEM_TYPES = ("single_label_classification", "regression", "multi_label_classification")
# The logit losses that take a parameter of their own: loss -> (its keyword, the DistillationConfig field giving it).
LOGIT_LOSS_PARAMETERS = {
    "generalized_jsd": ("beta", "jsd_beta"),
    "skew_kl": ("alpha", "skew_alpha"),
    "skew_reverse_kl": ("alpha", "skew_alpha"),
}


@dataclass(frozen=True)
class LayerMatch:
    """One pairing of a teacher layer with a student layer for an intermediate-feature loss.

    Args:
        teacher_layer: 0-based index of the teacher's transformer block.
        student_layer: 0-based index of the student's transformer block.
        feature: `"hidden"` (the block's output hidden states) or `"attention"` (its attention probabilities).
        loss: name of the loss, a key of `HIDDEN_LOSSES` or `ATTENTION_LOSSES`.
        weight: relative weight of this pairing inside its term (the term averages its pairings by these weights).
    """

    teacher_layer: int
    student_layer: int
    feature: str
    loss: str
    weight: float = 1.0

    @property
    def key(self) -> str:
        """Name used for this pairing's projection and in logs, e.g. `hidden_t7_s3`."""
        return f"{self.feature}_t{self.teacher_layer}_s{self.student_layer}"


@dataclass
class DistillationConfig(TrainingArguments):
    r"""Configuration of [`DistillationTrainer`]: the usual `TrainingArguments` plus the distillation objective.

    The student is trained on a weighted sum of terms, each logged on its own as `loss_<term>`:

        loss = task_weight * loss_task + logits_weight * loss_logits + hidden_weight * loss_hidden
             + embeddings_weight * loss_embeddings + attention_weight * loss_attention

    Parameters:
        temperature (`float`, defaults to `2.0`):
            Softmax temperature T of the logit term. KL-type logit losses are multiplied by T² (Hinton et al. 2015,
            https://arxiv.org/abs/1503.02531) so that their gradients keep their scale as T changes.
        task_weight (`float`, defaults to `0.5`):
            Weight of the task loss (cross-entropy on the labels; MSE for regression; binary cross-entropy per class
            for multi-label; shifted LM loss for causal LMs). The problem type is the model config's `problem_type`,
            else inferred as transformers does (`num_labels == 1`: regression; float labels: multi-label).
        logits_weight (`float`, defaults to `0.5`):
            Weight of the logit distillation term.
        hidden_weight (`float`, defaults to `0.0`):
            Weight of hidden-state matching over the pairings of `layer_mapping`.
        embeddings_weight (`float`, defaults to `0.0`):
            Weight of embedding-layer matching (TinyBERT).
        attention_weight (`float`, defaults to `0.0`):
            Weight of attention-probability matching over the pairings of `layer_mapping` (TinyBERT, MiniLM).
        logits_loss (`str`, defaults to `"kl"`):
            Logit divergence (a key of `KD_LOGIT_LOSSES`): `kl` (forward KL(teacher||student)), `reverse_kl`, `jsd`
            (Jensen-Shannon, beta 0.5), `mse` on raw logits, or one of the LM divergences: `generalized_jsd` (GKD's
            generalized JSD, teacher weight `jsd_beta`), `total_variation`, `skew_kl` / `skew_reverse_kl`
            (DistiLLM's skew KLs, skew `skew_alpha`). All but `mse` are softmax divergences times T². Regression heads
            need `mse` (a softmax over one output is constant: the trainer refuses the others); multi-label heads
            take `kl` (per-class sigmoid KL, `binary_kl_div_loss`) or `mse`.
        jsd_beta (`float`, defaults to `0.5`):
            `generalized_jsd` only: the teacher's weight beta in [0, 1], TRL's convention (`GKDConfig.beta`):
            `m = beta p_T + (1 - beta) p_S`, loss `beta KL(p_T||m) + (1 - beta) KL(p_S||m)`; 0 is the forward KL,
            1 the reverse KL, 0.5 the symmetric JSD (= `jsd`). Ignored by the other losses.
        skew_alpha (`float`, defaults to `0.1`):
            `skew_kl` / `skew_reverse_kl` only: the skew alpha in [0, 1) (DistiLLM uses 0.1): `KL(p_T || alpha p_T +
            (1 - alpha) p_S)`, resp. `KL(p_S || alpha p_S + (1 - alpha) p_T)`; 0 is the plain KL. Ignored by the
            other losses.
        logits_chunk_size (`int`, *optional*):
            Token-level students: compute the logit term over chunks of this many scored positions
            (`chunked_logit_loss`: each chunk's fp32 softmax intermediates and gradient at once, so a (tokens x
            vocabulary) divergence keeps one chunk of intermediates alive instead of several full copies; the logits
            themselves still exist). Same value and gradients as unchunked, up to summation order. With
            `fused_lm_head` it is the fused functions' chunk size (default 1024 there). `None`: unchunked. Sequence
            classifiers refuse it (their logits are (rows x classes)).
        fused_lm_head (`bool`, defaults to `False`):
            Causal-LM student and teacher: never materialise either model's (tokens x vocabulary) logits in training.
            Both models run with `logits_to_keep` empty (their LM heads see zero positions) and their last hidden
            states are kept; the logit term is `fused_linear_distill_loss` over both LM heads' weights (and biases)
            and the task term `fused_linear_cross_entropy` over the student's, a chunk of scored positions at a time.
            Values and gradients equal the plain path's up to summation order; hidden / embedding / attention terms
            are unchanged. Needs a divergence with a fused form (all but `mse`), no teacher cache, and models whose
            logits are a plain linear head of the last hidden state (refused otherwise: soft-capping, logit scales,
            ...), not sharded by FSDP or DeepSpeed ZeRO-3. Evaluation computes the same fused losses; when metrics
            need predictions (`compute_metrics`, `predict()`), the student's logits of the batch are computed from
            its hidden states under no_grad, for those metrics only.
        hidden_loss (`str`, defaults to `"mse"`):
            Hidden-state loss: `mse` or `cosine` (DistilBERT's cosine embedding loss).
        attention_loss (`str`, defaults to `"mse"`):
            Attention loss on probabilities: `mse` (TinyBERT) or `kl` (MiniLM).
        layer_mapping (`str`, defaults to `"uniform"`):
            Which teacher layer each student layer is matched with: `uniform` (TinyBERT: student layer m <-> teacher
            layer (m+1)·N/n - 1), `alternate` (the teacher layers `make_student` copies by default: evenly spaced,
            first and last included), `last` (last <-> last), or explicit `teacher->student` pairs such as
            `"1->0,3->1,5->2"`.
        teacher_dtype (`str`, *optional*):
            dtype the teacher runs in: `float32`, `bfloat16`, `float16` or `auto` (the checkpoint's). `None` keeps it
            as loaded; the student and its losses keep their own. On a CPU with native bfloat16 (`lscpu`:
            `avx512_bf16` / `amx_bf16`), `bfloat16` halved a MiniLM-L6 teacher's forward time (2.0x) with the same
            predicted class on 512 of 512 SST-2 rows, the student's KD terms within 0.3% and its gradient at cosine
            >= 0.99999 to float32's; a logits + hidden + attention step took 0.80x the time
            (`benchmarks/results/bench_teacher.json`, `bench_speed.json`). Not measured on CPUs without it, where
            bfloat16 is emulated: check with `scripts/bench_teacher.py`. (`inference_mode` vs `no_grad`: 1.00x.)
        use_teacher_cache (`bool`, defaults to `False`):
            Run the teacher over `train_dataset` once, store its outputs on disk (Arrow, see `hf_distill.cache`) and
            train from them without any teacher forward pass. The cache is keyed by the teacher's weights and
            config, the tokenizer, the data, and what is cached, and reused across epochs and runs. Evaluation still
            runs the teacher.
        teacher_cache_dir (`str`, *optional*):
            Parent directory of teacher caches, one sub-directory per fingerprint. `None` means
            `<output_dir>/teacher_cache`; point several runs at one directory to share caches.
        teacher_cache_top_k (`int`, *optional*):
            Cache only the teacher's k largest logits per position (for large vocabularies). The logit term then uses
            the teacher's distribution renormalised over those k entries; needs `logits_loss` `kl` or `jsd`.
        teacher_cache_dtype (`str`, defaults to `"float16"`):
            Storage dtype of cached hidden states, embeddings and attention maps: `float16` or `float32`.
        teacher_cache_attentions (`bool`, defaults to `False`):
            Also cache the attention maps of the matched teacher layers, needed for `attention_weight > 0` with the
            cache. Off by default because each costs heads x L x L values per layer per row (96 KiB in float16 for
            12 heads at L = 64), against L x hidden for a hidden state.
        distill_on (`str`, defaults to `"labels"`):
            Positions the logit term scores for token-level students (causal LM, masked LM, token classification):
            `labels` scores the positions the task loss scores, where the batch has token labels (`labels != -100`,
            with the causal shift: the logits at position i are scored where `labels[i + 1] != -100`, so prompt
            tokens, padding, the last position and non-first sub-words are left out), and every real token of the
            attention mask in unlabelled batches; `all_tokens` scores every real token of the attention mask. The
            term is normalised by the number of scored positions. Sequence classification ignores it (one row per
            sequence). Hidden-state, embedding and attention matching always use every real token (feature
            matching is about representations, not predictions).
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the logit term (> 0)."})
    task_weight: float = field(default=0.5, metadata={"help": "Weight of the task loss on the labels."})
    logits_weight: float = field(default=0.5, metadata={"help": "Weight of the logit distillation term."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of hidden-state matching."})
    embeddings_weight: float = field(default=0.0, metadata={"help": "Weight of embedding-layer matching."})
    attention_weight: float = field(default=0.0, metadata={"help": "Weight of attention-probability matching."})
    logits_loss: str = field(default="kl", metadata={"help": f"Logit divergence, one of {sorted(KD_LOGIT_LOSSES)}."})
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "generalized_jsd: teacher weight in [0, 1] (TRL's beta): 0 forward KL, 1 reverse KL."},
    )
    skew_alpha: float = field(
        default=0.1, metadata={"help": "skew_kl / skew_reverse_kl: skew in [0, 1) (DistiLLM: 0.1); 0 is the plain KL."}
    )
    logits_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Token-level students: compute the logit term over chunks of this many positions."},
    )
    fused_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Causal LMs: compute the logit and task terms from the last hidden states and LM heads, a chunk "
            "at a time, never materialising the (tokens x vocabulary) logits in training."
        },
    )
    hidden_loss: str = field(default="mse", metadata={"help": f"Hidden-state loss, one of {sorted(HIDDEN_LOSSES)}."})
    attention_loss: str = field(
        default="mse", metadata={"help": f"Attention loss on probabilities, one of {sorted(ATTENTION_LOSSES)}."}
    )
    layer_mapping: str = field(
        default="uniform",
        metadata={"help": "Layer pairing: 'uniform', 'alternate', 'last', or explicit pairs like '1->0,3->1'."},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={
            "help": f"dtype the teacher runs in, one of {TEACHER_DTYPES}; None keeps it as loaded. 'bfloat16' ran a "
            "MiniLM teacher 2x faster on a CPU with avx512_bf16 at unchanged KD terms (see the class docstring)."
        },
    )
    use_teacher_cache: bool = field(
        default=False,
        metadata={"help": "Compute the teacher's outputs on train_dataset once, cache them on disk, train from them."},
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Parent dir of teacher caches, one per fingerprint (None: <output_dir>/teacher_cache)."},
    )
    teacher_cache_top_k: int | None = field(
        default=None,
        metadata={"help": "Cache only the teacher's k largest logits per position (large vocabularies); None: all."},
    )
    teacher_cache_dtype: str = field(
        default="float16",
        metadata={"help": f"Storage dtype of cached hidden states and attention maps, one of {TEACHER_CACHE_DTYPES}."},
    )
    teacher_cache_attentions: bool = field(
        default=False,
        metadata={"help": "Also cache the matched layers' attention maps (heads x L x L per layer per row: large)."},
    )
    distill_on: str = field(
        default="labels",
        metadata={
            "help": f"Positions of the token-level logit term, one of {DISTILL_ON}: 'labels' = where labels != -100 "
            "(shifted for causal LMs), 'all_tokens' = the attention mask. Sequence classification ignores it."
        },
    )

    def __post_init__(self):
        # The trainer computes its own loss from the logits; the labels column must reach compute_loss and
        # prediction_step must return labels for metrics, whatever the model's forward signature says.
        if self.label_names is None:
            self.label_names = ["labels"]
        super().__post_init__()
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            # TrainingArguments accepts 0; evaluation would then fail only after training, past the checkpoints.
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}. Use e.g. 8.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}. Use e.g. 2.0.")
        for name in LOSS_WEIGHT_FIELDS:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}. Set it to 0 to switch the term off.")
        if all(getattr(self, name) == 0 for name in LOSS_WEIGHT_FIELDS):
            raise ValueError(
                f"all loss weights are 0 ({', '.join(LOSS_WEIGHT_FIELDS)}): nothing to train. "
                "Set e.g. task_weight=0.5 and logits_weight=0.5."
            )
        for name, table in (
            ("logits_loss", KD_LOGIT_LOSSES),
            ("hidden_loss", HIDDEN_LOSSES),
            ("attention_loss", ATTENTION_LOSSES),
        ):
            value = getattr(self, name)
            if value not in table:
                raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}.")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {TEACHER_DTYPES} or None, got {self.teacher_dtype!r}. "
                "Use 'bfloat16' to halve the teacher's memory on GPUs that support it."
            )
        if self.distill_on not in DISTILL_ON:
            raise ValueError(
                f"distill_on must be one of {DISTILL_ON}, got {self.distill_on!r}. Use 'labels' to score the labelled "
                "positions only, or 'all_tokens' for every real token."
            )
        parse_layer_mapping(self.layer_mapping)  # syntax check; ranges are checked against the models later
        self._check_lm_distillation()
        self._check_teacher_cache()

    def _check_lm_distillation(self) -> None:
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(
                f"jsd_beta must be in [0, 1], got {self.jsd_beta}. It is the teacher's weight in generalized_jsd "
                "(TRL's beta): 0 is the forward KL, 1 the reverse KL, 0.5 the symmetric JSD."
            )
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(
                f"skew_alpha must be in [0, 1), got {self.skew_alpha}. 0 is the plain KL and 1 would make the skew "
                "KLs 0 for every input; DistiLLM uses 0.1."
            )
        chunk = self.logits_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"logits_chunk_size must be an int >= 1 or None, got {chunk!r}. Use e.g. 1024 (positions per chunk), "
                "or None to compute the logit term in one piece."
            )
        if not self.fused_lm_head:
            return
        if self.logits_weight > 0 and self.logits_loss not in FUSED_DIVERGENCES:
            raise ValueError(
                f"fused_lm_head=True computes the logit term from the LM heads with a softmax divergence, but "
                f"logits_loss={self.logits_loss!r} compares raw logits. Use one of {sorted(FUSED_DIVERGENCES)}, or "
                "fused_lm_head=False."
            )
        if self.use_teacher_cache:
            raise ValueError(
                "fused_lm_head=True needs the teacher's last hidden states, but use_teacher_cache=True stores its "
                "logits. Set use_teacher_cache=False (the teacher then runs each step), or fused_lm_head=False."
            )

    @property
    def logits_loss_kwargs(self) -> dict[str, float]:
        """The keyword of its own the chosen logit loss takes (`beta=jsd_beta`, `alpha=skew_alpha`), else `{}`."""
        if self.logits_loss not in LOGIT_LOSS_PARAMETERS:
            return {}
        keyword, name = LOGIT_LOSS_PARAMETERS[self.logits_loss]
        return {keyword: getattr(self, name)}

    def _check_teacher_cache(self) -> None:
        if self.teacher_cache_top_k is not None and self.teacher_cache_top_k < 1:
            raise ValueError(
                f"teacher_cache_top_k must be >= 1 or None, got {self.teacher_cache_top_k}. Use e.g. 64, or None to "
                "cache all logits."
            )
        if self.teacher_cache_dtype not in TEACHER_CACHE_DTYPES:
            raise ValueError(
                f"teacher_cache_dtype must be one of {TEACHER_CACHE_DTYPES}, got {self.teacher_cache_dtype!r}. "
                "Use 'float16' to halve the cache's size."
            )
        if not self.use_teacher_cache:
            return
        top_k = self.teacher_cache_top_k
        reverse = self.logits_loss == "reverse_kl" or (self.logits_loss == "generalized_jsd" and self.jsd_beta == 1)
        if top_k is not None and self.logits_weight > 0 and (reverse or self.logits_loss == "mse"):
            beta = " with jsd_beta=1 (the reverse KL)" if self.logits_loss == "generalized_jsd" else ""
            raise ValueError(
                f"teacher_cache_top_k={top_k} keeps only the teacher's top-k logits, on which "
                f"logits_loss={self.logits_loss!r}{beta} is not defined (reverse KL is infinite outside the top-k, "
                "MSE needs every logit). Use logits_loss='kl' or 'jsd', or teacher_cache_top_k=None."
            )
        if self.attention_weight > 0 and not self.teacher_cache_attentions:
            raise ValueError(
                f"attention_weight={self.attention_weight} with use_teacher_cache=True needs the teacher's attention "
                "maps, which are not cached by default (heads x L x L per matched layer per row). Set "
                "teacher_cache_attentions=True to cache them, or attention_weight=0, or use_teacher_cache=False."
            )

    @property
    def needs_layer_mapping(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0


def parse_layer_mapping(value: str) -> str | list[tuple[int, int]]:
    """Parse `layer_mapping`: a strategy name, or explicit `teacher->student` pairs, into a name or a pair list."""
    if value in LAYER_MAPPING_STRATEGIES:
        return value
    pairs = []
    for item in str(value).replace(" ", "").split(","):
        sep = "->" if "->" in item else ":"
        parts = item.split(sep)
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(
                f"layer_mapping must be one of {LAYER_MAPPING_STRATEGIES} or teacher->student pairs like "
                f"'1->0,3->1', got {value!r} (could not read {item!r})."
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


@dataclass
class ModelArguments:
    """Which teacher to distill, into which student."""

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher: a Hub id or a local directory with a fine-tuned model."}
    )
    student_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An existing student (Hub id or directory). None builds one from the teacher's layers."},
    )
    student_num_layers: int | None = field(
        default=None, metadata={"help": "Depth of the student built from the teacher (default: half the teacher)."}
    )
    student_layers: str | None = field(
        default=None,
        metadata={"help": "Teacher layers copied into the student, e.g. '0,2,4' (default: evenly spaced)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer shared by teacher and student (default: the teacher's)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modeling code shipped with a checkpoint (teacher, student, tokenizer)."},
    )

    def __post_init__(self):
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise ValueError(
                f"student_num_layers must be >= 1, got {self.student_num_layers}. Use e.g. half the teacher's depth."
            )
        layers = self.student_layer_list
        if self.student_model_name_or_path and (layers is not None or self.student_num_layers is not None):
            given = "student_layers" if layers is not None else "student_num_layers"
            raise ValueError(
                f"student_model_name_or_path={self.student_model_name_or_path!r} loads an existing student, but "
                f"{given}={getattr(self, given)!r} asks to build one from the teacher's layers. Drop {given}, or "
                "drop student_model_name_or_path to build the student from the teacher."
            )
        if layers is not None and self.student_num_layers is not None and len(layers) != self.student_num_layers:
            raise ValueError(
                f"student_layers={self.student_layers!r} picks {len(layers)} teacher layers but "
                f"student_num_layers={self.student_num_layers} asks for {self.student_num_layers}. Drop one of them "
                f"(student_layers alone sets the depth), or set student_num_layers={len(layers)}."
            )

    @property
    def student_layer_list(self) -> list[int] | None:
        """`student_layers` as a list of ints (`None` if unset); a ValueError names the field if it does not parse."""
        if self.student_layers is None or str(self.student_layers).strip() == "":
            return None
        try:
            return [int(x) for x in str(self.student_layers).split(",")]
        except ValueError as e:
            raise ValueError(
                f"student_layers must be comma-separated teacher layer indices like '0,2,4', got "
                f"{self.student_layers!r}."
            ) from e


RESUME_CHOICES = ("auto", "never")


@dataclass
class RunArguments:
    """What `scripts/distill.py` does with an `output_dir` that already holds checkpoints.

    The settings that define a run are written to `<output_dir>/run_config.json` (and into every checkpoint) when
    training starts; see `hf_distill.resume`.

    Parameters:
        resume (`str`, defaults to `"auto"`):
            `auto`: resume from the last complete checkpoint if its recorded settings equal this run's, and refuse
            (listing the differing fields) if they do not; `never`: never resume, and refuse to start if
            `output_dir` already holds checkpoints (unless `overwrite_output_dir`).
        overwrite_output_dir (`bool`, defaults to `False`):
            Delete the checkpoints, `run_config.json` and the saved student of a previous run in `output_dir`, then
            start from scratch.
    """

    resume: str = field(
        default="auto",
        metadata={
            "help": "auto: resume from the last checkpoint if its settings match this run's (else refuse); never: "
            "start from scratch (refused if output_dir holds checkpoints, unless overwrite_output_dir)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete a previous run's checkpoints, run_config.json and student in output_dir first."},
    )

    def __post_init__(self):
        if self.resume not in RESUME_CHOICES:
            raise ValueError(
                f"resume must be one of {RESUME_CHOICES}, got {self.resume!r}. Use 'auto' to continue an interrupted "
                "run, or 'never' (with overwrite_output_dir=true) to start over."
            )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to tokenize it."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset, e.g. 'glue'."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration, e.g. 'sst2'."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.csv, .tsv, .json, .jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(default="validation", metadata={"help": "Split used for evaluation."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(
        default="label",
        metadata={
            "help": "Column with the labels: integer ids, class names (mapped to ids in sorted order), floats "
            "(regression) or json lists (multi-label: 0/1 per class, or class names)."
        },
    )
    problem_type: str | None = field(
        default=None,
        metadata={"help": f"Force the task, one of {PROBLEM_TYPES} (e.g. regression on integer scores); None: infer."},
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (longer ones are cut)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use a fixed shuffled subset of this many training rows (seeded by `seed`)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    unlabelled_file: str | None = field(
        default=None,
        metadata={
            "help": "Transfer set: a local .txt (one text a line) / .csv / .tsv / .json / .jsonl file of unlabelled "
            "texts (the text column; labels, if any, are ignored). Its rows add only teacher terms to training."
        },
    )
    unlabelled_split: str | None = field(
        default=None,
        metadata={"help": "Transfer set: a split of the Hub dataset `dataset_name` whose texts are used unlabelled."},
    )
    unlabelled_from_train: bool = field(
        default=False,
        metadata={
            "help": "Transfer set: the training rows outside the `max_train_samples` subset, used without their "
            "labels (needs max_train_samples)."
        },
    )
    max_unlabelled_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded shuffled subset of this many unlabelled rows (unset: all)."}
    )
    augment_method: str | None = field(
        default=None,
        metadata={
            "help": "Transfer set: augmented copies of the labelled training rows, labelled by the teacher only "
            "(hf_distill.augment): 'eda' (one EDA edit each: swap, delete, insert or replace words; no model), one "
            "of 'swap', 'delete', 'insert', 'replace', or 'mlm' (TinyBERT's masked-LM word replacement)."
        },
    )
    augment_n_per_row: int = field(default=4, metadata={"help": "Augmented texts made per labelled row."})
    augment_p: float | None = field(
        default=None, metadata={"help": "Edit rate: EDA's alpha (default 0.1) or, for 'mlm', TinyBERT's 0.4."}
    )
    augment_top_k: int = field(default=15, metadata={"help": "'mlm': candidates per word (TinyBERT: 15)."})
    augment_mlm_model_name_or_path: str | None = field(
        default=None, metadata={"help": "'mlm': a model with a trained masked-LM head, and its tokenizer."}
    )
    augment_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Store the augmented rows (Arrow) here, made once and reused (unset: made in memory)."},
    )
    max_augmented_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded shuffled subset of this many augmented rows (unset: all)."}
    )

    @property
    def unlabelled_source(self) -> str | None:
        """The field naming the transfer set (`unlabelled_file`, `unlabelled_split`, `unlabelled_from_train`)."""
        return unlabelled_source(self)

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}. Use e.g. 128.")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"problem_type must be one of {PROBLEM_TYPES} or unset, got {self.problem_type!r}. Leave it unset to "
                "infer the task from the label column."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_unlabelled_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}. Leave it unset to use every row.")
        check_unlabelled_source(self)
        check_augment(self)

    @property
    def transfer_source(self) -> str | None:
        """The field that adds teacher-only rows (an unlabelled source, else `augment_method`), or None."""
        return transfer_source(self)


SCRIPT_DATACLASSES = (ModelArguments, DataArguments, RunArguments, DistillationConfig)


def check_recipe_keys(recipe: dict[str, Any], dataclass_types=SCRIPT_DATACLASSES, source: str = "recipe") -> None:
    """Raise a ValueError for keys no dataclass knows, suggesting the closest valid key."""
    valid = {f.name for dc in dataclass_types for f in fields(dc) if f.init}
    unknown = [k for k in recipe if k not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"unknown key(s) in {source}: {', '.join(hints)}. Valid keys are the fields of "
            f"{', '.join(dc.__name__ for dc in dataclass_types)}."
        )


# Recipe fields holding local paths, resolved against the recipe's root (see `load_recipe`).
RECIPE_PATH_FIELDS = (
    "train_file",
    "validation_file",
    "unlabelled_file",
    "augment_cache_dir",
    "output_dir",
    "logging_dir",
    "teacher_cache_dir",
    "resume_from_checkpoint",
)
# Recipe fields holding a local directory or a Hub id (`org/name`): resolved only when they are a local path.
RECIPE_MODEL_FIELDS = (
    "teacher_model_name_or_path",
    "student_model_name_or_path",
    "tokenizer_name_or_path",
    "augment_mlm_model_name_or_path",
)
ROOT_MARKERS = ("pyproject.toml", ".git")


def recipe_root(path: str | os.PathLike) -> Path:
    """The root a recipe's relative paths are resolved against: the nearest folder above the recipe holding a
    `pyproject.toml` or `.git` (the repository the recipe belongs to), else the recipe's own folder."""
    folder = Path(path).resolve().parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in ROOT_MARKERS):
            return candidate
    return folder


def looks_local(value: str) -> bool:
    # Hub ids are `name` or `org/name`; anything with more slashes, or starting like a path, is a local path.
    return os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1


def resolve_recipe_paths(recipe: dict[str, Any], root: str | os.PathLike) -> dict[str, Any]:
    """A copy of `recipe` whose relative path-valued fields are made absolute against `root` (`~` expanded).

    `RECIPE_PATH_FIELDS` are always local paths. `RECIPE_MODEL_FIELDS` are resolved when they look like a local path
    (absolute, `./`, `../`, `~`, or more than one `/`) or name an existing folder under `root`; otherwise they are
    Hub ids and left alone.
    """
    root = Path(root)
    resolved = dict(recipe)
    for name in RECIPE_PATH_FIELDS + RECIPE_MODEL_FIELDS:
        value = resolved.get(name)
        if not isinstance(value, str) or not value:
            continue
        expanded = os.path.expanduser(value)
        candidate = expanded if os.path.isabs(expanded) else os.path.normpath(root / expanded)
        if name in RECIPE_PATH_FIELDS or looks_local(value) or os.path.exists(candidate):
            resolved[name] = candidate
    return resolved


def display_path(path: str | None, root: str | os.PathLike) -> str | None:
    """`path` as shown in a model card: relative to `root` when it lies under `root` or next to it (`../shared/x`),
    otherwise as given (an absolute path elsewhere, or a Hub id)."""
    if not path or not os.path.isabs(path):
        return path
    relative = os.path.relpath(path, root)
    parts = Path(relative).parts
    ups = next((i for i, part in enumerate(parts) if part != ".."), len(parts))  # relpath puts every ".." first
    return relative if ups <= 1 else path


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML (a flat mapping of dataclass fields), check its keys and resolve its relative paths.

    Relative paths in the recipe (data files, output and cache folders, local model folders: see
    `resolve_recipe_paths`) are resolved against [`recipe_root`], the repository holding the recipe (or the recipe's
    folder), so a recipe means the same files from any working directory. Values given on the command line are not
    recipe values: they stay as typed, relative to the working directory.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--config {path!r} does not exist. Recipes live under recipes/, e.g. "
            "recipes/minilm-sst2_to_minilm-l3/distilbert.yaml."
        )
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of field: value, got {type(recipe).__name__}.")
    check_recipe_keys(recipe, source=str(path))
    return resolve_recipe_paths(recipe, recipe_root(path))
