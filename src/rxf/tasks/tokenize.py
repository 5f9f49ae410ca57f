"""Tokenise ``Examples`` once into a ``datasets.Dataset``, cached on disk.

The cache key covers the texts and labels, the tokenizer's own serialised state (see
``tokenizer_state``) and the maximum length, so a changed file or tokenizer (an edited
vocabulary, another lower-casing setting) never reuses a stale cache.
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


def tokenizer_state(tokenizer) -> str:
    """Everything about ``tokenizer`` that decides the ids it produces, as text.

    A fast tokenizer's backend serialises its whole pipeline (vocabulary, normaliser
    with its lower-casing, pre-tokeniser, post-processor with the special tokens, added
    tokens); a name or vocabulary size would miss an edit made in place. A slow one has
    no such serialisation: its vocabulary, init arguments (do_lower_case, ...) and the
    bytes of its vocabulary files (a SentencePiece model holds more than the vocabulary)
    stand in. The wrapper's own settings that change the output are added to either."""
    settings = {
        "class": type(tokenizer).__name__,
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        "model_input_names": list(getattr(tokenizer, "model_input_names", [])),  # token_type_ids or not
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # transformers sets these on the backend at each call, from the call's arguments
        # (max_length is in the key): leaving them in would make the key depend on
        # whether the tokenizer had been used before.
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        init_kwargs = getattr(tokenizer, "init_kwargs", {})
        files = {
            key: hashlib.sha256(Path(init_kwargs[key]).read_bytes()).hexdigest()
            for key in getattr(tokenizer, "vocab_files_names", {})
            if isinstance(init_kwargs.get(key), (str, Path)) and Path(init_kwargs[key]).is_file()
        }
        state = {"vocab": sorted(tokenizer.get_vocab().items()), "init_kwargs": init_kwargs, "files": files}
    # repr for the rest (AddedToken): an object without a stable repr only costs a cache miss.
    return json.dumps([settings, state], sort_keys=True, default=repr)


def cache_key(examples: Examples, tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([tokenizer_state(tokenizer), max_length]).encode())
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
