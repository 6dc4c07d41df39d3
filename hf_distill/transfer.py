"""Transfer-set settings: which unlabelled source a `DataArguments` / `BenchmarkConfig` names, and its checks.

Kept apart from `hf_distill.config` (which imports it) so both configs share one set of rules without an import cycle.
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
