"""`LayerMatch`, the typed record of one teacher-layer / student-layer pairing, and the syntax of `layer_mapping`.

Re-exported by `hf_distill.config`; the pairings are resolved against the models in `hf_distill.layer_mapping`.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_MAPPING_STRATEGIES = ("alternate", "uniform", "last")


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
