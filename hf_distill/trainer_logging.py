"""`TermLoggingMixin`: how `DistillationTrainer` logs each loss term on its own.

`compute_loss` adds every term's sum and item count to `self._term_metrics` (a `TermMetrics` buffer per mode:
train, eval, predict). These overrides flush the buffer into each log as `loss_<term>` (the per-item mean over the
logging window and every process), into `evaluate()`'s metrics as `eval_loss_<term>` and into `predict()`'s as
`test_loss_<term>`, switching the buffer `compute_loss` fills while an evaluation or a prediction runs.
"""

from __future__ import annotations

from functools import partial

__all__ = ["TermLoggingMixin"]


class TermLoggingMixin:
    """Mixed into `DistillationTrainer` before `transformers.Trainer`; needs `self._term_metrics`, `self._term_mode`
    and `self._term_prefix`."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every process reaches each log (the Trainer's own loss logging is a collective too), so the terms are
        # summed over processes here: one collective and one host sync per log, none per micro-step.
        logs.update(self._pop_terms(self._term_mode, self._term_prefix))  # in place: `evaluate()` returns this dict
        super().log(logs, start_time)

    def _pop_terms(self, mode: str, prefix: str) -> dict[str, float]:
        reduce = partial(self.accelerator.reduce, reduction="sum") if self.accelerator.num_processes > 1 else None
        terms = self._term_metrics.pop(mode, reduce)
        return terms if mode == "train" else {f"{prefix}_{key}": value for key, value in terms.items()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        previous = self._term_mode, self._term_prefix
        self._term_mode, self._term_prefix = "eval", metric_key_prefix
        self._term_metrics.clear("eval")
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._term_mode, self._term_prefix = previous

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict`, with each term's mean added to the returned metrics as `<prefix>_loss_<term>`."""
        previous = self._term_mode, self._term_prefix
        self._term_mode, self._term_prefix = "predict", metric_key_prefix
        self._term_metrics.clear("predict")  # predictions have their own buffer: nothing leaks into a later log
        try:
            output = super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            output.metrics.update(self._pop_terms("predict", metric_key_prefix))
            return output
        finally:
            self._term_mode, self._term_prefix = previous
