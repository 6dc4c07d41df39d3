"""Configuration: `DistillationConfig(TrainingArguments)`, the distillation objective; its checks run in
`__post_init__` (most of them in `hf_distill.config_checks` and the modules of the terms they configure).
`LayerMatch` and `parse_layer_mapping` (from `hf_distill.layer_match`) are re-exported here.

The scripts' other arguments (`ModelArguments`, `DataArguments`, `RunArguments`) are in `hf_distill.arguments`, and
reading recipes (`load_recipe`, `check_recipe_keys`, ...) in `hf_distill.recipes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .config_checks import (
    DISTILL_ON,
    LOSS_WEIGHT_FIELDS,
    TEACHER_CACHE_DTYPES,
    TEACHER_DTYPES,
    check_lm_distillation,
    check_objective,
    check_teacher_cache,
)
from .ema_teacher import check_ema_args
from .layer_match import LAYER_MAPPING_STRATEGIES, LayerMatch, parse_layer_mapping
from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, KD_LOGIT_LOSSES
from .losses.relations import RELATION_LOSSES
from .minilm_term import check_minilm_args
from .multi_teacher import check_multi_teacher_args
from .noisy_teacher import NOISE_MODES, check_noise_args
from .on_policy import check_on_policy_args
from .relation_term import RELATION_POOLINGS, check_relation_args
from .schedules import parse_schedules

__all__ = [
    "DISTILL_ON",
    "LOGIT_LOSS_PARAMETERS",
    "PROBLEM_TYPES",
    "LAYER_MAPPING_STRATEGIES",
    "LOSS_WEIGHT_FIELDS",
    "TEACHER_DTYPES",
    "DistillationConfig",
    "LayerMatch",
    "parse_layer_mapping",
]

# The values of `PretrainedConfig.problem_type`; `DataArguments.problem_type` picks one (None: from the labels).
PROBLEM_TYPES = ("single_label_classification", "regression", "multi_label_classification")
# The logit losses that take a parameter of their own: loss -> (its keyword, the DistillationConfig field giving it).
LOGIT_LOSS_PARAMETERS = {
    "generalized_jsd": ("beta", "jsd_beta"),
    "skew_kl": ("alpha", "skew_alpha"),
    "skew_reverse_kl": ("alpha", "skew_alpha"),
}


@dataclass
class DistillationConfig(TrainingArguments):
    r"""Configuration of [`DistillationTrainer`]: the usual `TrainingArguments` plus the distillation objective.

    The student is trained on a weighted sum of terms, each logged on its own as `loss_<term>`:

        loss = task_weight * loss_task + logits_weight * loss_logits + hidden_weight * loss_hidden
             + embeddings_weight * loss_embeddings + attention_weight * loss_attention
             + relation_weight * loss_relation + minilm_weight * loss_minilm

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
            >= 0.99999 to float32's; a logits + hidden + attention step took 0.77x the time (2 threads, quiet
            machine; 0.80x on 1 thread) (`benchmarks/results/bench_teacher.json`, `bench_speed.json`). Not measured
            on CPUs without it, where bfloat16 is emulated: check with `scripts/bench_teacher.py`. (`inference_mode`
            vs `no_grad`: 1.00x.)
        teacher_weights (`list[float]`, *optional*):
            Multi-teacher distillation (`DistillationTrainer(teacher_model=[...])`, `hf_distill.multi_teacher`): one
            weight >= 0 per teacher, in the list's order, normalised to sum 1; `None` is equal weights. The logit
            term's target is the weighted average of the teachers' probabilities at `temperature` (not of their
            logits: see `multi_teacher_average`); a teacher of weight 0 is not run.
        intermediate_teacher (`int`, defaults to `0`):
            Multi-teacher: the index of the teacher the hidden-state, attention, embedding and relation terms (and
            the layer mapping) are taken against; the other teachers only give logits.
        multi_teacher_average (`str`, defaults to `"probs"`):
            Multi-teacher: `probs` mixes the teachers' softmaxes at T (`sum_i w_i softmax(z_i / T)`); `logits` takes
            the softmax of the weighted mean of their logits (TextBrewer's multi-teacher target, a normalised
            geometric mean of the distributions), which `logits_loss="mse"` needs.
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
        teacher_cache_top_k_tail (`bool`, defaults to `False`):
            With `teacher_cache_top_k` = k: store per position the teacher's top-k ids, their log-probabilities
            `log_softmax(z / T)` at `temperature` and the log of the mass outside them (`8k + 4` bytes per token), and
            make the logit term the forward KL against the teacher's (k + 1)-bucket distribution
            (`sparse_kl_loss`): a proper distribution (the tail keeps the mass the top-k misses), whose KL is a
            lower bound of the full-vocabulary KL (equal when the teacher has no mass outside its top-k), instead
            of the KL against the teacher renormalised over its top-k. The logit term is this sparse KL whenever
            the flag is set, whether the teacher is cached or runs live (`use_teacher_cache=False`, and evaluation,
            which has no cache: the live logits are coarsened by `sparse_teacher_distribution` first), so training
            and evaluation measure the same quantity with and without the cache. The cache is built for one
            temperature: a run whose `temperature` differs from the cache's (a hyperparameter search, `model_init`)
            is refused, not trained on a stale T. Needs `logits_loss="kl"`, a softmax head (no regression or
            multi-label), and no `fused_lm_head`; `logits_chunk_size` does not chunk this term (it is computed in
            one piece; the teacher side is only `(tokens, k)`).
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
        lmbda (`float`, defaults to `0.0`):
            On-policy distillation of causal LMs (GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649): the
            fraction of training micro-batches whose completions the student samples itself (`generate` in eval
            mode, under no_grad) from each row's prompt (its real tokens before the first labelled one); the teacher
            scores them and the logit term is taken on the completion tokens only, normalised over the whole
            accumulation window (see `hf_distill.on_policy`). Which batches go on-policy is a function of `seed`, the
            step and the micro-batch (a resumed run makes the same choices). 0 is off, 1 every batch. Needs causal
            LMs, `task_weight=0` (the task term would be the student's cross-entropy on its own samples),
            `distill_on="labels"` and no teacher cache; evaluation uses the dataset's batches.
        seq_kd (`bool`, defaults to `False`):
            Sequence-level KD: the micro-batches not drawn for the student get completions the teacher samples
            (TRL's order: the student's `lmbda` draw first, then `seq_kd`). With `lmbda=0`, every batch.
        max_new_tokens (`int`, defaults to `128`):
            `lmbda` / `seq_kd`: the most tokens generated per completion; a completion also ends at its first EOS
            (the student's `generation_config.eos_token_id`, else the tokenizer's), which is labelled.
        generation_temperature (`float`, defaults to `1.0`):
            `lmbda` / `seq_kd`: sampling temperature (> 0) of the completions; 1.0 samples from the model's own
            distribution. Separate from `temperature`, the logit term's.
        generation_top_k (`int`, defaults to `0`):
            `lmbda` / `seq_kd`: sample among the k most likely tokens only; 0 is off. The checkpoint's own
            `generation_config` (repetition penalty, its top-k, ...) is never applied.
        generation_top_p (`float`, defaults to `1.0`):
            `lmbda` / `seq_kd`: nucleus sampling in (0, 1]; 1.0 is off.
        relation_weight (`float`, defaults to `0.0`):
            Weight of relation-based KD across the samples of a batch on pooled hidden states (see
            `hf_distill.relation_term`): `relation_loss` between the student's and the teacher's representations of
            the batch, the outputs of the blocks of `relation_layer` pooled by `relation_pooling`. Widths may differ
            (no projection). A relation is a per-micro-batch mean, not a per-item sum: under gradient accumulation
            each micro-batch's value is weighted by its share of the window's rows.
        relation_loss (`str`, defaults to `"rkd"`):
            `rkd_distance` (RKD distance-wise: Huber loss between pairwise distances normalised by their mean),
            `rkd_angle` (RKD angle-wise: Huber loss between the cosines of the angles of every triplet), `rkd`
            (distance + 2 x angle, the paper's weights), Park et al. 2019, https://arxiv.org/abs/1904.05068; or
            `sp` (similarity-preserving KD: squared Frobenius distance between the row-normalised B x B similarity
            matrices, over B²), Tung & Mori 2019, https://arxiv.org/abs/1907.09682.
        relation_pooling (`str`, defaults to `"mean"`):
            How a block's `(B, L, H)` hidden states become one vector per sample: `mean` over the real tokens of the
            attention mask, or `cls`, the first real token (what BERT / MPNet classification heads read; refused for
            causal LMs, whose first token sees only itself).
        relation_layer (`str`, *optional*):
            The `teacher->student` block pair whose outputs are compared, e.g. `"11->5"` (negative indices count
            from the end); `None` is the last block of each. With `use_teacher_cache` the teacher block must be one
            the cache stores (a hidden-matching pair's teacher layer), else the trainer refuses.
        minilm_weight (`float`, defaults to `0.0`):
            Weight of MiniLM's self-attention relation transfer between one teacher and one student layer (see
            `hf_distill.minilm_term`): the sum over `minilm_relations` of KL(teacher relation || student relation),
            each a mean over relation heads and real query positions (padding never enters), normalised by the
            window's real tokens like the other feature terms. The projections are split into
            `minilm_relation_heads` heads, so the widths and head counts may differ (no projection is learned).
            Needs the live teacher (`use_teacher_cache=False`: the cache stores no projections).
        minilm_relations (`str`, defaults to `"qq,kk,vv"`):
            Comma-separated relations: `qq`, `kk`, `vv` (`softmax(X X^T / sqrt(d_r))` of the queries, keys or
            values; MiniLMv2, Wang et al. 2021, https://arxiv.org/abs/2012.15828) and `attention` (the attention
            distribution `softmax(Q K^T / sqrt(d_r))`; MiniLM, Wang et al. 2020, https://arxiv.org/abs/2002.10957,
            whose objective is `"attention,vv"`). `attention` needs queries and keys of one width (refused under
            grouped-query attention). The projections are the outputs of the attention's query / key / value
            `Linear` layers, before rotary embeddings or position biases.
        minilm_relation_heads (`int`, defaults to `12`):
            Number of relation heads A; each model's projections of width H split into A heads of H / A, so A must
            divide every width the relations use in both models. With A equal to both models' attention heads,
            `attention` is MiniLM's per-head attention transfer (which needs equal head counts).
        minilm_layer (`str`, *optional*):
            The `teacher->student` block pair, e.g. `"11->5"` (negative indices count from the end); `None` is the
            last block of each (MiniLM's choice). MiniLMv2 studies the choice of teacher layer and recommends an
            upper-middle one rather than the last for large-size teachers (set e.g. `"-4->-1"` then).
        teacher_noise_std (`float`, defaults to `0.0`):
            Noisy teacher (Sau & Balasubramanian 2016, https://arxiv.org/abs/1610.09650): standard deviation of the
            Gaussian noise added to the teacher's logits (live or cached) before the logit term's softmax, in
            training only (never in evaluation); the logit term is then computed as usual. The rows perturbed and
            the noise are a function of `seed`, the step and the micro-batch, so a resumed run draws the same noise
            (see `hf_distill.noisy_teacher`). 0 is off. Needs `logits_weight > 0`, and logits to perturb: not with
            `teacher_cache_top_k_tail` or `fused_lm_head`.
        teacher_noise_fraction (`float`, defaults to `1.0`):
            Share of the samples (rows) whose teacher logits get noise, in (0, 1] (the paper's alpha): exactly
            `fraction x B` rows of each micro-batch when that is whole, that many on average otherwise.
        teacher_noise_mode (`str`, defaults to `"additive"`):
            `additive` (`z + std * eps`) or `multiplicative` (`z * (1 + std * eps)`, the `(1 + xi) z` form of
            KD_Lib's implementation of the paper).
        schedules (`list`, *optional*):
            Schedules of `temperature` or of loss weights, one per field, each applied at every optimizer step's
            beginning as a function of the step alone (`hf_distill.schedules.TermSchedule`: linear or cosine from
            `start` to `end` between `start_step` and `end_step`, a weight 0 before `start_step`). Each entry is a
            mapping of `TermSchedule`'s arguments (`{field: temperature, start: 4.0, end: 1.0, kind: cosine}`) or the
            same as `key=value` pairs (`"field=relation_weight start=25 start_step=100"`). A scheduled weight must be
            > 0 in the config (the trainer builds only the terms whose weight is > 0).
        ema_teacher (`bool`, defaults to `False`):
            Self-distillation from a mean teacher (Tarvainen & Valpola 2017, https://arxiv.org/abs/1703.01780; the
            EMA teacher of BYOL / DINO): the teacher is a frozen copy of the student (eval mode, dropout off) that
            becomes `ema_decay * teacher + (1 - ema_decay) * student` after every optimizer step (buffers are
            copied), and the student is distilled from it with the usual terms plus its task loss (see
            `hf_distill.ema_teacher`). No teacher model is used: a `teacher_model` passed to the trainer is not
            distilled from. The teacher's weights are in every checkpoint (`ema_teacher.safetensors`, restored on
            resume), never in the saved student. Not with `use_teacher_cache`, several teachers, `teacher_dtype`,
            FSDP or DeepSpeed.
        ema_decay (`float`, defaults to `0.999`):
            `ema_teacher`: the decay in [0, 1) of the moving average; 0 makes the teacher the student after each
            step. The average spans about `1 / (1 - ema_decay)` steps: use a smaller decay for short runs.
        ema_start_step (`int`, defaults to `0`):
            `ema_teacher`: the optimizer steps through which the teacher is a copy of the student before the average
            starts (a warm-up while the student changes fast); 0 averages from the first step.
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
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Multi-teacher: one weight >= 0 per teacher (normalised to sum 1); None: equal weights."},
    )
    intermediate_teacher: int = field(
        default=0,
        metadata={"help": "Multi-teacher: index of the teacher the hidden, attention, embedding, relation terms use."},
    )
    multi_teacher_average: str = field(
        default="probs",
        metadata={
            "help": "Multi-teacher logit target: 'probs' averages the teachers' probabilities at the temperature, "
            "'logits' their logits (TextBrewer; needed by logits_loss='mse')."
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
    teacher_cache_top_k_tail: bool = field(
        default=False,
        metadata={
            "help": "With teacher_cache_top_k: cache the top-k log-probabilities at `temperature` plus the tail mass, "
            "and train on the forward KL against that (k + 1)-bucket distribution (sparse_kl_loss), cached or live."
        },
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
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD, https://arxiv.org/abs/2306.13649): fraction in [0, 1] of batches "
            "whose completions the student samples; the logit term is taken on those completion tokens."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Sequence-level KD: the batches not drawn for the student get teacher-sampled completions."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "lmbda / seq_kd: most tokens per completion."})
    generation_temperature: float = field(
        default=1.0, metadata={"help": "lmbda / seq_kd: sampling temperature (> 0), not the loss's temperature."}
    )
    generation_top_k: int = field(default=0, metadata={"help": "lmbda / seq_kd: top-k sampling; 0 is off."})
    generation_top_p: float = field(default=1.0, metadata={"help": "lmbda / seq_kd: top-p in (0, 1]; 1.0 is off."})
    relation_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of relation-based KD on pooled hidden states across the batch (RKD, "
            "https://arxiv.org/abs/1904.05068; similarity-preserving KD, https://arxiv.org/abs/1907.09682)."
        },
    )
    relation_loss: str = field(
        default="rkd",
        metadata={
            "help": f"Relation loss, one of {sorted(RELATION_LOSSES)}: RKD distance / angle / both "
            "(https://arxiv.org/abs/1904.05068), or similarity-preserving 'sp' (https://arxiv.org/abs/1907.09682)."
        },
    )
    relation_pooling: str = field(
        default="mean",
        metadata={"help": f"Pooling of the relation term's hidden states, one of {RELATION_POOLINGS} (real tokens)."},
    )
    relation_layer: str | None = field(
        default=None,
        metadata={"help": "Relation term's 'teacher->student' block pair, e.g. '11->5'; None: the last of each."},
    )
    minilm_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of MiniLM self-attention relation transfer (https://arxiv.org/abs/2012.15828)."},
    )
    minilm_relations: str = field(
        default="qq,kk,vv",
        metadata={"help": "MiniLM relations from qq, kk, vv (MiniLMv2), attention (Q K^T); MiniLM: 'attention,vv'."},
    )
    minilm_relation_heads: int = field(
        default=12, metadata={"help": "MiniLM relation heads; must divide both models' query / key / value widths."}
    )
    minilm_layer: str | None = field(
        default=None,
        metadata={"help": "MiniLM 'teacher->student' block pair, e.g. '21->5'; None: the last block of each."},
    )
    teacher_noise_std: float = field(
        default=0.0,
        metadata={
            "help": "Noisy teacher (https://arxiv.org/abs/1610.09650): std (>= 0) of the Gaussian noise added to the "
            "teacher's logits before the logit term's softmax, in training only; 0 is off."
        },
    )
    teacher_noise_fraction: float = field(
        default=1.0,
        metadata={"help": "Noisy teacher (https://arxiv.org/abs/1610.09650): share in (0, 1] of the rows perturbed."},
    )
    teacher_noise_mode: str = field(
        default="additive",
        metadata={
            "help": f"Noisy teacher (https://arxiv.org/abs/1610.09650), one of {NOISE_MODES}: z + std*eps, or "
            "z * (1 + std*eps)."
        },
    )
    schedules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Schedules of temperature or loss weights (hf_distill.schedules.TermSchedule), each a mapping or "
            "'field=temperature start=4 end=1 kind=cosine [start_step=0] [end_step=N]'."
        },
    )

    ema_teacher: bool = field(
        default=False,
        metadata={
            "help": "Self-distillation from a mean teacher (https://arxiv.org/abs/1703.01780): the teacher is a "
            "moving average of the student's weights, updated after every optimizer step; no teacher model is used."
        },
    )
    ema_decay: float = field(
        default=0.999,
        metadata={"help": "ema_teacher: teacher = ema_decay * teacher + (1 - ema_decay) * student, in [0, 1)."},
    )
    ema_start_step: int = field(
        default=0,
        metadata={"help": "ema_teacher: steps through which the teacher is a copy of the student before averaging."},
    )

    def __post_init__(self):
        # The trainer computes its own loss from the logits; the labels column must reach compute_loss and
        # prediction_step must return labels for metrics, whatever the model's forward signature says.
        if self.label_names is None:
            self.label_names = ["labels"]
        super().__post_init__()
        check_objective(self)  # batch sizes, temperature, the loss weights and names, teacher_dtype, distill_on
        parse_layer_mapping(self.layer_mapping)  # syntax check; ranges are checked against the models later
        check_lm_distillation(self)  # jsd_beta, skew_alpha, logits_chunk_size, fused_lm_head
        check_teacher_cache(self)  # teacher_cache_* (top-k, dtype, top-k + tail, what the cache can serve)
        check_relation_args(self)  # relation_* (hf_distill.relation_term)
        check_minilm_args(self)  # minilm_* (hf_distill.minilm_term)
        check_noise_args(self)  # teacher_noise_* (hf_distill.noisy_teacher)
        check_multi_teacher_args(self)  # teacher_weights, intermediate_teacher (hf_distill.multi_teacher)
        parse_schedules(self.schedules, self)  # hf_distill.schedules
        check_on_policy_args(self)  # lmbda, seq_kd and the generation fields (hf_distill.on_policy)
        check_ema_args(self)  # ema_teacher, ema_decay, ema_start_step (hf_distill.ema_teacher)

    @property
    def logits_loss_kwargs(self) -> dict[str, float]:
        """The keyword of its own the chosen logit loss takes (`beta=jsd_beta`, `alpha=skew_alpha`), else `{}`."""
        if self.logits_loss not in LOGIT_LOSS_PARAMETERS:
            return {}
        keyword, name = LOGIT_LOSS_PARAMETERS[self.logits_loss]
        return {keyword: getattr(self, name)}

    @property
    def needs_layer_mapping(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0
