"""Shared fixtures: tiny models and a tiny WordPiece tokenizer, all built in-process (no hub, no network)."""

import os

# Before transformers/huggingface_hub are imported: they read these once. Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = (
    "the a an is was it this that movie film good bad great awful fun boring not very really plot actors "
    "story loved hated best worst and but of to in with for on love hate funny dull"
).split()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A real BertTokenizerFast over a 50-word vocabulary, written to a temp dir."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab` (a dict or a vocab.txt path); `vocab_file=` is ignored.
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path.parent)
    return tok


def tiny_bert_config(vocab_size: int = 64, num_layers: int = 4, hidden: int = 32, heads: int = 4, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        **{"num_labels": 2, **kw},
    )


@pytest.fixture
def tiny_teacher():
    """4-layer BERT classifier, hidden 32, 4 heads, in eval mode."""
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32)).eval()


@pytest.fixture
def tiny_student():
    """2-layer BERT classifier, hidden 16 (narrower than the teacher, so projections are needed), 4 heads."""
    torch.manual_seed(1)
    return BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16))


def script_env(**extra: str) -> dict[str, str]:
    """Environment for running one of the scripts in a subprocess: offline, one thread, this repository importable."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": REPO,
        "WANDB_DISABLED": "true",
        **extra,
    }


def write_tiny_tsv(path, n: int, generator: torch.Generator) -> None:
    """`n` random 3-9 word sentences over WORDS with alternating labels, as a `sentence<TAB>label` file."""
    rows = ["sentence\tlabel"]
    for i in range(n):
        idx = torch.randint(
            0, len(WORDS), (int(torch.randint(3, 10, (1,), generator=generator)),), generator=generator
        )
        rows.append(" ".join(WORDS[j] for j in idx.tolist()) + f"\t{i % 2}")
    path.write_text("\n".join(rows) + "\n")
