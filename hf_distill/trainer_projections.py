"""`ProjectionsMixin`: the Trainer hooks through which `DistillationTrainer` treats its projections like the student.

The projections (`self.projections`, one `nn.Linear` per hidden-state pairing when student and teacher widths
differ) live outside the student, so the Trainer does not know them. These overrides put them in the optimizer (no
weight decay on biases), average their gradients over processes (DDP only averages the student's), clip the student
and the projections by one global norm, and save / restore them with every checkpoint; each `model_init` run starts
from fresh ones. The helpers they call are in
`hf_distill.projections`.
"""

from __future__ import annotations

import torch

from .layer_mapping import build_projections, hidden_size
from .projections import (
    average_projection_grads,
    clip_with_projections,
    projection_param_groups,
    read_projections,
    save_projections,
)

__all__ = ["ProjectionsMixin"]


class ProjectionsMixin:
    """Mixed into `DistillationTrainer` before `transformers.Trainer`; needs `self.projections` and
    `self.layer_matches`."""

    def _project(self, key: str, student_features: torch.Tensor) -> torch.Tensor:
        """The student's features mapped into the teacher's width by pairing `key`'s projection (as is without one)."""
        if key in self.projections:
            layer = self.projections[key]
            return layer(student_features.to(layer.weight.dtype))
        return student_features

    def _reset_projections(self) -> None:
        """Fresh projections for a new `model_init` run: every run starts from the same ones (seeded by
        `args.seed`), whatever the runs before it trained them to."""
        if not len(self.projections):
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            fresh = build_projections(
                self.layer_matches,
                hidden_size(self.model.config),
                hidden_size(self.teacher.config),
                embeddings="embeddings" in self.projections,
            )
        self.projections.load_state_dict(fresh.state_dict())

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if len(self.projections):
            already = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in already for p in self.projections.parameters()):
                # As the Trainer does for the student: no weight decay on biases (nor on norm layers, if any).
                decay = self.get_decay_parameter_names(self.projections)
                for group in projection_param_groups(self.projections, decay, self.args.weight_decay):
                    optimizer.add_param_group(group)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if len(self.projections) and self.accelerator.num_processes > 1:
            # The projections live outside the DDP-wrapped student, so DDP does not average their gradients.
            average_projection_grads(self.projections, self.accelerator.num_processes)
        return loss

    def _clip_grad_norm(self, model):
        """Clip the student's and the projections' gradients by one global norm; returns that pre-clip norm."""
        if not len(self.projections):
            return super()._clip_grad_norm(model)
        # The student's norm as the Trainer computes it (DDP, FSDP shards, mixed meshes), without clipping: the
        # accelerator call unscales fp16 gradients once, the projections' too (they are in the same optimizer).
        if self._has_mixed_mesh_grads(model):
            student_norm = self._mixed_mesh_grad_norm(model, float("inf"))
        else:
            student_norm = self.accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        return clip_with_projections(student_norm, model.parameters(), self.projections, self.args.max_grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if len(self.projections) and self.args.should_save:
            save_projections(self.projections, [m.key for m in self.layer_matches], output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = None
        if checkpoint is not None:
            # Checked before the optimizer state: a changed mapping changes the projections, hence the groups.
            keys = [m.key for m in self.layer_matches]
            state = read_projections(checkpoint, self.projections, keys, self.args.layer_mapping, self.args.device)
        super()._load_optimizer_and_scheduler(checkpoint)
        if state is not None and len(self.projections):
            self.projections.load_state_dict(state)
