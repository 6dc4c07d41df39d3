"""The MiniLM term of `DistillationTrainer`: self-attention relation transfer from one teacher to one student layer.

`minilm_weight > 0` adds the sum, over the relations of `minilm_relations`, of the KL between the teacher's and the
student's relations (`hf_distill.losses.minilm`): MiniLMv2's query-query, key-key and value-value relations
(Wang et al. 2021, https://arxiv.org/abs/2012.15828, `"qq,kk,vv"`, the default) or MiniLM's attention distribution
and value relation (Wang et al. 2020, https://arxiv.org/abs/2002.10957, `"attention,vv"`), each split into
`minilm_relation_heads` relation heads so the widths and head counts of the two models may differ (no projection is
learned). The layers are the `minilm_layer` pair (default the last block of each).

Capture. The queries, keys and values are the outputs of the attention's `Linear` projections of the chosen block
(`QKV_PATHS`), read by forward hooks during the ordinary forward pass the other terms use (no second forward, no
eager attention): before any reshape into heads, rotary embedding (Llama-style models) or relative position bias
(MPNet). The hooks exist only inside `capture_qkv` and are removed when it returns or raises; nothing is stored on
the models. The teacher cache stores no projections, so `use_teacher_cache` is refused with this term.

Normalisation. The loss is a mean over (relation head, real query position); the positions are per-token items like
the other feature terms', so each micro-batch's sum is divided by the real tokens of the whole gradient-accumulation
window and k micro-batches add up to the loss of their concatenation exactly.

Grouped-query attention (Llama-style `num_key_value_heads < num_attention_heads`): keys and values are narrower than
queries. `qq`, `kk` and `vv` relate each projection to itself, so they only need `minilm_relation_heads` to divide
every width; `attention` relates queries to keys and is refused when their widths differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from math import gcd
from typing import TYPE_CHECKING

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import PreTrainedModel

from .losses.minilm import MINILM_RELATIONS, attention_relation_loss
from .relation_term import layer_pair, resolve_layer
from .student import get_layers, num_layers
from .tasks import is_causal_lm

if TYPE_CHECKING:  # config.py imports this module for its checks
    from .config import DistillationConfig

__all__ = [
    "QKV_PATHS",
    "MiniLMTerm",
    "build_minilm_term",
    "capture_qkv",
    "check_minilm_args",
    "minilm_term",
    "parse_minilm_relations",
]

# model_type -> paths, inside one transformer block, of its query, key and value `Linear` projections.
QKV_PATHS: dict[str, tuple[str, str, str]] = {
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "roberta": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "xlm-roberta": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "mpnet": ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "qwen3": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mistral": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}
PROJECTIONS = ("q", "k", "v")


@dataclass(frozen=True)
class MiniLMTerm:
    """What the MiniLM term compares: `relations` (keys of `MINILM_RELATIONS`) split into `relation_heads` heads,
    between the projections of `teacher_layer` and `student_layer` (0-based blocks); `causal` for decoder LMs."""

    relations: tuple[str, ...]
    relation_heads: int
    teacher_layer: int
    student_layer: int
    causal: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        """The projections (`"q"`, `"k"`, `"v"`) the relations need, in that order."""
        used = {name for relation in self.relations for name in MINILM_RELATIONS[relation]}
        return tuple(p for p in PROJECTIONS if p in used)


def parse_minilm_relations(value: str) -> tuple[str, ...]:
    """`"qq,kk,vv"` -> `("qq", "kk", "vv")`, checked: known names, at least one, none twice."""
    names = tuple(part.strip() for part in str(value).split(","))
    unknown = [n for n in names if n not in MINILM_RELATIONS]
    if unknown or len(set(names)) != len(names):
        problem = f"unknown {unknown}" if unknown else "a relation named twice"
        raise ValueError(
            f"minilm_relations must be comma-separated names from {sorted(MINILM_RELATIONS)}, each at most once, "
            f"got {value!r} ({problem}). Use 'qq,kk,vv' (MiniLMv2) or 'attention,vv' (MiniLM)."
        )
    return names


def check_minilm_args(args: DistillationConfig) -> None:
    """`DistillationConfig`'s checks of the minilm fields (the layers and widths are checked against the models
    later, by `build_minilm_term`)."""
    parse_minilm_relations(args.minilm_relations)
    heads = args.minilm_relation_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(
            f"minilm_relation_heads must be an int >= 1, got {heads!r}. Use e.g. 12 (a divisor of both models' "
            "query / key / value widths)."
        )
    if args.minilm_layer is not None:
        layer_pair(args.minilm_layer, "minilm_layer")
    if args.minilm_weight > 0 and args.use_teacher_cache:
        raise ValueError(
            f"minilm_weight={args.minilm_weight} needs the teacher's query / key / value projections, which the "
            "teacher cache does not store. Set use_teacher_cache=False (the teacher then runs each step), or "
            "minilm_weight=0."
        )


def _projection_modules(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    unwrapped = extract_model_from_parallel(model, keep_torch_compile=False)
    model_type = unwrapped.config.model_type
    if model_type not in QKV_PATHS:
        raise ValueError(
            f"minilm_weight > 0 reads the query / key / value projections, which hf_distill knows for model types "
            f"{sorted(QKV_PATHS)}, not {model_type!r}. Set minilm_weight=0, or use a model of a supported family."
        )
    block = get_layers(unwrapped)[layer]
    modules = {}
    for name, path in zip(PROJECTIONS, QKV_PATHS[model_type]):
        module = block
        for part in path.split("."):
            module = getattr(module, part)
        modules[name] = module
    return modules


def _width(module: nn.Module) -> int:
    width = getattr(module, "out_features", None)  # nn.Linear, and PEFT's LoRA layers wrapping one
    return int(width) if width is not None else int(module.weight.shape[0])


def build_minilm_term(
    args: DistillationConfig, teacher: PreTrainedModel, student: PreTrainedModel
) -> MiniLMTerm | None:
    """The trainer's `MiniLMTerm` (None when `args.minilm_weight == 0`), checked against both models.

    Raises:
        ValueError: a layer outside a model, an unsupported model type, relation heads that do not divide a
            projection's width, `attention` with queries and keys of different widths (grouped-query attention), or
            a causal LM paired with a bidirectional encoder.
    """
    if args.minilm_weight == 0:
        return None
    teacher_layer, student_layer = -1, -1
    if args.minilm_layer is not None:
        teacher_layer, student_layer = layer_pair(args.minilm_layer, "minilm_layer")
    teacher_layer = resolve_layer(teacher_layer, num_layers(teacher), "teacher", args.minilm_layer, "minilm_layer")
    student_layer = resolve_layer(student_layer, num_layers(student), "student", args.minilm_layer, "minilm_layer")
    if is_causal_lm(teacher) != is_causal_lm(student):
        raise ValueError(
            "minilm_weight > 0 compares token relations, which are causal in a causal LM and bidirectional in an "
            "encoder; the teacher and the student here differ. Use models of the same kind, or minilm_weight=0."
        )
    term = MiniLMTerm(
        parse_minilm_relations(args.minilm_relations),
        args.minilm_relation_heads,
        teacher_layer,
        student_layer,
        causal=is_causal_lm(student),
    )
    heads = term.relation_heads
    for role, model, layer in (("teacher", teacher, teacher_layer), ("student", student, student_layer)):
        widths = {name: _width(module) for name, module in _projection_modules(model, layer).items()}
        if "attention" in term.relations and widths["q"] != widths["k"]:
            raise ValueError(
                f"minilm_relations={args.minilm_relations!r} includes 'attention' (queries against keys), but the "
                f"{role}'s queries are {widths['q']} wide and its keys {widths['k']} (grouped-query attention). Use "
                "minilm_relations='qq,kk,vv' (MiniLMv2), which relates each projection to itself."
            )
        used = {name: widths[name] for name in term.projections}
        common = 0
        for width in used.values():
            common = gcd(common, width)
        if common % heads:
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            raise ValueError(
                f"minilm_relation_heads={heads} must divide every projection width the relations use, but layer "
                f"{layer} of the {role} has widths {used}. Use a divisor of both models' widths; the {role}'s "
                f"are {divisors}."
            )
    return term


@contextmanager
def capture_qkv(model: nn.Module, term: MiniLMTerm | None, role: str) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, the returned dict maps `"q"` / `"k"` / `"v"` (those `term` needs) to the `(B, T, H)` outputs
    of the projections of the `role` (`"teacher"` or `"student"`) layer of `term` in the last forward pass. Nothing is
    hooked without a term. The hooks are removed on exit, and a student block that checkpoints its activations keeps
    them during the capture (a re-run in backward would not be hooked)."""
    store: dict[str, torch.Tensor] = {}
    if term is None:
        yield store
        return
    layer = term.teacher_layer if role == "teacher" else term.student_layer
    modules = _projection_modules(model, layer)

    def keep(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        store[name] = output

    block = get_layers(extract_model_from_parallel(model, keep_torch_compile=False))[layer]
    checkpointed = bool(getattr(block, "gradient_checkpointing", False))
    handles = [modules[name].register_forward_hook(partial(keep, name)) for name in term.projections]
    try:
        if checkpointed:
            block.gradient_checkpointing = False
        yield store
    finally:
        for handle in handles:
            handle.remove()
        if checkpointed:
            block.gradient_checkpointing = True


def minilm_term(
    term: MiniLMTerm,
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    mask: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | None,
) -> torch.Tensor:
    """The sum over `term.relations` of each relation's KL (MiniLMv2 adds its relations' losses), each the sum over
    relation heads and real query positions divided by heads x `num_items_in_batch` (the window's real tokens) when
    given, else by this micro-batch's real tokens.

    Args:
        term: from `build_minilm_term`.
        student, teacher: `capture_qkv`'s dicts of `(B, T, H)` projections.
        mask: `(B, T)` attention mask, or None.
        num_items_in_batch: real tokens of the gradient-accumulation window (summed over processes when the counts
            are), or None.
    """
    missing = [name for name in term.projections if name not in student or name not in teacher]
    if missing:
        raise RuntimeError(
            f"the forward pass never ran the {missing} projections of the MiniLM layers (teacher layer "
            f"{term.teacher_layer}, student layer {term.student_layer}); hf_distill's QKV_PATHS do not match this "
            "model's code."
        )
    total = 0.0
    for relation in term.relations:
        left, right = MINILM_RELATIONS[relation]
        total = total + attention_relation_loss(
            student[left],
            student[right],
            teacher[left],
            teacher[right],
            mask,
            relation_heads=term.relation_heads,
            num_items_in_batch=num_items_in_batch,
            causal=term.causal,
        )
    return total
