"""benchmarks/lm_cache_topk.py on a tiny in-process Llama: the caches are built, the record has its fields, the sparse
loss is a lower bound of the full KL and equals it when k = V - 1."""

import importlib.util
import json
import os
import subprocess
import sys

import torch
from conftest import REPO, script_env, write_tiny_tsv
from transformers import LlamaConfig, LlamaForCausalLM

from hf_distill.cache import densify_top_k
from hf_distill.losses import kl_div_loss
from hf_distill.losses.sparse import sparse_teacher_distribution

SCRIPT = os.path.join(REPO, "benchmarks", "lm_cache_topk.py")
VOCAB = 64


def save_tiny_llama(path, tokenizer) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peakier than the random init: a tail that is not everything
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_script_writes_a_complete_record_on_a_tiny_llama(tmp_path, tiny_tokenizer):
    save_tiny_llama(tmp_path / "model", tiny_tokenizer)
    write_tiny_tsv(tmp_path / "train.tsv", 80, torch.Generator().manual_seed(0))
    out = tmp_path / "results" / "lm_cache_topk.json"
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.tsv"), "--num_sequences", "5"]
    args += ["--seq_len", "16", "--top_k", "2", "8", str(VOCAB - 1), "--student_layers", "1", "--batch_size", "2"]
    run = subprocess.run(
        [sys.executable, SCRIPT, *args, "--temperature", "2.0", "--out", str(out)],
        capture_output=True, text=True, env=script_env(CUDA_VISIBLE_DEVICES=""), timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "full-vocabulary KL" in run.stdout

    record = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # written atomically: no temporary left behind
    assert record["config"]["top_k"] == [2, 8, VOCAB - 1] and record["config"]["temperature"] == 2.0
    assert record["data"]["tokens"] == 80 and record["teacher"]["vocab_size"] == VOCAB
    assert record["student"] == {"layers": 1, "copied_from_teacher_layers": [1], "trained": False}
    assert record["full_kl"] > 0
    for k in (2, 8, VOCAB - 1):
        row = record["top_k"][str(k)]
        size = row["size"]
        assert size["payload_bytes_per_token"] == 8 * k + 4 and size["full_logits_bytes_per_token"] == 4 * VOCAB
        assert size["arrow_bytes"] >= size["payload_bytes_per_token"] * 80
        assert row["cached_vs_live_logprob_max_abs_diff"] < 1e-5
        assert row["sparse"]["lower_bound_holds"] and row["sparse"]["loss_rel_error"] >= -1e-6
        assert 0 < row["teacher_tail_mass"]["mean"] < 1
        assert set(row["renormalised"]) == {"loss", "loss_rel_error", "grad_rel_error", "grad_cosine"}
    # k = V - 1: the tail is one entry, the coarsened distribution is the full one.
    exact = record["top_k"][str(VOCAB - 1)]["sparse"]
    assert abs(exact["loss_rel_error"]) < 1e-5 and exact["grad_rel_error"] < 1e-4 and exact["grad_cosine"] > 0.9999
    # More ids, less error.
    errors = [record["top_k"][str(k)]["sparse"]["loss_rel_error"] for k in (2, 8, VOCAB - 1)]
    assert errors == sorted(errors, reverse=True)


def test_renormalised_top_k_kl_is_kl_div_loss_on_the_densified_top_k():
    spec = importlib.util.spec_from_file_location("lm_cache_topk", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 12, generator=g) * 2, torch.randn(2, 5, 12, generator=g) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    ids, logprobs, _ = sparse_teacher_distribution(teacher, 4, temperature=2.0)
    got = script.renormalised_top_k_kl(student, ids, logprobs, mask, temperature=2.0, num_items_in_batch=10)
    top = teacher.topk(4, dim=-1)
    expected = kl_div_loss(student, densify_top_k(top.indices, top.values, 12), temperature=2.0)
    torch.testing.assert_close(got, expected)
