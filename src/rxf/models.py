"""The one place that knows how to reach a Hugging Face model's word embeddings and how
to call it with ``inputs_embeds``.

Every method perturbs e = E(x), the output of ``model.get_input_embeddings()`` — the
plain word-embedding lookup, before the model adds position/type embeddings, applies
LayerNorm and dropout. Feeding the *full* embedding module's output back as
``inputs_embeds`` (as some SMART implementations do) would add position embeddings and
LayerNorm twice.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from rxf.errors import OptionError

# Batch keys that are targets, not model inputs.
LABEL_KEYS = ("labels",)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP/FSDP/DataParallel/torch.compile wrappers and
    PEFT's ``PeftModel`` (whose base model carries the injected adapter layers)."""
    *_, inner = _wrapping_chain(model)
    return inner


def _wrapping_chain(model: nn.Module):
    """``model``, the module it wraps, the module that one wraps, ... down to the model."""
    while True:
        yield model
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        else:
            inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return
        model = inner


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Word embeddings e = E(x): (B, T) token ids -> (B, T, H)."""
    chain = list(_wrapping_chain(model))
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in chain):
        raise OptionError(
            "FSDP1 (FullyShardedDataParallel) is not supported: rxf looks up the word embeddings outside the "
            "model's forward, where FSDP1's flat parameters are sharded. Use FSDP2 (fully_shard; Accelerate's "
            "fsdp_version 2) with the embedding table as a unit of its own, or DDP"
        )
    inner = chain[-1]
    table = inner.get_input_embeddings()
    if _is_fsdp2(inner):
        _prepare_fsdp2_lookup(inner, table)
    return table(input_ids)


def is_shard(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 parameter (a DTensor holding this process's shard)."""
    return hasattr(tensor, "full_tensor")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (gathering it is collective: every process
    must call this), else ``tensor`` itself."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _prepare_fsdp2_lookup(root: nn.Module, table: nn.Module) -> None:
    """rxf looks the word embeddings up outside the model's forward. Under FSDP2
    (``fully_shard``) that is right only when the table is a unit of its own: its hooks
    gather it for the lookup and reduce its gradient after the lookup's backward (inside
    the root unit, the root would reduce before that gradient arrives). FSDP2 also makes
    the first unit called the root, so the root is initialised before the table is called."""
    if not _is_fsdp2(table):
        raise OptionError(
            "FSDP2: rxf's methods look up the word embeddings outside the model's forward, which needs the "
            "embedding table to be an FSDP unit of its own: call fully_shard(model.get_input_embeddings()) before "
            "sharding the layers and the model (with Accelerate/Trainer, add \"Embedding\" to the layer classes to wrap)"
        )
    root._get_fsdp_state()._lazy_init()  # private, but the only way; a no-op once initialised


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its token ids and labels: what goes beside ``inputs_embeds``."""
    return {k: v for k, v in batch.items() if k != "input_ids" and k not in LABEL_KEYS}


def forward_embeds(model: nn.Module, embeds: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Run ``model`` on (B, T, H) ``embeds`` with the batch's other inputs (attention
    mask, token type ids, ...) and return its logits, e.g. (B, C)."""
    return model(inputs_embeds=embeds, **model_inputs(batch)).logits


def token_mask(batch: dict[str, Any], embeds: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) float mask that is 1 on real tokens and 0 on padding, so that
    perturbations never touch padding."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(embeds.shape[:2] + (1,), dtype=embeds.dtype, device=embeds.device)
    return mask.unsqueeze(-1).to(embeds.dtype)


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
