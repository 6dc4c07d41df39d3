"""Configuration of deep mutual learning (`hf_distill.mutual`): `MutualLearningConfig(DistillationConfig)` with its
checks, and `PeerArguments`, the peers `scripts/mutual.py` trains, with `load_peers` and `parse_mutual_args`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, PreTrainedModel

from .arguments import DataArguments
from .cli import _split_config
from .config import DistillationConfig
from .recipes import check_recipe_keys, looks_local, recipe_root, resolve_recipe_paths
from .student import make_student

logger = logging.getLogger(__name__)

__all__ = ["NOT_USED", "MutualLearningConfig", "PeerArguments", "load_peers", "parse_mutual_args"]

# DistillationConfig fields that only a teacher-based objective uses, with their "off" value and why they do not apply.
NOT_USED = {
    "hidden_weight": (0.0, "matches a student's hidden states with a teacher's"),
    "embeddings_weight": (0.0, "matches a student's embeddings with a teacher's"),
    "attention_weight": (0.0, "matches a student's attention maps with a teacher's"),
    "relation_weight": (0.0, "compares a student's batch relations with a teacher's"),
    "minilm_weight": (0.0, "transfers a teacher's self-attention relations"),
    "teacher_weights": (None, "weighs several teachers"),
    "teacher_dtype": (None, "sets the teacher's dtype"),
    "use_teacher_cache": (False, "caches a teacher's outputs, but the peers' outputs change every step"),
    "teacher_cache_top_k_tail": (False, "configures the teacher cache"),
    "teacher_cache_top_k": (None, "configures the teacher cache"),
    "teacher_noise_std": (0.0, "perturbs a teacher's logits"),
    "lmbda": (0.0, "samples completions of causal LMs (on-policy distillation)"),
    "seq_kd": (False, "samples a teacher's completions of causal LMs"),
    "fused_lm_head": (False, "fuses causal LMs' LM heads into the loss"),
    "logits_chunk_size": (None, "chunks token-level logits, but the peers are sequence classifiers"),
    "schedules": (None, "schedules the terms of DistillationTrainer (not implemented for mutual learning)"),
    "label_smoothing_factor": (0.0, "smooths the labels of the model's own loss, which is not used here"),
}


@dataclass
class MutualLearningConfig(DistillationConfig):
    r"""Configuration of [`MutualLearningTrainer`]: `DistillationConfig`'s task and logit terms, read per peer.

    Peer k's loss is `task_weight * loss_task_peer<k> + logits_weight * loss_mutual_peer<k>`, where the mutual term is
    the mean over the other peers j of `logits_loss(z_k, detach(z_j))` at `temperature` (T² scaled, as every softmax
    logit loss of `KD_LOGIT_LOSSES`); the trainer minimises the sum over peers. The number of peers is the number of
    models given to the trainer (at least 2).

    Parameters:
        temperature (`float`, defaults to `1.0`):
            Softmax temperature T (> 0) of the mutual term; the paper uses the plain softmax (T = 1).
        task_weight (`float`, defaults to `1.0`):
            Weight of each peer's cross-entropy on the labels.
        logits_weight (`float`, defaults to `1.0`):
            Weight of each peer's mutual term (the paper: 1, next to a task weight of 1). 0 trains each peer
            alone on the labels (the independent baseline, through the same trainer).
        logits_loss (`str`, defaults to `"kl"`):
            The divergence of the mutual term, a key of `KD_LOGIT_LOSSES`; `kl` is the paper's
            KL(p_peer || p_self).

    The teacher-based fields of `DistillationConfig` (hidden / attention / embedding / relation / MiniLM terms, the
    teacher cache, teacher noise, on-policy sampling, ...) are refused unless left at their defaults.
    """

    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature (> 0) of the mutual term; the paper's is 1."}
    )
    task_weight: float = field(default=1.0, metadata={"help": "Weight of each peer's task loss on the labels."})
    logits_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of each peer's mutual term (mean KL from the other peers); 0 trains peers alone."},
    )

    def __post_init__(self):
        super().__post_init__()  # temperature > 0, weights >= 0 and not all 0, logits_loss known, ...
        for name, (off, reason) in NOT_USED.items():
            value = getattr(self, name)
            if value != off and not (off is None and value in ([], "")):
                raise ValueError(
                    f"{name}={value!r} {reason}, which mutual learning does not do (its peers learn from each "
                    f"other's predictions: a task and a logit term, no teacher). Set {name}={off!r}, or use "
                    "DistillationTrainer to distil from a teacher."
                )
        if self.deepspeed:
            raise ValueError(
                f"deepspeed={self.deepspeed!r}: mutual learning clips each peer's gradients by its own norm and saves "
                "each peer from its own parameters, which DeepSpeed does not expose. Train on one device or with DDP "
                "(recipes/accelerate_configs/multi_gpu.yaml), and drop deepspeed."
            )
        if self.push_to_hub:
            raise ValueError(
                "push_to_hub=True would push the folder of all peers as one model. Set push_to_hub=False and push the "
                "peer you keep, <output_dir>/peer<k>, with huggingface_hub's upload_folder."
            )


@dataclass
class PeerArguments:
    """Which peers `scripts/mutual.py` trains: built from one pre-trained model's layers, or loaded as they are.

    Peers are the ones built from `base_model_name_or_path` (one per `peer_num_layers` entry, in that order), then the
    ones of `peer_model_names_or_paths`; at least two in all. Every peer reads the base model's tokenizer.
    """

    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pre-trained model (Hub id or folder) giving the tokenizer and the layers peers copy."},
    )
    peer_num_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "One peer per entry, built from the base model by make_student with that many of its layers "
            "(evenly spaced; the base's own depth is a copy of it), with a fresh classification head."
        },
    )
    peer_model_names_or_paths: list[str] | None = field(
        default=None,
        metadata={"help": "More peers, loaded as they are (Hub ids or folders) with a head of the data's classes."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modeling code shipped with a checkpoint (models, tokenizer)."}
    )

    def __post_init__(self):
        if not self.base_model_name_or_path:
            raise ValueError(
                "base_model_name_or_path is unset: it gives the tokenizer every peer reads (and the layers "
                "peer_num_layers copies). Set it, e.g. sentence-transformers/all-MiniLM-L6-v2."
            )
        for depth in self.peer_num_layers or []:
            if depth < 1:
                raise ValueError(
                    f"peer_num_layers must hold depths >= 1, got {self.peer_num_layers}. Use e.g. [3, 6]."
                )
        count = len(self.peer_num_layers or []) + len(self.peer_model_names_or_paths or [])
        if count < 2:
            raise ValueError(
                f"mutual learning needs at least 2 peers, got {count} (peer_num_layers={self.peer_num_layers}, "
                f"peer_model_names_or_paths={self.peer_model_names_or_paths}). List e.g. peer_num_layers: [3, 6]."
            )


def load_peers(peer_args: PeerArguments, num_labels: int) -> tuple[list[PreTrainedModel], object]:
    """The peers of `peer_args` as sequence classifiers of `num_labels` classes, and the base model's tokenizer.

    Each `peer_num_layers` entry is `make_student(base, num_layers=n)` (the base's evenly spaced layers, its
    embeddings, and its head: fresh unless the base has a trained one of these classes); each
    `peer_model_names_or_paths` entry is loaded as it is, with a fresh head where it has none.
    """
    remote = peer_args.trust_remote_code
    kwargs = {"num_labels": num_labels, "trust_remote_code": remote}
    base = AutoModelForSequenceClassification.from_pretrained(peer_args.base_model_name_or_path, **kwargs)
    peers = [make_student(base, num_layers=n) for n in peer_args.peer_num_layers or []]
    for path in peer_args.peer_model_names_or_paths or []:
        peers.append(AutoModelForSequenceClassification.from_pretrained(path, **kwargs))
    tokenizer = AutoTokenizer.from_pretrained(peer_args.base_model_name_or_path, trust_remote_code=remote)
    for k, peer in enumerate(peers):
        logger.info("peer %d: %s, %d parameters", k, type(peer).__name__, peer.num_parameters())
    return peers, tokenizer


def parse_mutual_args(argv: list[str]) -> tuple[PeerArguments, DataArguments, MutualLearningConfig, str | None]:
    """`scripts/mutual.py`'s arguments: `--config recipe.yaml` (keys: fields of `PeerArguments`, `DataArguments`,
    `MutualLearningConfig`) gives defaults, `--field value` flags override them. Relative paths of the recipe are
    resolved against the repository holding it, as `hf_distill.recipes.load_recipe` does (the base model and listed
    peers too, when they look like local folders).

    Returns:
        `(peer_args, data_args, training_args, recipe_path)`.
    """
    dataclass_types = (PeerArguments, DataArguments, MutualLearningConfig)
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    recipe_path, argv = _split_config(list(argv))
    if recipe_path is not None:
        if not os.path.isfile(recipe_path):
            raise FileNotFoundError(
                f"--config {recipe_path!r} does not exist, e.g. recipes/minilm-sst2_to_minilm-l3/mutual/"
                "mutual_learning.yaml."
            )
        with open(recipe_path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
        check_recipe_keys(recipe, dataclass_types, source=recipe_path)
        root = recipe_root(recipe_path)
        recipe = resolve_recipe_paths(recipe, root)
        recipe["base_model_name_or_path"] = _local(recipe.get("base_model_name_or_path"), root)
        recipe["peer_model_names_or_paths"] = [_local(p, root) for p in recipe.get("peer_model_names_or_paths") or []]
        parser.set_defaults(**recipe)
    peer_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return peer_args, data_args, training_args, recipe_path


def _local(value: str | None, root: Path) -> str | None:
    """A model field of a recipe: made absolute against `root` when it is a local folder, else (a Hub id) unchanged."""
    if not value:
        return value
    candidate = os.path.normpath(root / os.path.expanduser(value))
    return candidate if looks_local(value) or os.path.exists(candidate) else value
