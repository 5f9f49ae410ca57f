"""Tokenise ``Examples`` once into a ``datasets.Dataset``, cached on disk.

The cache key covers the texts and labels, the tokenizer (its class, vocabulary size and
name) and the maximum length, so a changed file or tokenizer never reuses a stale cache.
Sequences are truncated, not padded: ``DataCollatorWithPadding`` pads each batch to its
own longest sequence (dynamic padding).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from datasets import Dataset, load_from_disk

from rxf.tasks.loading import Examples


def cache_root() -> Path:
    return Path(os.environ.get("RXF_CACHE", Path.home() / ".cache" / "rxf")) / "tokenized"


def cache_key(examples: Examples, tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), max_length]).encode())
    for column in (examples.text_a, examples.text_b or [], examples.labels):
        digest.update(json.dumps(column).encode())
    return digest.hexdigest()[:24]


def tokenize(examples: Examples, tokenizer, max_length: int, use_cache: bool = True) -> Dataset:
    """(N,) examples -> Dataset with ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` where the tokenizer makes them) and ``labels``."""
    path = cache_root() / cache_key(examples, tokenizer, max_length)
    if use_cache and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    encoded = tokenizer(
        examples.text_a, examples.text_b, truncation=True, max_length=max_length, padding=False
    ) if examples.text_b is not None else tokenizer(examples.text_a, truncation=True, max_length=max_length)
    dataset = Dataset.from_dict({**encoded, "labels": examples.labels})
    if use_cache:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process cached the same data first
            shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(path))
    return dataset
