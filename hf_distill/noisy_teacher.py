"""Noisy teacher (Sau & Balasubramanian 2016, "Deep Model Compression: Distilling Knowledge from Noisy Teachers",
https://arxiv.org/abs/1610.09650): perturb the teacher's logits with Gaussian noise for a fraction of the samples.

Learning from a teacher whose logits are perturbed acts like learning from several teachers and regularises the
student. With `teacher_noise_std > 0`, each training micro-batch's teacher logits (live or cached) get noise before
the softmax of the logit term, which is then computed as usual (same divergence, temperature and T² scaling):

- `additive` (the default): `z + std * eps`, `eps ~ N(0, 1)` per logit;
- `multiplicative`: `z * (1 + std * eps)`, the `(1 + xi) z` form used by KD_Lib's implementation of the paper.

Only `teacher_noise_fraction` of the rows (samples; every position and class of a chosen row) are perturbed.
Which rows and which noise is a function of `(seed, global_step, micro-batch index within the step, process index)`
only (`noise_generator`), so a run resumed from a checkpoint draws exactly the noise the uninterrupted run drew, and
the noise never touches the global RNGs (dropout, data order). Evaluation never adds noise.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["NOISE_MODES", "TeacherNoise", "check_noise_args", "noise_generator", "noisy_rows", "noisy_teacher_logits"]

NOISE_MODES = ("additive", "multiplicative")


def check_noise_args(args) -> None:
    """`DistillationConfig`'s checks of `teacher_noise_std`, `teacher_noise_fraction` and `teacher_noise_mode`."""
    if not args.teacher_noise_std >= 0:
        raise ValueError(f"teacher_noise_std must be >= 0, got {args.teacher_noise_std}. Use e.g. 0.5, or 0 (off).")
    if not 0 < args.teacher_noise_fraction <= 1:
        raise ValueError(
            f"teacher_noise_fraction must be in (0, 1], got {args.teacher_noise_fraction}. Use e.g. 0.5 (half the "
            "samples), or 1.0 (all)."
        )
    if args.teacher_noise_mode not in NOISE_MODES:
        raise ValueError(f"teacher_noise_mode must be one of {NOISE_MODES}, got {args.teacher_noise_mode!r}.")
    if args.teacher_noise_std == 0:
        return
    without = [
        reason
        for reason, present in (
            ("logits_weight=0 (there is no logit term)", args.logits_weight == 0),
            ("teacher_cache_top_k_tail=True (the teacher is log-probabilities)", args.teacher_cache_top_k_tail),
            ("fused_lm_head=True (no logits are made)", args.fused_lm_head),
        )
        if present
    ]
    if without:
        raise ValueError(
            f"teacher_noise_std={args.teacher_noise_std} perturbs the teacher's logits before the logit term's "
            f"softmax, but {' and '.join(without)}. Set teacher_noise_std=0, or change those fields."
        )


def noise_generator(
    seed: int, step: int, micro_step: int, process: int, device: torch.device | str
) -> torch.Generator:
    """A generator on `device` seeded from `(seed, step, micro_step, process)` alone (SHA-256 of the four, so
    neighbouring steps get unrelated streams)."""
    digest = hashlib.sha256(f"hf-distill-noisy-teacher/{seed}/{step}/{micro_step}/{process}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return generator


def noisy_rows(batch: int, fraction: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """`(batch,)` bool: which rows get noise. `floor(fraction * batch + u)` rows, `u ~ U[0, 1)`, chosen at random:
    exactly `fraction * batch` rows when that is a whole number, that many on average otherwise (a fraction of 0.1
    still perturbs batches of 4), without reading anything back to the host."""
    ranks = torch.randperm(batch, generator=generator, device=device).float()
    threshold = fraction * batch + torch.rand((), generator=generator, device=device)
    return ranks < threshold.floor()


def noisy_teacher_logits(
    logits: torch.Tensor,
    *,
    std: float,
    fraction: float = 1.0,
    generator: torch.Generator | None = None,
    mode: str = "additive",
) -> torch.Tensor:
    """The teacher's logits with Gaussian noise on a `fraction` of the rows (see the module docstring).

    Args:
        logits: `(B, C)` or `(B, L, V)` teacher logits (-inf entries of a top-k cache stay -inf).
        std: standard deviation of the noise, >= 0; 0 returns `logits` itself, untouched.
        fraction: share of the rows (samples) perturbed, in (0, 1].
        generator: the random stream (`noise_generator`), on `logits`' device; None uses the global one.
        mode: `"additive"` (`z + std * eps`) or `"multiplicative"` (`z * (1 + std * eps)`).

    Returns:
        Logits of the same shape and dtype.
    """
    if std == 0:
        return logits
    if mode not in NOISE_MODES:
        raise ValueError(f"teacher_noise_mode must be one of {NOISE_MODES}, got {mode!r}.")
    chosen = noisy_rows(logits.shape[0], fraction, generator, logits.device)
    eps = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    eps = eps * chosen.view(-1, *([1] * (logits.dim() - 1)))
    noise = std * eps if mode == "additive" else logits.float() * (std * eps)
    # Where a row is not chosen eps is 0, but -inf * 0 is NaN: leave non-finite logits (a top-k cache's -inf) alone.
    noise = torch.where(torch.isfinite(logits), noise, 0.0)
    return (logits.float() + noise).to(logits.dtype)


class TeacherNoise:
    """The trainer's noisy teacher: `noisy_teacher_logits` on training micro-batches, seeded per micro-batch.

    Args:
        args: the `DistillationConfig` (`teacher_noise_std`, `teacher_noise_fraction`, `teacher_noise_mode`, `seed`,
            `process_index`), read at every call so a schedule or a search trial may change the std.
    """

    def __init__(self, args):
        self.args = args
        self._step: int | None = None
        self._micro_step = 0

    def __call__(self, logits: torch.Tensor | None, step: int, training: bool) -> torch.Tensor | None:
        """Noised logits for the next micro-batch of optimizer step `step` when `training`, else `logits`."""
        args = self.args
        if logits is None or not training or args.teacher_noise_std == 0:
            return logits
        # The micro-batches of one optimizer step share its global_step: count them, from 0 at every new step (a
        # resumed run starts a step at micro-batch 0 too).
        self._micro_step = self._micro_step + 1 if step == self._step else 0
        self._step = step
        generator = noise_generator(args.seed, step, self._micro_step, args.process_index, logits.device)
        return noisy_teacher_logits(
            logits,
            std=args.teacher_noise_std,
            fraction=args.teacher_noise_fraction,
            generator=generator,
            mode=args.teacher_noise_mode,
        )
