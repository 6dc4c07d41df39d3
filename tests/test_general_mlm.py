"""DistilBERT's triple loss for general distillation of a masked LM (Sanh et al. 2019,
https://arxiv.org/abs/1910.01108): masked-LM loss + KD on the masked-LM logits at temperature T + cosine between the
last hidden states, on batches that `DataCollatorForLanguageModeling` masks at random, against a reference written
from the paper's definitions. The teacher cache refuses such a collator (tests/test_cache_collators.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, tiny_bert_config
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

from hf_distill import DistillationConfig, DistillationTrainer, make_student

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# DistilBERT's weights: alpha_ce 5.0 (KD), alpha_mlm 2.0, alpha_cos 1.0, temperature 2.0.
TRIPLE = dict(task_weight=2.0, logits_weight=5.0, hidden_weight=1.0, hidden_loss="cosine", layer_mapping="last")


def masked_batch(tokenizer, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(5 + k),), generator=g)) for k in range(n)]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.3, seed=seed)
    return collator([tokenizer(t) for t in texts])


def reference_triple_loss(student, teacher, batch, temperature: float) -> torch.Tensor:
    """2 * MLM + 5 * T^2 KL(teacher_T || student_T) over the masked positions + 1 * (1 - cos) over the real tokens."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    s = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)
    labels = batch["labels"]
    masked = labels != -100
    mlm = F.cross_entropy(s.logits[masked], labels[masked])
    log_p_s = F.log_softmax(s.logits[masked] / temperature, dim=-1)
    p_t = F.softmax(t.logits[masked] / temperature, dim=-1)
    kd = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * temperature**2
    real = batch["attention_mask"].bool()
    cos = (1 - F.cosine_similarity(s.hidden_states[-1][real], t.hidden_states[-1][real], dim=-1)).mean()
    return 2.0 * mlm + 5.0 * kd + 1.0 * cos


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distilbert_triple_loss_on_randomly_masked_batches(tmp_path, tiny_tokenizer, temperature):
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config(vocab_size=len(tiny_tokenizer), num_layers=4, **NO_DROPOUT)).eval()
    student = make_student(teacher, num_layers=2)
    args = DistillationConfig(output_dir=str(tmp_path), temperature=temperature, report_to="none", **TRIPLE)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tiny_tokenizer)
    batch = masked_batch(tiny_tokenizer)
    assert (batch["labels"] != -100).sum() > 0 and (batch["labels"] == -100).sum() > 0

    loss = trainer.compute_loss(student, dict(batch))
    expected = reference_triple_loss(student, teacher, batch, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Each term is logged on its own: the masked-LM loss is the task term, scored on the masked positions only.
    logged = trainer._term_metrics.pop("train")
    assert {"loss_task", "loss_logits", "loss_hidden"} <= set(logged)

    # The gradient reaches the student through all three terms.
    loss.backward()
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
