"""The checks of `DistillationConfig` for language-model distillation and the teacher cache, run by its
`__post_init__`: each error names the field, the value and the fix, before any training step."""

from __future__ import annotations

from .losses import ATTENTION_LOSSES, FUSED_DIVERGENCES, HIDDEN_LOSSES, KD_LOGIT_LOSSES

TEACHER_CACHE_DTYPES = ("float16", "float32")
LOSS_WEIGHT_FIELDS = (
    "task_weight",
    "logits_weight",
    "hidden_weight",
    "embeddings_weight",
    "attention_weight",
    "relation_weight",
    "minilm_weight",
)
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
DISTILL_ON = ("labels", "all_tokens")


def check_objective(args) -> None:
    """Batch sizes, temperature, the loss weights (>= 0, not all 0) and loss names, teacher_dtype and distill_on."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        # TrainingArguments accepts 0; evaluation would then fail only after training, past the checkpoints.
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}. Use e.g. 8.")
    if not args.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {args.temperature}. Use e.g. 2.0.")
    for name in LOSS_WEIGHT_FIELDS:
        value = getattr(args, name)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}. Set it to 0 to switch the term off.")
    if all(getattr(args, name) == 0 for name in LOSS_WEIGHT_FIELDS):
        raise ValueError(
            f"all loss weights are 0 ({', '.join(LOSS_WEIGHT_FIELDS)}): nothing to train. "
            "Set e.g. task_weight=0.5 and logits_weight=0.5."
        )
    for name, table in (
        ("logits_loss", KD_LOGIT_LOSSES),
        ("hidden_loss", HIDDEN_LOSSES),
        ("attention_loss", ATTENTION_LOSSES),
    ):
        value = getattr(args, name)
        if value not in table:
            raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}.")
    if args.teacher_dtype is not None and args.teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(
            f"teacher_dtype must be one of {TEACHER_DTYPES} or None, got {args.teacher_dtype!r}. "
            "Use 'bfloat16' to halve the teacher's memory on GPUs that support it."
        )
    if args.distill_on not in DISTILL_ON:
        raise ValueError(
            f"distill_on must be one of {DISTILL_ON}, got {args.distill_on!r}. Use 'labels' to score the labelled "
            "positions only, or 'all_tokens' for every real token."
        )


def check_lm_distillation(args) -> None:
    """jsd_beta, skew_alpha, logits_chunk_size, and what fused_lm_head can be combined with."""
    if not 0.0 <= args.jsd_beta <= 1.0:
        raise ValueError(
            f"jsd_beta must be in [0, 1], got {args.jsd_beta}. It is the teacher's weight in generalized_jsd "
            "(TRL's beta): 0 is the forward KL, 1 the reverse KL, 0.5 the symmetric JSD."
        )
    if not 0.0 <= args.skew_alpha < 1.0:
        raise ValueError(
            f"skew_alpha must be in [0, 1), got {args.skew_alpha}. 0 is the plain KL and 1 would make the skew "
            "KLs 0 for every input; DistiLLM uses 0.1."
        )
    chunk = args.logits_chunk_size
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(
            f"logits_chunk_size must be an int >= 1 or None, got {chunk!r}. Use e.g. 1024 (positions per chunk), "
            "or None to compute the logit term in one piece."
        )
    if not args.fused_lm_head:
        return
    if args.logits_weight > 0 and args.logits_loss not in FUSED_DIVERGENCES:
        raise ValueError(
            f"fused_lm_head=True computes the logit term from the LM heads with a softmax divergence, but "
            f"logits_loss={args.logits_loss!r} compares raw logits. Use one of {sorted(FUSED_DIVERGENCES)}, or "
            "fused_lm_head=False."
        )
    if args.use_teacher_cache:
        raise ValueError(
            "fused_lm_head=True needs the teacher's last hidden states, but use_teacher_cache=True stores its "
            "logits. Set use_teacher_cache=False (the teacher then runs each step), or fused_lm_head=False."
        )


def check_teacher_cache(args) -> None:
    """teacher_cache_top_k, teacher_cache_dtype, the top-k + tail form, and the terms a cache can serve."""
    if args.teacher_cache_top_k is not None and args.teacher_cache_top_k < 1:
        raise ValueError(
            f"teacher_cache_top_k must be >= 1 or None, got {args.teacher_cache_top_k}. Use e.g. 64, or None to "
            "cache all logits."
        )
    if args.teacher_cache_dtype not in TEACHER_CACHE_DTYPES:
        raise ValueError(
            f"teacher_cache_dtype must be one of {TEACHER_CACHE_DTYPES}, got {args.teacher_cache_dtype!r}. "
            "Use 'float16' to halve the cache's size."
        )
    if args.teacher_cache_top_k_tail:
        _check_top_k_tail(args)
    if not args.use_teacher_cache:
        return
    top_k = args.teacher_cache_top_k
    reverse = args.logits_loss == "reverse_kl" or (args.logits_loss == "generalized_jsd" and args.jsd_beta == 1)
    if top_k is not None and args.logits_weight > 0 and (reverse or args.logits_loss == "mse"):
        beta = " with jsd_beta=1 (the reverse KL)" if args.logits_loss == "generalized_jsd" else ""
        raise ValueError(
            f"teacher_cache_top_k={top_k} keeps only the teacher's top-k logits, on which "
            f"logits_loss={args.logits_loss!r}{beta} is not defined (reverse KL is infinite outside the top-k, "
            "MSE needs every logit). Use logits_loss='kl' or 'jsd', or teacher_cache_top_k=None."
        )
    if args.attention_weight > 0 and not args.teacher_cache_attentions:
        raise ValueError(
            f"attention_weight={args.attention_weight} with use_teacher_cache=True needs the teacher's attention "
            "maps, which are not cached by default (heads x L x L per matched layer per row). Set "
            "teacher_cache_attentions=True to cache them, or attention_weight=0, or use_teacher_cache=False."
        )


def _check_top_k_tail(args) -> None:
    # Checked whether or not the cache is on: the flag makes the logit term the sparse KL, cached or live.
    if args.teacher_cache_top_k is None:
        raise ValueError(
            "teacher_cache_top_k_tail=True stores the teacher's top-k log-probabilities plus the tail mass, but "
            "teacher_cache_top_k is None. Set teacher_cache_top_k (e.g. 32), or teacher_cache_top_k_tail=False."
        )
    if args.logits_loss != "kl":
        raise ValueError(
            f"teacher_cache_top_k_tail=True makes the logit term the forward KL against the teacher's top-k + "
            f"tail distribution, but logits_loss={args.logits_loss!r}. Set logits_loss='kl', or "
            "teacher_cache_top_k_tail=False (the top-k cache then renormalises the teacher over its top-k)."
        )
    if args.fused_lm_head:
        raise ValueError(
            "teacher_cache_top_k_tail=True computes the logit term from the student's logits and the teacher's "
            "top-k + tail, which fused_lm_head=True (no logits, both LM heads) has no form of. Set "
            "fused_lm_head=False (logits_chunk_size bounds the other terms' memory), or "
            "teacher_cache_top_k_tail=False."
        )
