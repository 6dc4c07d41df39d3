"""Accuracy, shipped with hf-distill so `evaluate` can load it from a local path with no Hub access."""

import datasets
import evaluate

_DESCRIPTION = "Accuracy: the proportion of predictions equal to the references, (TP + TN) / (TP + TN + FP + FN)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the fraction correct; `False` returns the count.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float` or `int`).
"""

_CITATION = """
@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, journal={JMLR}, volume={12},
 pages={2825--2830}, year={2011}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        weights = sample_weight if sample_weight is not None else [1.0] * len(predictions)
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        total = sum(weights)
        if not normalize:
            return {"accuracy": correct}
        return {"accuracy": float(correct / total) if total else 0.0}
