"""The life of the trainer-owned projections: optimizer groups, gradients across processes, clipping, checkpoints.

The projections (one `nn.Linear` per hidden-state pairing when student and teacher widths differ, built by
`layer_mapping.build_projections`) live outside the student: DDP does not average their gradients, the Trainer
neither clips nor zeroes them, and its checkpoints do not hold them. `DistillationTrainer` calls these functions
from the Trainer hooks that do those things for the student.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from transformers import TrainerCallback

PROJECTIONS_NAME = "projections.pt"


def projection_param_groups(projections: nn.ModuleDict, decay_names: Iterable[str], weight_decay: float) -> list:
    """Optimizer groups of the projections: `weight_decay` on `decay_names`, 0 on the rest (biases, norms)."""
    decay = set(decay_names)
    groups = []
    for decayed, value in ((True, weight_decay), (False, 0.0)):
        params = [p for n, p in projections.named_parameters() if (n in decay) == decayed]
        if params:
            groups.append({"params": params, "weight_decay": value})
    return groups


def average_projection_grads(projections: nn.ModuleDict, num_processes: int) -> None:
    """Average the projections' gradients over processes (exact after every micro-step: averaging is linear)."""
    for p in projections.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= num_processes


def clip_with_projections(
    student_norm: torch.Tensor | float,
    student_params: Iterable[nn.Parameter],
    projections: nn.ModuleDict,
    max_norm: float,
) -> torch.Tensor:
    """Clip student and projection gradients by their one global norm, as `clip_grad_norm_` over both would.

    Args:
        student_norm: the student's total gradient norm, already reduced over processes / shards (as the Trainer's
            accelerator computes it).
        student_params: the student's parameters (their local gradients, or gradient shards, are scaled).
        projections: the projections, replicated on every process.
        max_norm: `max_grad_norm`.

    Returns:
        The pre-clip global norm, a 0-dim tensor (nothing is read back to the host).
    """
    student_norm = torch.as_tensor(student_norm, dtype=torch.float32)
    device = student_norm.device
    norms = [student_norm] + [
        torch.linalg.vector_norm(p.grad.float()).to(device) for p in projections.parameters() if p.grad is not None
    ]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s coefficient
    for p in [*student_params, *projections.parameters()]:
        if p.grad is not None:
            p.grad.mul_(coefficient.to(p.grad.device))
    return total


def save_projections(projections: nn.ModuleDict, match_keys: list[str], output_dir: str) -> None:
    """Write the projections and the layer matches they belong to into a checkpoint (atomically)."""
    tmp = os.path.join(output_dir, PROJECTIONS_NAME + ".tmp")
    torch.save({"layer_matches": match_keys, **projections.state_dict()}, tmp)
    os.replace(tmp, os.path.join(output_dir, PROJECTIONS_NAME))


def read_projections(
    checkpoint: str, projections: nn.ModuleDict, match_keys: list[str], layer_mapping: str, device
) -> dict | None:
    """The checkpoint's projection state, after checking it belongs to this run's layer matches and projections.

    Returns:
        The state dict to load into `projections`, or None when the checkpoint has none and this run needs none.

    Raises:
        ValueError: the checkpoint recorded other layer matches, or other projections, naming both.
        FileNotFoundError: this run learns projections and the checkpoint has none.
    """
    path = os.path.join(checkpoint, PROJECTIONS_NAME)
    if not os.path.isfile(path):
        if len(projections):
            raise FileNotFoundError(
                f"resume_from_checkpoint={checkpoint!r} has no {PROJECTIONS_NAME}, but this run learns projections "
                f"({list(projections)}). Resume from a checkpoint of the same recipe."
            )
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    recorded = list(state.pop("layer_matches", []))
    if recorded != match_keys:
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} was trained with layer matches {recorded}, but this run matches "
            f"{match_keys} (layer_mapping={layer_mapping!r}). Its projections belong to the old pairing: resume with "
            "the checkpoint's layer_mapping, or start a new run in a fresh output_dir."
        )
    if set(state) != set(projections.state_dict()):
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} holds projections {sorted(state)}, but this run learns "
            f"{sorted(projections.state_dict())} (hidden_weight / embeddings_weight changed?). Resume with the "
            "checkpoint's settings, or start a new run in a fresh output_dir."
        )
    return state


class ZeroProjectionGrads(TrainerCallback):
    """The Trainer zeroes the student's gradients after each optimizer step; the projections need the same."""

    def __init__(self, projections: nn.ModuleDict):
        self.projections = projections

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)
