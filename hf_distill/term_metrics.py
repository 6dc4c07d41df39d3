"""Per-term loss logging and the non-finite-loss guard of `DistillationTrainer`.

Every term's per-item sum and item count are accumulated on the device, one buffer per mode (train, eval, predict),
and read back once per log: summed over processes (one collective for all terms), divided once. So the logged
`loss_<term>` is the exact per-item mean over the logging window and every process, a term without items in the
window is left out (never NaN), and no micro-step waits for the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite, before the optimizer applies its gradients."""


class TermMetrics:
    """Device-side sums and counts of loss terms, one `(len(terms), 2)` buffer per mode.

    Args:
        terms: the term names, in a fixed order (every process must reduce the same shape).
        device: where the buffers live (the training device).
    """

    def __init__(self, terms: tuple[str, ...], device: torch.device):
        self.terms = tuple(terms)
        self.device = torch.device(device)
        # Exact integer counts up to 2**53 tokens per window; MPS has no float64.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._buffers: dict[str, torch.Tensor] = {}

    def add(self, mode: str, name: str, total: torch.Tensor, count: torch.Tensor | int) -> None:
        """Add a micro-batch's summed loss `total` over `count` items of term `name` (no host sync)."""
        buffer = self._buffers.get(mode)
        if buffer is None:
            buffer = self._buffers[mode] = torch.zeros(len(self.terms), 2, dtype=self.dtype, device=self.device)
        i = self.terms.index(name)
        buffer[i, 0] += total.detach().to(device=self.device, dtype=self.dtype)
        buffer[i, 1] += count.to(device=self.device, dtype=self.dtype) if torch.is_tensor(count) else count

    def pop(self, mode: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The per-item mean of each term of `mode` since the last pop, summed over processes by `reduce`.

        Every process must call this at the same points (as `Trainer.log` is called): `reduce` is a collective, run
        on a zero buffer where this process has nothing.

        Returns:
            `{"loss_<term>": mean}` for the terms with at least one item; the buffer is emptied.
        """
        buffer = self._buffers.pop(mode, None)
        if buffer is None:
            buffer = torch.zeros(len(self.terms), 2, dtype=self.dtype, device=self.device)
        if reduce is not None:
            buffer = reduce(buffer)
        values = buffer.tolist()  # the one host sync of this log
        return {f"loss_{name}": total / count for name, (total, count) in zip(self.terms, values) if count > 0}

    def clear(self, mode: str) -> None:
        self._buffers.pop(mode, None)


class NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first optimizer step whose loss was NaN or infinite, naming the terms and the step.

    `observe` runs on every micro-step and only records, on the device, whether the summed loss was finite and the
    terms of the first bad micro-step; the check reads that flag back once per optimizer step, before the step is
    taken, so the weights never see a non-finite gradient and no checkpoint of them is written.
    """

    def __init__(self, terms: tuple[str, ...]):
        self.terms = tuple(terms)
        self._bad: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._computed: set[str] = set()

    def observe(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Record one micro-step's summed loss and its terms (device ops only)."""
        loss = loss.detach()
        values = torch.zeros(len(self.terms), device=loss.device)
        for name, value in terms.items():
            values[self.terms.index(name)] = value.detach().float()
        self._computed.update(terms)
        bad = ~torch.isfinite(loss)
        if self._bad is None:
            self._bad, self._values = bad, values
        else:
            # Keep the values of the first bad micro-step of this optimizer step.
            self._values = torch.where(self._bad | ~bad, self._values, values)
            self._bad = self._bad | bad

    def check(self, step: int) -> None:
        """Raise `NonFiniteLossError` if a micro-step since the last check had a non-finite loss."""
        bad, values, computed = self._bad, self._values, self._computed
        self._bad, self._values, self._computed = None, None, set()
        if bad is None or not bool(bad):  # one host sync per optimizer step
            return
        named = {name: v for name, v in zip(self.terms, values.tolist()) if name in computed}
        culprits = [name for name, v in named.items() if v != v or v in (float("inf"), float("-inf"))]
        listing = ", ".join(f"loss_{name}={v}" for name, v in named.items())
        raise NonFiniteLossError(
            f"the training loss is not finite at step {step}: non-finite term(s) {', '.join(culprits) or '(none)'} "
            f"({listing}). The optimizer step was not taken. Lower learning_rate, set max_grad_norm (e.g. 1.0), run "
            "the teacher in float32 (teacher_dtype='float32') or bf16 instead of fp16, and check that step's inputs."
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.check(state.global_step + 1)
