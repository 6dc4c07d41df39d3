"""Transfer-set settings: which unlabelled source a `DataArguments` / `BenchmarkConfig` names, and its checks.

Kept apart from `hf_distill.arguments` (which imports it) so both configs share one set of rules without an import
cycle.
"""

from __future__ import annotations

UNLABELLED_SOURCES = ("unlabelled_file", "unlabelled_split", "unlabelled_from_train")


def unlabelled_source(settings) -> str | None:
    """The transfer-set field set on `settings` (a `DataArguments` or a `BenchmarkConfig`), or None."""
    chosen = [name for name in UNLABELLED_SOURCES if getattr(settings, name)]
    return chosen[0] if chosen else None


def check_unlabelled_source(data_args) -> None:
    """Refuse transfer-set settings that cannot work: two sources, a split without a Hub dataset, and so on.

    Args:
        data_args: a `DataArguments` or a `BenchmarkConfig` (anything with their data fields).
    """
    chosen = [name for name in UNLABELLED_SOURCES if getattr(data_args, name)]
    if len(chosen) > 1:
        raise ValueError(
            f"set at most one unlabelled source, got {', '.join(f'{n}={getattr(data_args, n)!r}' for n in chosen)}. "
            "Keep one of them and unset the others."
        )
    if data_args.unlabelled_split is not None and not data_args.dataset_name:
        raise ValueError(
            f"unlabelled_split={data_args.unlabelled_split!r} needs a Hub dataset (dataset_name), got local files. "
            "Pass the unlabelled texts as unlabelled_file instead."
        )
    if data_args.unlabelled_split is not None and data_args.unlabelled_split in (
        data_args.train_split,
        data_args.eval_split,
    ):
        raise ValueError(
            f"unlabelled_split={data_args.unlabelled_split!r} is also the train or eval split. Use "
            "unlabelled_from_train=True for the training rows outside max_train_samples, or another split."
        )
    if data_args.unlabelled_from_train and data_args.max_train_samples is None:
        raise ValueError(
            "unlabelled_from_train=True needs max_train_samples (the labelled subset; the rest is unlabelled), got "
            "max_train_samples=None. Set e.g. max_train_samples=8000."
        )
    if data_args.max_unlabelled_samples is not None and not chosen:
        raise ValueError(
            f"max_unlabelled_samples={data_args.max_unlabelled_samples} has no unlabelled source to limit. Set "
            "unlabelled_file, unlabelled_split or unlabelled_from_train=True, or unset max_unlabelled_samples."
        )


# Augmentation (hf_distill.augment): texts made from the labelled training rows, labelled by the teacher only.
AUGMENT_METHODS = ("swap", "delete", "insert", "replace", "eda", "mlm")  # hf_distill.augment.AUGMENT_METHODS
AUGMENT_FIELDS = (
    "augment_method",
    "augment_n_per_row",
    "augment_p",
    "augment_top_k",
    "augment_mlm_model_name_or_path",
    "max_augmented_samples",
)
DEFAULT_AUGMENT_P = {"mlm": 0.4}  # TinyBERT's replacement probability; EDA's alpha is 0.1


def augment_p(settings) -> float:
    """The edit rate an augmentation uses: `augment_p`, or the method's default (0.1, 0.4 for `mlm`)."""
    if settings.augment_p is not None:
        return float(settings.augment_p)
    return DEFAULT_AUGMENT_P.get(settings.augment_method, 0.1)


def transfer_source(settings) -> str | None:
    """The field that gives `settings` a transfer set: its unlabelled source, else `augment_method`, else None."""
    return unlabelled_source(settings) or ("augment_method" if settings.augment_method else None)


def check_augment(settings) -> None:
    """Refuse augmentation settings that cannot work, naming the field (a `DataArguments` or a `BenchmarkConfig`)."""
    method = settings.augment_method
    if method is None:
        for name in ("max_augmented_samples", "augment_mlm_model_name_or_path"):
            if getattr(settings, name) is not None:
                raise ValueError(
                    f"{name}={getattr(settings, name)!r} has no augmentation to apply to. Set augment_method (one of "
                    f"{list(AUGMENT_METHODS)}), or unset {name}."
                )
        return
    if method not in AUGMENT_METHODS:
        raise ValueError(f"augment_method must be one of {list(AUGMENT_METHODS)} or unset, got {method!r}. Use 'eda'.")
    n = settings.augment_n_per_row
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"augment_n_per_row must be an integer >= 1, got {n!r}. Use e.g. 4.")
    p = settings.augment_p
    if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0):
        raise ValueError(f"augment_p must be a probability in [0, 1] or unset, got {p!r}. Use e.g. 0.1 (EDA).")
    k = settings.augment_top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"augment_top_k must be an integer >= 1, got {k!r}. Use e.g. 15 (TinyBERT).")
    if method == "mlm" and not settings.augment_mlm_model_name_or_path:
        raise ValueError(
            "augment_method='mlm' needs augment_mlm_model_name_or_path: a model with a trained masked-LM head (e.g. "
            "a bert-base-uncased folder) and its tokenizer. Or use augment_method='eda', which needs no model."
        )
    if method != "mlm" and settings.augment_mlm_model_name_or_path:
        raise ValueError(
            f"augment_mlm_model_name_or_path is only read by augment_method='mlm', got augment_method={method!r}. "
            "Unset it, or set augment_method='mlm'."
        )
    if getattr(settings, "text_pair_column", None):
        raise ValueError(
            f"augment_method={method!r} edits one text per row, got text_pair_column="
            f"{settings.text_pair_column!r}. Unset augment_method for pair tasks."
        )
    m = settings.max_augmented_samples
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"max_augmented_samples must be an integer >= 1 or unset, got {m!r}.")
