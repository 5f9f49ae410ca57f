"""Shared fixtures: tiny randomly initialised encoders, a toy separable task, and the
paths of the real model and data (tests needing them skip with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DebertaV2Config, RobertaConfig

from rxf.experiments.parallel import threads_per_job

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100
ARCHITECTURES = ("bert", "roberta", "deberta-v2")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (``-n N``) each worker gets ``cores // N`` threads, as rxf's
    ``--jobs N`` gives its runs: N workers each with every core's threads would
    oversubscribe the cores. Commands a test starts inherit it through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = threads_per_job(workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_cores_between_workers()


def tiny_model(arch: str = "bert", num_labels: int = 2, dropout: float = 0.1, seed: int = 0):
    """A 2-layer, 32-wide randomly initialised sequence classifier."""
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    config = {
        "bert": lambda: BertConfig(**common),
        "roberta": lambda: RobertaConfig(pad_token_id=1, **common),
        "deberta-v2": lambda: DebertaV2Config(pooler_dropout=dropout, **common),
    }[arch]()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def toy_batch(batch_size: int = 8, length: int = 10, seed: int = 0, regression: bool = False):
    """A linearly separable batch: class 0 uses tokens 10..49, class 1 tokens 50..89;
    the second half of the batch is padded to random shorter lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size) % 2
    low = 10 + 40 * labels
    input_ids = low[:, None] + torch.randint(0, 40, (batch_size, length), generator=g)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for i in range(batch_size // 2, batch_size):
        keep = int(torch.randint(3, length, (1,), generator=g))
        attention_mask[i, keep:] = 0
        input_ids[i, keep:] = 0
    input_ids[:, 0] = 2  # a [CLS]-like first token
    target = labels.float() * 5.0 if regression else labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": target}


def shared_data_dir() -> Path | None:
    env = os.environ.get("RXF_DATA_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data absent: set RXF_DATA_DIR or place ../shared/data beside the checkout")
    return path


@pytest.fixture
def minilm_path() -> Path:
    try:
        from rxf.defaults import default_model_path
        return Path(default_model_path())
    except Exception as exc:  # the package is a declared dependency; say so if missing
        pytest.skip(f"the embedded MiniLM is not available: {exc}")


def write_tiny_checkpoint(folder: Path) -> Path:
    """A tiny random BERT *base model* (no head) with a character-level WordPiece
    tokenizer saved in ``folder``: any English text tokenizes, and ``rxf finetune``
    adds a fresh head of the task's size."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-&$%/#")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # vocab= (a dict): transformers 5 ignores vocab_file= here and would map every word to [UNK].
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenisation cache in a per-session temporary folder, not the user's home."""
    monkeypatch.setenv("RXF_CACHE", str(tmp_path_factory.getbasetemp() / "rxf-cache"))
