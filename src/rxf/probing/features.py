"""Sentence representations from a frozen encoder, extracted once and cached on disk.

Probing (Aghajanyan et al. 2021, Section 4) asks how much a fine-tuned encoder f still
knows: f is frozen — eval mode, dropout off, no gradient — and only a linear layer is
trained on its representations. Since f never changes, its representations of a task's
examples are computed once and cached, keyed by the checkpoint's weights (a hash of the
weight files, so a retrained checkpoint in the same folder is not mistaken for the old
one), the texts, the pooling, the layer and the maximum length.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from rxf.errors import unloadable_model
from rxf.models import check_model_folder, model_fingerprint
from rxf.tasks.loading import Examples

def load_encoder(path: str, trust_remote_code: bool = False):
    """(tokenizer, encoder) with the encoder frozen: eval mode, no gradients."""
    from transformers import AutoModel, AutoTokenizer

    check_model_folder("--checkpoint", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        encoder = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    except Exception as exc:  # OSError (no such folder or hub model), ValueError, safetensors' errors alike
        raise unloadable_model("--checkpoint", path, exc) from None
    encoder.requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode(
    encoder, tokenizer, examples: Examples, max_length: int = 128, pooling: str = "cls",
    layers: list[int] | None = None, batch_size: int = 64,
) -> np.ndarray:
    """(N, H) float32 representations; with ``layers``, (L, N, H) for those hidden-state
    indices (0 = embeddings). ``pooling``: ``cls`` (first token, the classifier's input)
    or ``mean`` (over real tokens)."""
    from transformers import DataCollatorWithPadding

    encoder.eval()
    device = next(encoder.parameters()).device
    texts = [examples.text_a] + ([examples.text_b] if examples.text_b is not None else [])
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)  # once, unpadded
    # Batches in order of length pad each to its own longest example: about half the
    # tokens of file order on GLUE pair tasks. Rows go back to file order at the end.
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = collate([{k: v[i] for k, v in encoded.items()} for i in order[start:start + batch_size]]).to(device)
        out = encoder(**batch, output_hidden_states=layers is not None)
        states = [out.hidden_states[i] for i in layers] if layers is not None else [out.last_hidden_state]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = [s[:, 0] if pooling == "cls" else (s * mask).sum(1) / mask.sum(1) for s in states]
        chunks.append(torch.stack(pooled).float().cpu().numpy())
    in_length_order = np.concatenate(chunks, axis=1)
    stacked = np.empty_like(in_length_order)
    stacked[:, order] = in_length_order
    return stacked if layers is not None else stacked[0]


def cache_root() -> Path:
    return Path(os.environ.get("RXF_CACHE", Path.home() / ".cache" / "rxf")) / "features"


def cached_features(
    checkpoint: str, examples: Examples, max_length: int = 128, pooling: str = "cls",
    encoder_and_tokenizer=None, trust_remote_code: bool = False,
) -> tuple[np.ndarray, bool]:
    """Representations of ``examples`` by the frozen ``checkpoint``: (features (N, H),
    whether they came from the cache). ``encoder_and_tokenizer`` avoids reloading."""
    key = hashlib.sha256(json.dumps(
        [model_fingerprint(checkpoint), examples.text_a, examples.text_b, max_length, pooling]
    ).encode()).hexdigest()[:24]
    path = cache_root() / f"{key}.npy"
    if path.is_file():
        return np.load(path), True
    tokenizer, encoder = encoder_and_tokenizer or load_encoder(checkpoint, trust_remote_code)
    features = encode(encoder, tokenizer, examples, max_length, pooling)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, features)
    os.replace(tmp, path)
    return features, False
