"""Configuration (t) of `scripts/bench_speed.py`: TextBrewer's `GeneralDistiller` doing (f)'s work.

TextBrewer (https://github.com/airaria/TextBrewer, `pip install --no-deps textbrewer`; 0.2.1 is pure Python on torch)
is the reference toolkit the issue compares against. Imported by `bench_speed.py` only when (t) runs.
"""

import copy
import importlib.util
import sys
import types

from transformers import DataCollatorWithPadding

from hf_distill.layer_mapping import build_layer_matches


def import_textbrewer():
    """The `textbrewer` module, or None when it is not installed.

    TextBrewer imports a tensorboard `SummaryWriter` at import time (tensorboardX, else torch.utils.tensorboard, which
    needs the `tensorboard` package) but only creates one when given a `log_dir`; (t) gives none, so where neither is
    installed a stand-in module is registered under `tensorboardX` rather than installing tensorboard for nothing.
    """
    if importlib.util.find_spec("textbrewer") is None:
        return None
    if importlib.util.find_spec("tensorboardX") is None and importlib.util.find_spec("tensorboard") is None:
        stand_in = types.ModuleType("tensorboardX")
        stand_in.SummaryWriter = None  # never called: TextBrewer makes a writer only when log_dir is set
        sys.modules["tensorboardX"] = stand_in
    import textbrewer

    return textbrewer


def textbrewer_adaptor(batch, outputs):
    # TextBrewer reads these keys: logits for the soft CE, hidden/attention by HF's indices, the model's own loss on
    # the labels as the hard-label term, the padding mask for the intermediate losses.
    return {
        "logits": outputs.logits,
        "hidden": outputs.hidden_states,
        "attention": outputs.attentions,
        "losses": outputs.loss,
        "inputs_mask": batch["attention_mask"],
    }


class TextBrewerRunner:
    """(t): TextBrewer's `GeneralDistiller` doing (f)'s work, one batch per `step`, as its training loop does.

    Both models run eager attention and return every layer's states and maps; the teacher runs under `no_grad`. The
    loss is TextBrewer's: hard-label CE x 0.5 + soft CE at T = 2 x 0.5, then hidden-state MSE (HF's hidden_states
    index = block + 1) and attention MSE on the matched pairs, weight 1/3 each, as (d) averages its 3 pairings.
    `optimizer` is the `(class, kwargs)` pair the Trainer would use (`Trainer.get_optimizer_cls_and_kwargs`).
    """

    def __init__(self, textbrewer, teacher, student, tokenizer, train, optimizer, output_dir):
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
        for model in (teacher, student):
            model.set_attn_implementation("eager")
        teacher.eval()
        student.train()
        pairs = build_layer_matches(
            "uniform", teacher.config.num_hidden_layers, student.config.num_hidden_layers, hidden_loss="mse"
        )  # (d)'s pairings
        matches = []
        for m in pairs:
            matches.append(
                {
                    "layer_T": m.teacher_layer + 1,
                    "layer_S": m.student_layer + 1,
                    "feature": "hidden",
                    "loss": "hidden_mse",
                    "weight": 1 / len(pairs),
                }
            )
            matches.append(
                {
                    "layer_T": m.teacher_layer,
                    "layer_S": m.student_layer,
                    "feature": "attention",
                    "loss": "attention_mse",
                    "weight": 1 / len(pairs),
                }
            )
        self.distiller = textbrewer.GeneralDistiller(
            textbrewer.TrainingConfig(device="cpu", log_dir=None, output_dir=str(output_dir)),
            textbrewer.DistillationConfig(
                temperature=2.0,
                kd_loss_type="ce",
                kd_loss_weight=0.5,
                hard_label_weight=0.5,
                intermediate_matches=matches,
            ),
            teacher,
            student,
            textbrewer_adaptor,
            textbrewer_adaptor,
        )
        optimizer_cls, optimizer_kwargs = optimizer
        self.optimizer = optimizer_cls(student.parameters(), **optimizer_kwargs)
        keep = ["input_ids", "token_type_ids", "attention_mask", "labels", "label"]
        self.prepared = train.select_columns([c for c in train.column_names if c in keep])
        self.data_collator = DataCollatorWithPadding(tokenizer)
        self.setup_seconds = 0.0
        self.teacher_cache = None
        self.steps = 0

    def step(self, indices: list[int]) -> None:
        # A plain dict: TextBrewer tests `type(batch) is dict` and would pass a BatchEncoding's keys positionally.
        batch = dict(self.data_collator(self.prepared.__getitems__(indices)))
        args = {"output_hidden_states": True, "output_attentions": True}
        total_loss, losses = self.distiller.train_on_batch(batch, args)
        self.distiller.write_loss(total_loss, self.steps, losses)  # its loop logs every step (a no-op writer here)
        total_loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1
