"""`DistillationTrainer`'s runs under `model_init` (`Trainer.hyperparameter_search`): before each trial's `train()`,
the trial is checked against what the trainer was built with, and the new student gets fresh projections."""

from __future__ import annotations

from .layer_mapping import hidden_size
from .student import num_layers


class SearchRunsMixin:
    """`_hp_search_setup` of `DistillationTrainer` (a mixin: the trainer's state is set up in its `__init__`)."""

    def _hp_search_setup(self, trial) -> None:
        """Before each `train()` with `model_init`: the Trainer applies the trial's values to `args`; then the run is
        checked against what `__init__` built, and the new student gets fresh projections and a clean term buffer."""
        from .trainer import TERMS  # the trainer's module imports this one

        super()._hp_search_setup(trial)
        if self.model_init is None:
            return
        run = f"trial {trial.number}" if hasattr(trial, "number") else "this run"
        for term in sorted({t for t in TERMS if t != "task" and getattr(self.args, f"{t}_weight") > 0}):
            if term not in self._built_terms:
                raise ValueError(
                    f"{run} sets {term}_weight={getattr(self.args, f'{term}_weight')}, but the trainer was built with "
                    f"{term}_weight=0, so it has no layer matches, projections or cached teacher outputs for that "
                    f"term and the value would not act. Build the trainer with {term}_weight > 0 to search it, or "
                    "leave it out of the search space."
                )
        shape = (type(self.model), num_layers(self.model), hidden_size(self.model.config))
        if shape != self._student_shape:
            raise ValueError(
                f"model_init returned a {shape[0].__name__} of {shape[1]} layers, width {shape[2]}, but the trainer "
                f"was built for a {self._student_shape[0].__name__} of {self._student_shape[1]} layers, width "
                f"{self._student_shape[2]}. model_init must build the same student every time."
            )
        if self.problem_type is not None and getattr(self.model.config, "problem_type", None) is None:
            self.model.config.problem_type = self.problem_type
        self._reset_projections()
        self._term_metrics.clear("train")  # a failed trial may have left terms behind
