"""Where the frozen teacher lives under each distributed engine.

The student is wrapped by the Trainer (DDP, FSDP or a DeepSpeed engine) for training. The teacher is only ever run
forward, under `torch.no_grad()`, and must never be wrapped for training: DDP would all-reduce gradients it never has,
and an optimizer would hold its parameters. What it needs instead depends on the engine, as in TRL
(`trl.models.utils.prepare_deepspeed` / `prepare_fsdp`, used by its GKD and distillation trainers):

- one process, DDP (`MULTI_GPU`, `MULTI_CPU`, ...): a full frozen copy per process, moved to the device.
- DeepSpeed ZeRO-1 / ZeRO-2: the same; those stages shard optimizer state and gradients, which a teacher has none of.
- DeepSpeed ZeRO-3: an inference engine (`deepspeed.initialize` with the student's ZeRO-3 config, optimizer and
  scheduler removed); its parameters are partitioned over the processes and gathered layer by layer in the forward.
- FSDP2 (`fsdp_version: 2`): sharded with `fully_shard` (one unit per transformer block; the plugin's mixed precision,
  offload and mesh), resharded after every forward.
- FSDP1 (`fsdp_version: 1`): a full frozen copy per process (not sharded), synchronised from the main process when
  the plugin loads weights on the main process only.

A sharded teacher stays the same `PreTrainedModel` object (FSDP2 shards in place; DeepSpeed's ZeRO-3 hooks live on
the module itself), so its config, its forward signature and the feature-capture hooks of `hf_distill.features` on its
layers all keep working. Every process must run each teacher forward (the gathers are collective): the teacher cache,
which the main process alone builds, is refused under the two sharded placements.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEVICE = "device"
FSDP1 = "fsdp1"
FSDP2 = "fsdp2"
DEEPSPEED_ZERO3 = "deepspeed_zero3"
SHARDED_PLACEMENTS = (FSDP2, DEEPSPEED_ZERO3)

# ZeRO-3 settings that `transformers` derives from the model's width when they are "auto" (see
# `HfTrainerDeepSpeedConfig.trainer_config_finalize`): it fills them from the student at `train()`, after the
# teacher is placed, so the teacher's copy gets them from the teacher's own width.
_HIDDEN_SIZE_KEYS: dict[str, Any] = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def teacher_placement(accelerator) -> str:
    """The placement the teacher gets under `accelerator`'s engine: one of `"device"`, `"fsdp1"`, `"fsdp2"`,
    `"deepspeed_zero3"` (see the table in this module's docstring)."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return DEEPSPEED_ZERO3 if int(state.deepspeed_plugin.zero_stage) == 3 else DEVICE
    if state.distributed_type == DistributedType.FSDP:
        return FSDP2 if int(getattr(state.fsdp_plugin, "fsdp_version", 1)) == 2 else FSDP1
    return DEVICE


def prepare_teacher(teacher: nn.Module, accelerator, args) -> nn.Module:
    """Freeze `teacher` and place it for inference under `accelerator`'s engine.

    Args:
        teacher: the teacher, a `PreTrainedModel`; frozen and set to eval mode here, in place.
        accelerator: the trainer's `accelerate.Accelerator` (its state says which engine runs).
        args: the trainer's `DistillationConfig` (device, batch sizes, mixed precision, `use_teacher_cache`).

    Returns:
        The teacher to call: the same object as `teacher`, moved or sharded.

    Raises:
        ValueError: `use_teacher_cache=True` under FSDP2 or DeepSpeed ZeRO-3, or a ZeRO-3 config that still has
            "auto" values the teacher's engine cannot resolve.
    """
    placement = teacher_placement(accelerator)
    if placement in SHARDED_PLACEMENTS and getattr(args, "use_teacher_cache", False):
        raise ValueError(
            f"use_teacher_cache=True cannot be used with the teacher sharded by "
            f"{'FSDP2' if placement == FSDP2 else 'DeepSpeed ZeRO-3'}: the cache is built by the main process alone, "
            "while a sharded teacher's forward needs every process. Set use_teacher_cache=False (the sharded teacher "
            "runs live), or build and use the cache under DDP (e.g. torchrun --nproc_per_node N or the multi_gpu "
            "accelerate config)."
        )
    teacher.eval()
    teacher.requires_grad_(False)
    if placement == FSDP2:
        return shard_teacher_fsdp2(teacher, accelerator)
    if placement == DEEPSPEED_ZERO3:
        return init_teacher_deepspeed(teacher, accelerator, args)
    if placement == FSDP1:
        logger.info("fsdp_version 1: the teacher is not sharded; each process holds a frozen copy (FSDP2 shards it).")
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "cpu_ram_efficient_loading", False) or getattr(plugin, "sync_module_states", False):
            # With cpu_ram_efficient_loading, `from_pretrained` loads the weights on the main process only; the other
            # processes hold empty tensors that FSDP fills for the student, but nothing fills for the teacher.
            return broadcast_from_main_process(teacher, args.device)
    return teacher.to(args.device)


def shard_teacher_fsdp2(teacher: nn.Module, accelerator) -> nn.Module:
    """Shard `teacher` in place with FSDP2's `fully_shard`: one unit per transformer block, then the rest.

    The plugin's mixed precision, CPU offload and device mesh apply as for the student; every unit reshards after
    its forward, since no backward will need the teacher's weights gathered. When the plugin loads weights on the
    main process only (`cpu_ram_efficient_loading`), the main process's weights are broadcast first, so each device
    briefly holds the whole teacher. (`accelerate`'s own `fsdp2_prepare_model` is not reused: it also shards the
    input embeddings on their own, which fails for models whose `_no_split_modules` already holds the embedding
    block, such as BERT, and it keeps the last units gathered for a backward pass.)
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from .student import get_layers

    if isinstance(teacher, FSDPModule):
        return teacher
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        broadcast_from_main_process(teacher, accelerator.device)
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": True,
        "mp_policy": getattr(plugin, "mixed_precision_policy", None) or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    if getattr(plugin, "cpu_offload", None) is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    try:
        layers = list(get_layers(teacher))
    except ValueError:  # a family hf_distill cannot walk: the teacher is one unit, gathered whole for its forward
        layers = []
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)
    teacher.eval()
    return teacher


def deepspeed_teacher_config(config: dict, args, hidden_size: int | None, world_size: int = 1) -> dict:
    """The DeepSpeed config of the teacher's inference engine, from the student's (which is not changed).

    As TRL's `prepare_deepspeed`: the optimizer, the scheduler and the optimizer offload are removed (no optimizer
    is passed, and DeepSpeed would otherwise build them); the hidden-size-dependent ZeRO-3 buckets left at "auto" are
    sized from the teacher's width; batch-size, clipping and precision values left at "auto" are filled from `args`,
    as `transformers` does for the student.

    Args:
        config: the student's DeepSpeed config (`accelerator.state.deepspeed_plugin.deepspeed_config`).
        args: a `TrainingArguments` (`per_device_train_batch_size`, `gradient_accumulation_steps`, `max_grad_norm`,
            `bf16`, `fp16`).
        hidden_size: the teacher's hidden size, or `None` when its config has none.
        world_size: number of processes.

    Raises:
        ValueError: an "auto" value remains that nothing here can resolve.
    """
    config = copy.deepcopy(config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if hidden_size is not None:
        for key, value in _HIDDEN_SIZE_KEYS.items():
            if zero.get(key) == "auto":
                zero[key] = value(hidden_size)
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accumulation),
        ("train_batch_size", micro * accumulation * world_size),
        ("gradient_clipping", args.max_grad_norm),
    ):
        if config.get(key) == "auto":
            config[key] = value
    for key, enabled in (("bf16", args.bf16), ("fp16", args.fp16)):
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            config[key]["enabled"] = bool(enabled)
    autos = _auto_keys(config)
    if autos:
        raise ValueError(
            f"the DeepSpeed config has 'auto' values the teacher's ZeRO-3 engine cannot resolve: {autos}. "
            "Give them numbers in the DeepSpeed config file."
        )
    return config


def init_teacher_deepspeed(teacher: nn.Module, accelerator, args) -> nn.Module:
    """Partition `teacher` with a DeepSpeed ZeRO-3 inference engine; return the (partitioned) model itself.

    DeepSpeed registers its parameter-gathering hooks on the module, so calling the model directly runs the same
    forward as calling the engine (whose `forward` adds only training-time bookkeeping); the model keeps its
    config, forward signature and layers for the trainer and the feature capture. The engine is kept alive on the
    model as `_hf_distill_deepspeed_engine` (a plain attribute, not a submodule, so it is not in the state dict).
    """
    import deepspeed  # imported here: only the ZeRO-3 path needs it, and importing it can disturb other backends

    config = deepspeed_teacher_config(
        accelerator.state.deepspeed_plugin.deepspeed_config,
        args,
        hidden_size=_hidden_size(teacher),
        world_size=accelerator.num_processes,
    )
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    model = engine.module
    object.__setattr__(model, "_hf_distill_deepspeed_engine", engine)
    return model


def broadcast_from_main_process(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move `model` to `device` and overwrite every parameter and buffer with the main process's values.

    For a model whose weights were loaded on the main process only (the others may hold `meta` or uninitialised
    tensors). Needs an initialised `torch.distributed` process group; a no-op broadcast with one process.
    """
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # `to_empty` gives each module its own tensor, untying shared weights
    else:
        model.to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)
    return model


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if getattr(config, "hidden_sizes", None):
        return max(config.hidden_sizes)
    return getattr(config, "hidden_size", None)


def _auto_keys(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [k for key, value in config.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == "auto" else []
