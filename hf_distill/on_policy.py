"""On-policy distillation of causal LMs (GKD: Agarwal et al. 2024, https://arxiv.org/abs/2306.13649).

A fraction `lmbda` of the training micro-batches is replaced, before the Trainer counts the items of its
gradient-accumulation window, by a batch whose completions the student sampled itself (`generate`, in eval mode,
under `no_grad`): each row keeps its prompt, the tokens before its first labelled one, and gets the student's
completion instead of the dataset's. The teacher then scores that batch in `compute_loss` like any other, and the
logit term (`logits_loss`, any divergence of `KD_LOGIT_LOSSES`, with `jsd_beta` etc.) is taken on the completion
tokens only, normalised by the completion tokens of the whole window. With `seq_kd` the micro-batches not drawn for
the student get the teacher's completions instead (sequence-level KD, Kim & Rush 2016), in TRL's order
(`GKDTrainer.training_step`: the student's draw first, then `seq_kd` for the rest).

Which micro-batches go on-policy is a pure function of `(args.seed, global step, micro-batch index in the window)`
(`completion_source`), and each sampling runs under its own seed derived from the same key and the process index, in
a forked RNG: a resumed run makes the same choices and samples the same completions as an uninterrupted one, every
process makes the same choices, and the global RNG (dropout, data order) is left as it was. `lmbda=0` and
`seq_kd=False` leave every batch untouched. Evaluation always uses the dataset's batches.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from transformers import GenerationConfig

from .placement import DEEPSPEED_ZERO3, SHARDED_PLACEMENTS, teacher_placement
from .tasks import is_causal_lm, unwrap_peft

__all__ = [
    "STUDENT",
    "TEACHER",
    "OnPolicyMixin",
    "check_on_policy_args",
    "completion_batch",
    "completion_source",
    "generate_completions",
    "generation_config_of",
    "on_policy_enabled",
    "split_prompts",
]

STUDENT, TEACHER = "student", "teacher"
BATCH_KEYS = ("input_ids", "attention_mask", "labels")
# Separate streams of the one seed: whether a micro-batch goes on-policy, and the sampling of its completions.
_DRAW, _SAMPLE = 0, 1


# ---------------------------------------------------------------------------------------------------- configuration
def on_policy_enabled(args) -> bool:
    """Whether any micro-batch gets generated completions (`lmbda > 0` or `seq_kd`)."""
    return args.lmbda > 0 or args.seq_kd


def check_on_policy_args(args) -> None:
    """The checks of `DistillationConfig.__post_init__` for `lmbda`, `seq_kd` and the generation fields."""
    if isinstance(args.lmbda, bool) or not 0.0 <= args.lmbda <= 1.0:
        raise ValueError(
            f"lmbda must be in [0, 1], got {args.lmbda}. It is the fraction of batches whose completions the student "
            "samples (GKD): 0 is off, 1 every batch; GKD uses e.g. 0.5."
        )
    tokens = args.max_new_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {tokens!r}. Use e.g. 128 (tokens per completion).")
    if not args.generation_temperature > 0:
        raise ValueError(
            f"generation_temperature must be > 0, got {args.generation_temperature}. Use 1.0 to sample from the "
            "generating model's own distribution (it is not the loss's `temperature`)."
        )
    top_k = args.generation_top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generation_top_k must be an int >= 0, got {top_k!r}. Use 0 to sample from every token.")
    if not 0.0 < args.generation_top_p <= 1.0:
        raise ValueError(
            f"generation_top_p must be in (0, 1], got {args.generation_top_p}. Use 1.0 to sample from every token."
        )
    if not on_policy_enabled(args):
        return
    switched_on = f"lmbda={args.lmbda}" if args.lmbda > 0 else "seq_kd=True"
    off = "set lmbda=0 and seq_kd=False"
    if args.use_teacher_cache:
        raise ValueError(
            f"{switched_on} trains on completions generated during training, which the teacher cache (outputs "
            f"stored for the dataset's tokens) cannot score. Set use_teacher_cache=False (the teacher then runs on "
            f"every batch), or {off}."
        )
    if args.distill_on != "labels":
        raise ValueError(
            f"{switched_on} applies the logit term to the generated completion tokens (their labels), but "
            f"distill_on={args.distill_on!r} would score the prompt too. Set distill_on='labels', or {off}."
        )
    if args.lmbda > 0 and args.task_weight > 0:
        raise ValueError(
            f"lmbda={args.lmbda} with task_weight={args.task_weight}: on the student's own completions the task term "
            "would be the cross-entropy of the student's samples (training it to repeat itself), which GKD does not "
            "have. Set task_weight=0 (the logit term trains the student), or lmbda=0 (seq_kd alone keeps the task "
            "term: the cross-entropy on the teacher's completions is sequence-level KD)."
        )


def generation_config_of(args, eos_token_id, pad_token_id: int) -> GenerationConfig:
    """Plain sampling at `generation_temperature` (with `generation_top_k` / `generation_top_p` if set), up to
    `max_new_tokens` new tokens; nothing else (see `generate_completions`)."""
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_k=args.generation_top_k,
        top_p=args.generation_top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        # In eval mode gradient checkpointing is off, but some models still warn about caches with it; as TRL does.
        use_cache=not args.gradient_checkpointing,
    )


# ---------------------------------------------------------------------------------------------------- the schedule
def _seed_sequence(*key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(k) % 2**32 for k in key])


def completion_source(seed: int, step: int, micro: int, lmbda: float, seq_kd: bool) -> str | None:
    """Who generates the completions of micro-batch `micro` of the window of optimizer step `step`.

    Returns:
        `STUDENT` with probability `lmbda` (a draw that depends only on `(seed, step, micro)`), else `TEACHER` when
        `seq_kd`, else None (the dataset's batch is kept).
    """
    if lmbda > 0 and np.random.default_rng(_seed_sequence(seed, step, micro, _DRAW)).random() < lmbda:
        return STUDENT
    return TEACHER if seq_kd else None


def _sampling_seed(seed: int, step: int, micro: int, process: int) -> int:
    return int(_seed_sequence(seed, step, micro, _SAMPLE, process).generate_state(1)[0])


@contextmanager
def _forked_rng(seed: int, device: torch.device):
    """Seed torch's generators for one sampling, restoring the CPU's and `device`'s states afterwards."""
    accelerated = device.type not in ("cpu", "meta")
    devices = [device.index if device.index is not None else 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else "cuda"):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------- the batches
def split_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt, left-padded for generation.

    The prompt of a row is its real tokens (attention mask 1) before its first labelled position (`labels != -100`):
    chat / completion data with the prompt masked. A row without any labelled position is all prompt.

    Args:
        input_ids: `(B, L)` token ids.
        attention_mask: `(B, L)` 0/1, or None (every position is real).
        labels: `(B, L)` labels, `-100` where nothing is predicted (unshifted, as collators make them).

    Returns:
        `(B, P)` prompt ids (left padding holds arbitrary ids) and their `(B, P)` 0/1 attention mask (long), where P
        is the longest prompt.

    Raises:
        ValueError: a row has no prompt (its first real token is labelled).
    """
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    labelled = (labels != -100) & real
    first = torch.where(labelled, index, input_ids.shape[1]).min(dim=1).values
    prompt = real & (index < first[:, None])
    lengths = prompt.sum(dim=1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(
            f"on-policy distillation (lmbda > 0 or seq_kd) continues each row's prompt, but row {row} of a batch has "
            "none: its first real token is labelled. Mark the prompt of every row with label -100 (chat / completion "
            "data, e.g. the instruction), or set lmbda=0 and seq_kd=False."
        )
    # A stable sort puts the prompt tokens last, in order: left padding.
    order = torch.argsort(prompt.to(torch.int8), dim=1, stable=True)
    width = int(lengths.max())
    ids = torch.gather(input_ids, 1, order)[:, -width:]
    mask = torch.gather(prompt, 1, order)[:, -width:]
    return ids, mask.long()


def completion_batch(
    prompt_mask: torch.Tensor, sequences: torch.Tensor, eos_token_id: int | list[int] | None, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The training batch of prompts and generated completions, right-padded like a collator's.

    Args:
        prompt_mask: `(B, P)` the attention mask of the left-padded prompts given to `generate`.
        sequences: `(B, P + T)` what `generate` returned: the prompts, then up to T new tokens per row.
        eos_token_id: the id(s) that end a completion, or None (every new token is kept).
        pad_token_id: the id of the padding the batch gets.

    Returns:
        `input_ids`, `attention_mask` and `labels`, each `(B, L')`: per row its prompt tokens then its completion up
        to and including the first EOS, then padding. Labels are the completion tokens, `-100` on the prompt,
        the padding and everything after the EOS; the attention mask is 1 on the prompt and the kept completion.
    """
    width = prompt_mask.shape[1]
    completion = sequences[:, width:]
    kept = torch.ones_like(completion, dtype=torch.bool)
    if eos_token_id is not None and completion.shape[1] > 0:
        eos = torch.tensor(eos_token_id, device=completion.device).view(-1)
        is_eos = torch.isin(completion, eos)
        # Positions after a row's first EOS: at least one EOS strictly before them.
        kept = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
    keep = torch.cat([prompt_mask.bool(), kept], dim=1)
    is_completion = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), kept], dim=1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept positions first, in order
    length = int(keep.sum(dim=1).max())
    mask = torch.gather(keep, 1, order)[:, :length]
    ids = torch.where(mask, torch.gather(sequences, 1, order)[:, :length], pad_token_id)
    labels = torch.where(torch.gather(is_completion, 1, order)[:, :length], ids, -100)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


@contextmanager
def _sampling_mode(model: torch.nn.Module):
    """Eval mode, and a blank `generation_config`: a checkpoint's own settings (repetition penalty, top-k 50, ...)
    must not change what is sampled."""
    inner = unwrap_peft(model)
    was_training, saved = model.training, getattr(inner, "generation_config", None)
    model.eval()
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved
        model.train(was_training)


def generate_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation_config: GenerationConfig,
    seed: int,
) -> torch.Tensor:
    """`model.generate` on left-padded prompts in eval mode, under no_grad, with torch's RNG seeded by `seed` (and
    restored afterwards); the model's train/eval mode is restored. Returns `(B, P + T)` sequences."""
    device = prompt_ids.device
    with _sampling_mode(model), torch.no_grad(), _forked_rng(seed, device):
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)


# ---------------------------------------------------------------------------------------------------- the trainer
class OnPolicyMixin:
    """Mixed into `DistillationTrainer` before `transformers.Trainer`: replaces the micro-batches drawn for
    on-policy (or `seq_kd`) training by generated ones in `get_batch_samples`, before the window is counted."""

    def _check_on_policy(self) -> None:
        """Refuse what on-policy training would get wrong; a no-op when it is off. Run in `__init__` and again when a
        run (a hyperparameter trial) switches it on."""
        args = self.args
        if not on_policy_enabled(args):
            return
        switched_on = f"lmbda={args.lmbda}" if args.lmbda > 0 else "seq_kd=True"
        generators = [("student", self.model)] + ([("teacher", self.teacher)] if args.seq_kd else [])
        for role, model in generators:
            if not is_causal_lm(model):
                raise ValueError(
                    f"{switched_on} generates completions with the {role}'s `generate`, which needs a causal LM "
                    f"(*ForCausalLM), but the {role} is a {type(unwrap_peft(model)).__name__}. Use causal LMs, or "
                    "set lmbda=0 and seq_kd=False."
                )
        placement = teacher_placement(self.accelerator)
        if self.is_fsdp_enabled or placement == DEEPSPEED_ZERO3 or (args.seq_kd and placement in SHARDED_PLACEMENTS):
            raise ValueError(
                f"{switched_on} generates with the unwrapped models, whose parameters FSDP and DeepSpeed ZeRO-3 "
                "shard over the processes. Use DDP or ZeRO-1/2, or set lmbda=0 and seq_kd=False."
            )
        self._check_prompts_of(self.train_dataset)
        self._on_policy_checked = True

    @staticmethod
    def _check_prompts_of(dataset, rows: int = 8) -> None:
        """The first rows of a `datasets.Dataset` with token labels must have a prompt (first label -100)."""
        names = getattr(dataset, "column_names", None)
        if not names or "labels" not in names or "input_ids" not in names:
            return  # checked batch by batch instead
        head = dataset.select(range(min(rows, len(dataset))))
        for i, (ids, labels) in enumerate(zip(head["input_ids"], head["labels"])):
            if isinstance(labels, list) and len(labels) == len(ids):
                split_prompts(torch.tensor([ids]), None, torch.tensor([labels]))  # raises on a missing prompt
            elif not isinstance(labels, list):
                raise ValueError(
                    f"on-policy distillation (lmbda > 0 or seq_kd) needs token labels marking each row's prompt with "
                    f"-100, but row {i} of train_dataset has labels {labels!r}. Use chat / completion data, or set "
                    "lmbda=0 and seq_kd=False."
                )

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The window's micro-batches, those drawn for on-policy / `seq_kd` training with generated completions, and
        the window's counts taken over the batches actually trained on."""
        batch_samples, counts = super().get_batch_samples(epoch_iterator, num_batches, device)
        args = self.args
        if not on_policy_enabled(args):
            return batch_samples, counts
        if not getattr(self, "_on_policy_checked", False):
            self._check_on_policy()
        replaced = False
        for micro, batch in enumerate(batch_samples):
            source = completion_source(args.seed, self.state.global_step, micro, args.lmbda, args.seq_kd)
            if source is not None:
                batch_samples[micro] = self._generated_batch(batch, source, micro)
                replaced = True
        if replaced:
            counts = self._get_num_items_in_batch(batch_samples, device)
        return batch_samples, counts

    def _generated_batch(self, batch: dict, source: str, micro: int) -> dict:
        """`batch` with its completions replaced by the `source` model's."""
        extra = sorted(set(batch) - set(BATCH_KEYS))
        if "labels" not in batch or extra:
            raise ValueError(
                "on-policy distillation (lmbda > 0 or seq_kd) rebuilds a batch from input_ids, attention_mask and "
                f"labels (the prompt marked -100), but the batch has keys {sorted(batch)}: "
                + (f"{extra} would no longer line up with the new tokens. " if extra else "no labels. ")
                + "Collate only those three, or set lmbda=0 and seq_kd=False."
            )
        student = self.accelerator.unwrap_model(self.model)
        model = student if source == STUDENT else self.teacher
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = split_prompts(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device) if batch.get("attention_mask") is not None else None,
            batch["labels"].to(device),
        )
        eos, pad = self._eos_and_pad(student)
        seed = _sampling_seed(self.args.seed, self.state.global_step, micro, self.args.process_index)
        sequences = generate_completions(
            model, prompt_ids, prompt_mask, generation_config_of(self.args, eos, pad), seed
        )  # fmt: skip
        return completion_batch(prompt_mask, sequences, eos, pad)

    def _eos_and_pad(self, student) -> tuple[int | list[int] | None, int]:
        """The ids that end a completion (the student's generation config, else the tokenizer's) and the padding."""
        tokenizer = self.processing_class
        generation = getattr(unwrap_peft(student), "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(generation, "pad_token_id", None)
        if pad is None:
            pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        return eos, int(pad)
