"""Online distillation by deep mutual learning (Zhang et al. 2018, https://arxiv.org/abs/1706.00384).

There is no pre-trained teacher: two or more students ("peers") are trained together and each learns from the others'
current predictions. Peer k's loss is its task loss plus the mean over the other peers j of the logit divergence
against peer j's detached output,

    loss_k = task_weight * CE(z_k, y) + logits_weight * mean_{j != k} T² KL(softmax(z_j / T) || softmax(z_k / T)),

and the trainer minimises `sum_k loss_k`. Peer j's logits are detached in peer k's term, so the gradient of `loss_k`
reaches peer k alone: summing the peers' losses and taking one optimizer step updates every peer by its own loss, as
if each had its own optimizer. The divergence is `KD_LOGIT_LOSSES[logits_loss]` (`kl_div_loss` by default, the
paper's KL at T = 1); the task term is `task_loss`, and both are normalised over the gradient-accumulation window
like `DistillationTrainer`'s (task: the window's labelled rows; mutual term: its rows; see `hf_distill.logit_term`).

All peers are updated from the same forward pass (the simultaneous form most re-implementations use); the paper's
Algorithm 1 updates them in turn, recomputing the predictions between updates.

How it sits on `transformers.Trainer`: the trainer's `model` is a `PeerEnsemble` (an `nn.ModuleList` of the peers
whose forward runs every peer), so one optimizer, one scheduler, one accelerator (one DDP wrapper) and the Trainer's
checkpointing, resume and logging serve all peers unchanged. What differs from one model:

- gradient clipping (`max_grad_norm`) is per peer, each by its own norm (the logged `grad_norm` is the norm over all
  peers), so a peer trains exactly as it would alone when `logits_weight=0`;
- saving (`save_model`, and every checkpoint) writes each peer as a plain transformers model, with the tokenizer, into
  `<output_dir>/peer<k>/`, loadable with `from_pretrained`; a checkpoint's peer folders are what a resume loads;
- evaluation logs each peer's terms (`eval_loss_task_peer<k>`, `eval_loss_mutual_peer<k>`) and, with the default
  `compute_metrics`, each peer's accuracy (`eval_accuracy_peer<k>`) and the ensemble's (`eval_accuracy_ensemble`:
  the argmax of the peers' mean probabilities).

The peers may differ in architecture, depth and width (e.g. a 3-layer and a 6-layer student from `make_student`), but
they read the same token ids and score the same classes: single-label sequence classifiers
(`*ForSequenceClassification` with `num_labels >= 2` and integer labels), trained in full (no PEFT), on one device or
under DDP (DeepSpeed and FSDP are refused).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .losses import KD_LOGIT_LOSSES
from .losses.task import task_loss
from .mutual_config import MutualLearningConfig, PeerArguments
from .preflight import forward_arg_names
from .tasks import MULTI_LABEL, REGRESSION, SINGLE_LABEL, is_peft_model, is_sequence_classifier
from .term_metrics import NonFiniteLossGuard, TermMetrics
from .trainer_counts import ddp_loss_scale, gather_counts, window_counts
from .trainer_logging import TermLoggingMixin

__all__ = [
    "MutualLearningConfig",
    "MutualLearningTrainer",
    "PeerArguments",
    "PeerEnsemble",
    "check_peers",
    "mutual_terms",
    "peer_accuracy_metrics",
    "peer_folder",
]

# Index of each count in the tensor `_get_num_items_in_batch` returns for a gradient-accumulation window.
ROWS, LABELS = 0, 1
NUM_COUNTS = 2


def peer_folder(output_dir: str, k: int) -> str:
    """`<output_dir>/peer<k>`: where peer k is saved (final model and every checkpoint)."""
    return os.path.join(output_dir, f"peer{k}")


# --------------------------------------------------------------------------------------------------------------------
# The mutual term: a pure function of the peers' logits
# --------------------------------------------------------------------------------------------------------------------


def mutual_terms(
    peer_logits: Sequence[torch.Tensor],
    *,
    loss_fn: Callable[..., torch.Tensor] = KD_LOGIT_LOSSES["kl"],
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    **loss_kwargs,
) -> list[torch.Tensor]:
    """Each peer's mutual term: `mean_{j != k} loss_fn(z_k, detach(z_j))`, for k = 0 .. K - 1.

    With `loss_fn=kl_div_loss` (the default) peer k's term is `mean_{j != k} T² KL(p_j || p_k)`, `p = softmax(z / T)`
    in fp32, summed over rows and divided by `num_items_in_batch` (else by the rows). The partner's logits are
    detached, so the gradient of term k reaches `peer_logits[k]` only.

    Args:
        peer_logits: K >= 2 tensors of one shape `(B, C)`, one per peer.
        loss_fn: a logit loss `(student, teacher, mask, *, temperature, num_items_in_batch, ...)` of
            `KD_LOGIT_LOSSES`; peer k is its student, each other peer in turn its teacher.
        temperature: softmax temperature T > 0.
        num_items_in_batch: the rows of the whole gradient-accumulation window, or None (this batch's rows).
        loss_kwargs: the loss's own parameter (`beta` of `generalized_jsd`, `alpha` of the skew KLs).

    Returns:
        K fp32 scalars.
    """
    if len(peer_logits) < 2:
        raise ValueError(f"mutual learning needs at least 2 peers' logits, got {len(peer_logits)}.")
    shapes = {tuple(z.shape) for z in peer_logits}
    if len(shapes) > 1:
        raise ValueError(
            f"the peers' logits have shapes {sorted(shapes)}: peers must score the same classes (same num_labels) on "
            "the same rows."
        )
    detached = [z.detach() for z in peer_logits]
    options = {"temperature": temperature, "num_items_in_batch": num_items_in_batch, **loss_kwargs}
    terms = []
    for k, z in enumerate(peer_logits):
        partners = [loss_fn(z, detached[j], None, **options) for j in range(len(peer_logits)) if j != k]
        terms.append(sum(partners) / len(partners))
    return terms


# --------------------------------------------------------------------------------------------------------------------
# The peers
# --------------------------------------------------------------------------------------------------------------------


class PeerEnsemble(nn.ModuleList):
    """The peers as one module: `forward(**inputs)` runs every peer (each on the inputs its forward takes) and returns
    their logits, a tuple of `(B, C)` tensors. The Trainer's optimizer, DDP wrapper and checkpoints see one model;
    its state-dict keys are `<k>.<peer k's key>`."""

    def __init__(self, peers: Sequence[PreTrainedModel]):
        super().__init__(peers)
        self.peer_inputs = [frozenset(forward_arg_names(peer)) for peer in peers]

    def forward(self, **inputs) -> tuple[torch.Tensor, ...]:
        return tuple(
            peer(**{k: v for k, v in inputs.items() if k in names and k != "labels"}).logits
            for peer, names in zip(self, self.peer_inputs)
        )

    @property
    def input_names(self) -> set[str]:
        """The inputs any peer reads (the dataset columns worth keeping)."""
        return set().union(*self.peer_inputs)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        for peer in self:
            peer.activation_checkpointing_enable(**kwargs)

    def floating_point_ops(self, inputs: dict[str, Any], exclude_embeddings: bool = True) -> int:
        return sum(peer.floating_point_ops(inputs, exclude_embeddings=exclude_embeddings) for peer in self)


def check_peers(peers: Sequence[nn.Module], processing_class=None) -> None:
    """Refuse peers that cannot learn from each other: fewer than 2, one model given twice (or sharing parameters),
    not a plain single-label sequence classifier, other classes than peer 0's, or too few embeddings for the
    tokenizer's ids."""
    if len(peers) < 2:
        raise ValueError(
            f"mutual learning needs at least 2 peers, got {len(peers)}. Pass model=[peer_a, peer_b, ...], e.g. two "
            "students built by make_student."
        )
    seen: dict[int, int] = {}
    for k, peer in enumerate(peers):
        name = type(peer).__name__
        if not isinstance(peer, PreTrainedModel) or is_peft_model(peer) or not is_sequence_classifier(peer):
            raise ValueError(
                f"peer {k} is a {name}; mutual learning trains transformers sequence classifiers "
                "(*ForSequenceClassification, PreTrainedModel, not PEFT-wrapped), each saved as a plain model. Load "
                "it with AutoModelForSequenceClassification (merge an adapter first with merge_and_unload())."
            )
        problem_type = getattr(peer.config, "problem_type", None) or SINGLE_LABEL
        if problem_type in (REGRESSION, MULTI_LABEL) or peer.config.num_labels < 2:
            raise ValueError(
                f"peer {k} ({name}) has num_labels={peer.config.num_labels} and problem_type="
                f"{peer.config.problem_type!r}; mutual learning supports single-label classification (num_labels >= "
                "2, integer labels): the peers' softmaxes are compared. Load the peers with num_labels=<classes>."
            )
        if peer.config.num_labels != peers[0].config.num_labels:
            raise ValueError(
                f"peer {k} has num_labels={peer.config.num_labels} but peer 0 has {peers[0].config.num_labels}: "
                "the peers learn from each other's class probabilities, so they must score the same classes. Load "
                f"every peer with num_labels={peers[0].config.num_labels}."
            )
        ours, theirs = _class_names(peer.config), _class_names(peers[0].config)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"peer {k} names its classes {list(ours)} but peer 0 names them {list(theirs)}: the mutual term "
                "compares class i of every peer. Give the peers the same id2label."
            )
        for p in peer.parameters():
            if id(p) in seen:
                other = seen[id(p)]
                what = "is the same model object as" if peers[other] is peer else "shares parameters with"
                raise ValueError(
                    f"peer {k} {what} peer {other}: each peer must be its own model. Build every peer separately "
                    "(make_student, from_pretrained, or copy.deepcopy)."
                )
            seen[id(p)] = k
        rows = peer.get_input_embeddings().num_embeddings
        if processing_class is not None and hasattr(processing_class, "__len__") and len(processing_class) > rows:
            raise ValueError(
                f"peer {k} has {rows} token embeddings but the tokenizer has {len(processing_class)} ids: every peer "
                "reads the tokenizer's ids. Use peers of one tokenizer (make_student keeps it), or resize the peer's "
                "embeddings (peer.resize_token_embeddings(len(tokenizer)))."
            )


def _class_names(config) -> tuple[str, ...] | None:
    """The config's class names, or None when they are transformers' defaults (`LABEL_0`, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    found = tuple(str(id2label[i]).casefold() for i in sorted(id2label, key=int))
    return None if found == tuple(f"label_{i}" for i in range(len(found))) else found


def peer_accuracy_metrics() -> Callable:
    """A `compute_metrics` for `MutualLearningTrainer`: `accuracy_peer<k>` of each peer's argmax, and
    `accuracy_ensemble` of the argmax of the peers' mean softmax (rows labelled -100 are left out)."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred
        peer_logits = [np.asarray(z, dtype=np.float64) for z in predictions]
        labels = np.asarray(labels)
        keep = labels != -100
        metrics = {
            f"accuracy_peer{k}": float((z.argmax(-1) == labels)[keep].mean()) if keep.any() else float("nan")
            for k, z in enumerate(peer_logits)
        }
        probs = [np.exp(z - z.max(-1, keepdims=True)) for z in peer_logits]
        mean = sum(p / p.sum(-1, keepdims=True) for p in probs) / len(probs)
        metrics["accuracy_ensemble"] = float((mean.argmax(-1) == labels)[keep].mean()) if keep.any() else float("nan")
        return metrics

    return compute_metrics


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


class MutualLearningTrainer(TermLoggingMixin, Trainer):
    """Trains K >= 2 peers together by deep mutual learning (see the module docstring).

    Each peer's terms are logged on their own, `loss_task_peer<k>` and `loss_mutual_peer<k>` (`eval_...` in
    evaluation): per-item means over the logging window and every process. A non-finite loss stops the run before the
    optimizer step (`NonFiniteLossError`).

    Args:
        model: the peers, a list of `PreTrainedModel` sequence classifiers of one tokenizer and label set (or a
            `PeerEnsemble` of them). They are trained in place: after `train()`, `trainer.peers[k]` is peer k.
        args: a [`MutualLearningConfig`].
        compute_metrics: defaults to `peer_accuracy_metrics()` (per-peer and ensemble accuracy); a function given
            here receives the predictions as a tuple of K `(N, C)` arrays, one per peer.
        Other arguments are those of `transformers.Trainer` (`model_init` is refused: there is no single model to
        build).
    """

    _tag_names = ["hf-distill", "mutual-learning"]

    def __init__(
        self,
        model: Sequence[PreTrainedModel] | PeerEnsemble | None = None,
        args: MutualLearningConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        **kwargs,
    ):
        if args is None:
            args = MutualLearningConfig(output_dir="mutual-learning-output")
        if not isinstance(args, MutualLearningConfig):
            raise ValueError(
                f"args must be a MutualLearningConfig, got {type(args).__name__}. Use MutualLearningConfig("
                "output_dir=..., ...), which accepts every TrainingArguments field."
            )
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "model_init is not supported by MutualLearningTrainer (hyperparameter search builds one model per "
                "trial). Pass model=[peer_a, peer_b, ...]."
            )
        if model is None:
            raise ValueError("MutualLearningTrainer needs model=[peer_a, peer_b, ...], at least 2 peers.")
        peers = list(model) if isinstance(model, (list, tuple, PeerEnsemble)) else [model]
        check_peers(peers, processing_class)
        ensemble = model if isinstance(model, PeerEnsemble) else PeerEnsemble(peers)
        super().__init__(
            model=ensemble,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics if compute_metrics is not None else peer_accuracy_metrics(),
            **kwargs,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "mutual learning clips each peer's gradients by its own norm and saves each peer from its own "
                "parameters, which DeepSpeed / FSDP do not expose. Launch on one device or with DDP "
                "(recipes/accelerate_configs/multi_gpu.yaml)."
            )
        # Each term is normalised over the accumulation window by `_get_num_items_in_batch`'s counts.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True  # makes the Trainer call `_get_num_items_in_batch`
        self.terms = tuple(f"{term}_peer{k}" for k in range(len(peers)) for term in ("task", "mutual"))
        self._term_metrics = TermMetrics(self.terms, self.args.device)
        self._term_mode, self._term_prefix = "train", "eval"
        self._nonfinite_guard = NonFiniteLossGuard(self.terms)
        self.add_callback(self._nonfinite_guard)

    @property
    def peers(self) -> PeerEnsemble:
        """The peers (`trainer.peers[k]` is peer k), outside any DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    # ---------------------------------------------------------------- data plumbing
    def _set_signature_columns_if_needed(self) -> None:
        # The ensemble's forward takes **inputs: keep the columns any peer reads, and the labels.
        if self._signature_columns is None:
            self._signature_columns = sorted(self.peers.input_names | {"label", "label_ids", *self.label_names})

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Counts over the whole gradient-accumulation window: rows (the mutual term) and labelled rows (task)."""
        if not batch_samples:
            return None
        counts = torch.zeros(NUM_COUNTS, dtype=torch.long, device=device)
        for batch in batch_samples:
            counts[ROWS] += batch["input_ids"].shape[0]
            labels = batch.get("labels")
            if labels is not None:
                counts[LABELS] += labels.ne(-100).sum().to(device)
        return gather_counts(self, counts, NUM_COUNTS)

    # ---------------------------------------------------------------- the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        args = self.args
        labels = inputs.get("labels")
        counts = window_counts(num_items_in_batch, NUM_COUNTS)
        scale = ddp_loss_scale(self, counts)  # DDP averages gradients; the counts are summed over the processes
        if labels is not None and labels.is_floating_point():
            raise ValueError(
                f"the labels are floats ({labels.dtype}: regression or multi-label), but mutual learning compares the "
                "peers' softmaxes over classes: give integer class ids (single-label classification)."
            )

        peer_logits = model(**{k: v for k, v in inputs.items() if k != "labels"})  # one forward through DDP
        rows = inputs["input_ids"].shape[0]
        terms: dict[str, torch.Tensor] = {}
        micro: dict[str, torch.Tensor | int] = {}  # this micro-batch's items, per term
        window: dict[str, torch.Tensor | None] = {}  # the window's items it was divided by
        if args.task_weight > 0 and labels is not None:
            n_labelled = counts[LABELS] if counts is not None else None
            for k, z in enumerate(peer_logits):
                name = f"task_peer{k}"
                terms[name] = task_loss(z, labels, num_items_in_batch=n_labelled, problem_type=SINGLE_LABEL)
                micro[name], window[name] = labels.ne(-100).sum(), n_labelled
        if args.logits_weight > 0:
            n_rows = counts[ROWS] if counts is not None else None
            mutual = mutual_terms(
                peer_logits,
                loss_fn=KD_LOGIT_LOSSES[args.logits_loss],
                temperature=args.temperature,
                num_items_in_batch=n_rows,
                **args.logits_loss_kwargs,
            )
            for k, value in enumerate(mutual):
                terms[f"mutual_peer{k}"] = value
                micro[f"mutual_peer{k}"], window[f"mutual_peer{k}"] = rows, n_rows
        if not terms:
            raise ValueError(
                "no loss term could be computed for this batch: task_weight > 0 needs a 'labels' column and "
                "logits_weight is 0. Add labels or set logits_weight > 0."
            )
        weights = {"task": args.task_weight, "mutual": args.logits_weight}
        loss = sum(weights[name.split("_peer")[0]] * value for name, value in terms.items()) * scale

        for name, value in terms.items():
            # Each term is sum / denominator (clamped to 1); buffering sum and items keeps exact window means.
            denominator = window[name] if window[name] is not None else micro[name]
            denominator = denominator.clamp(min=1) if torch.is_tensor(denominator) else max(denominator, 1)
            self._term_metrics.add(self._term_mode, name, value.detach() * denominator, micro[name])
        if model.training:
            self._nonfinite_guard.observe(loss, terms)
        if return_outputs:
            # prediction_step hands every output but the loss to compute_metrics: the K peers' logits.
            return loss, {"loss": loss, "logits": tuple(z.detach() for z in peer_logits)}
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip each peer's gradients by its own norm (as its own optimizer would); return the norm over all peers.

        The gradients are complete here (after the window's last backward, all-reduced under DDP), so every process
        clips alike. fp16 gradients are unscaled once, for all peers, before their norms are taken.
        """
        self.accelerator.unscale_gradients()
        norms = [torch.nn.utils.clip_grad_norm_(peer.parameters(), self.args.max_grad_norm) for peer in self.peers]
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))

    # ---------------------------------------------------------------- saving and loading
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Each peer as a plain transformers model (with the tokenizer) in `<output_dir>/peer<k>/`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        for k, peer in enumerate(self.peers):
            folder = peer_folder(output_dir, k)
            own = None
            if state_dict is not None:
                own = {key[len(f"{k}.") :]: v for key, v in state_dict.items() if key.startswith(f"{k}.")}
            peer.save_pretrained(folder, state_dict=own)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load every peer from the checkpoint's `peer<k>/` folders (what `_save` wrote)."""
        ensemble = self.accelerator.unwrap_model(model if model is not None else self.model)
        missing = [peer_folder(resume_from_checkpoint, k) for k in range(len(ensemble))]
        missing = [folder for folder in missing if not os.path.isdir(folder)]
        extra = peer_folder(resume_from_checkpoint, len(ensemble))
        if missing or os.path.isdir(extra):
            found = sorted(name for name in os.listdir(resume_from_checkpoint) if name.startswith("peer"))
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} holds the peer folders {found}, but this trainer has "
                f"{len(ensemble)} peers (peer0 .. peer{len(ensemble) - 1}): it was written by another run. Resume "
                "with the same peers, or start from scratch (resume_from_checkpoint=None)."
            )
        for k, peer in enumerate(ensemble):
            saved = type(peer).from_pretrained(peer_folder(resume_from_checkpoint, k), dtype=peer.dtype)
            peer.load_state_dict(saved.state_dict())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
