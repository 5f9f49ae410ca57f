"""The one place that knows model kinds and how a perturbation reaches a model.

Every method perturbs e = E(x), the output of the model's word-embedding module
(``get_input_embeddings()``; for an encoder-decoder, the encoder's or the decoder's): the
plain lookup, before the model adds position/type embeddings, scales, applies LayerNorm
and dropout. The perturbation enters *inside* the model's own forward, through a forward
hook on that module that replaces its output e by e + z while a perturbed pass runs (this
is how transformers applies NEFTune). The model is always called with its ordinary
inputs, so whatever its embedding step does besides the lookup — PEGASUS's and Marian's
sqrt(d) scale applied only to looked-up ids, RoBERTa's padding-aware position ids, FSDP2's
gathering of a sharded table — runs exactly as in evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

# Batch keys that are targets, not model inputs.
LABEL_KEYS = ("labels",)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP/FSDP/DataParallel/torch.compile wrappers and
    PEFT's ``PeftModel`` (whose base model carries the injected adapter layers)."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        else:
            inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def is_shard(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 parameter (a DTensor holding this process's shard)."""
    return hasattr(tensor, "full_tensor")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (gathering it is collective: every process
    must call this), else ``tensor`` itself."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def extra_pass_model(model: nn.Module) -> nn.Module:
    """The module a method runs its extra forward passes on: the model inside a DDP
    wrapper (DDP allows one forward per backward; its gradient hooks sit on the
    parameters, so the extra passes' gradients are still all-reduced with the main
    pass's, once per update), the model itself otherwise (FSDP2 shards in place, so its
    own hooks gather each unit for every pass). FSDP1 is refused: the module inside it
    holds flat, sharded parameters that only its wrapper's forward gathers."""
    if type(model).__name__ == "FullyShardedDataParallel":
        from rxf.errors import OptionError

        raise OptionError(
            "FSDP1 (FullyShardedDataParallel) is not supported: a method's extra passes cannot run inside its "
            "wrapper; use FSDP2 (fully_shard; Accelerate's fsdp_version 2) or DDP"
        )
    inner = getattr(model, "module", None)
    return inner if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and inner is not None else model


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its targets: what the model is called with."""
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


def logits_of(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's logits on the batch's ordinary inputs, e.g. (B, C) or (B, T, V)."""
    return model(**model_inputs(batch)).logits


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoder models (BART, T5, PEGASUS, Marian, mBART)."""
    return bool(getattr(unwrap(model).config, "is_encoder_decoder", False))


@functools.cache
def _generation_class_names() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | frozenset(
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()
    )


def is_generation_model(model: nn.Module) -> bool:
    """True for encoder-decoder and decoder-only language models (their logits are
    (B, T, V) over a vocabulary), False for sequence classifiers."""
    return type(unwrap(model)).__name__ in _generation_class_names()


def with_decoder_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """A seq2seq batch with ``decoder_input_ids`` made from its labels when absent (the
    labels shifted right, as the model itself would make them)."""
    if "decoder_input_ids" in batch or "decoder_inputs_embeds" in batch:
        return batch
    return {**batch, "decoder_input_ids": unwrap(model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])}


def embedding_module(model: nn.Module, target: str = "encoder") -> nn.Module:
    """The word-embedding module whose output a perturbation replaces: the encoder's
    (``target="encoder"``) or the decoder's (``"decoder"``) for an encoder-decoder model,
    the model's only one otherwise. For BART in transformers 5, ``get_input_embeddings()``
    is a tied table that the forward never calls, so each stack's own module is used."""
    inner = unwrap(model)
    if is_seq2seq(inner):
        stack = inner.get_encoder() if target == "encoder" else inner.get_decoder()
        return stack.get_input_embeddings()
    return inner.get_input_embeddings()


@contextlib.contextmanager
def perturbed_embeddings(
    model: nn.Module, perturb: Callable[[torch.Tensor], torch.Tensor], target: str = "encoder"
) -> Iterator[None]:
    """Inside the block, every call of the model's word-embedding module returns
    ``perturb(e)`` instead of its output e, (B, T, H) -> (B, T, H).

    A block in which the module was never called raises: a perturbation that silently
    reaches nothing (a model that bypasses its embedding module) would turn every method
    into Standard fine-tuning without a word."""
    module = embedding_module(model, target)
    calls = 0

    def hook(_module, _args, output):
        nonlocal calls
        calls += 1
        return perturb(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if calls == 0:
        raise RuntimeError(
            f"the perturbation never reached {type(unwrap(model)).__name__}: its word-embedding module "
            f"{type(module).__name__} was not called during the perturbed pass"
        )


def token_mask(batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) mask in ``like``'s dtype: 1 on real tokens, 0 on padding, so that
    perturbations never touch padding."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(like.shape[:2] + (1,), dtype=like.dtype, device=like.device)
    return mask.unsqueeze(-1).to(like.dtype)


_warned_eval_mode: set[str] = set()


def warn_if_eval_mode(model: nn.Module, method: str) -> None:
    """``from_pretrained`` returns a model in eval mode, where a regulariser's extra passes
    (which run only in training) are skipped: in a user's own loop that silently turns the
    method into Standard fine-tuning. Warn once per method when gradients are on."""
    if model.training or not torch.is_grad_enabled() or method in _warned_eval_mode:
        return
    _warned_eval_mode.add(method)
    import warnings

    warnings.warn(
        f"rxf {method}: the model is in eval mode, so only the clean pass runs and no regulariser is added; "
        "call model.train() before training (from_pretrained returns a model in eval mode)",
        stacklevel=3,
    )


def classification_head(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The task head g of model = g o f: the model's direct children other than the
    pre-trained base model (and parameter-free modules such as dropout).

    BERT -> [classifier]; RoBERTa/XLM-R/ELECTRA -> [classifier (dense, out_proj)];
    DeBERTa-v2/v3 -> [pooler, classifier]; DistilBERT -> [pre_classifier, classifier].
    Returns an empty list when the model has no separate base model.
    """
    model = unwrap(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return []
    return [
        (name, child)
        for name, child in model.named_children()
        if child is not base and any(True for _ in child.parameters())
    ]


# The files that make a model folder what it computes: weights, configuration, tokenizer.
DEFINING_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".txt", ".model", ".spm", ".jinja")
NOT_DEFINING_FILES = ("training_args.bin",)  # the Trainer's arguments, saved beside a checkpoint


def model_fingerprint(path: str) -> str:
    """A hash of the content of a local model folder's weights, configuration and
    tokenizer files (or of the name for a hub model, whose files the hub versions): what a
    model *is*, where its path only says where it lies (a folder retrained or edited in
    place keeps its path)."""
    folder = Path(path)
    if not folder.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix not in DEFINING_SUFFIXES or file.name in NOT_DEFINING_FILES:
            continue
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check_model_folder(flag: str, path) -> None:
    """Refuse a local folder that is not a whole model: no config.json (an empty folder, a
    run folder whose model is in best/), or no tokenizer vocabulary — transformers then
    builds the model type's tokenizer with an empty vocabulary, which maps every word to
    [UNK], and a run trains and predicts on nothing without a word of complaint."""
    from rxf.errors import OptionError

    folder = Path(path)
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        if (folder / "best" / "config.json").is_file():
            raise OptionError(f"{flag}: {folder} is a run folder; its fine-tuned model is {folder / 'best'}")
        raise OptionError(f"{flag}: cannot load {folder} (no config.json in it: a model folder holds config.json, "
                          "the weights and the tokenizer's files)")
    names = [p.name for p in folder.iterdir()]
    if not any(n == "tokenizer.json" or n.startswith("vocab") or n.endswith((".model", ".spm")) for n in names):
        raise OptionError(f"{flag}: {folder} has no tokenizer files (tokenizer.json, vocab.*, *.model): save the "
                          "tokenizer beside the model (tokenizer.save_pretrained)")


def longest_input(model: nn.Module, tokenizer) -> int | None:
    """The most tokens the model takes (its position table; the tokenizer's limit where
    that is lower, as for RoBERTa's 514 positions of which 512 are usable); None when it
    has no absolute positions."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    declared = getattr(tokenizer, "model_max_length", None)
    usable = isinstance(declared, int) and 0 < declared < positions  # unset: a huge sentinel
    return declared if usable else positions


def check_max_length(flag: str, max_length: int, model: nn.Module, tokenizer) -> None:
    """Refuse ``max_length`` above what the model takes: a longer example would end the run
    with a shape error mid-training."""
    from rxf.errors import OptionError

    limit = longest_input(model, tokenizer)
    if limit is not None and max_length > limit:
        raise OptionError(f"{flag}: {max_length} tokens is more than the model takes ({limit}); give at most {limit}")
