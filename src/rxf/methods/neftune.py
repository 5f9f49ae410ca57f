"""NEFTune (Jain et al. 2023, arXiv 2310.05914): noisy embeddings during fine-tuning.

In every training forward pass the word embeddings e (B, T, d) become

    e + eps * alpha / sqrt(L * d),    eps ~ U(-1, 1) per element,

with L the length of the sequence the token belongs to, counted in *real* tokens (the
attention mask), and no noise on padding. transformers' NEFTune (``neftune_noise_alpha``)
uses the padded length T for every row instead, so a short sequence in a padded batch gets
too little noise, and with packing (several sequences in one row) every sequence is scaled
by the row's length (transformers issue 34659). rxf counts each sequence: a row of a
packed batch is split where ``position_ids`` restart at 0, so each packed sequence gets
alpha / sqrt(L_own * d).

The noise enters through ``rxf.models.perturbed_embeddings`` on the ordinary training pass
(1 forward, 1 backward; with R3F or R-Drop every pass gets its own draw). Evaluation is
untouched. For an encoder-decoder the encoder's input embeddings are noised.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rxf.methods.composite import Modifier
from rxf.models import perturbed_embeddings, warn_if_eval_mode


def _rows(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """``mask`` (B, T) tiled to ``rows`` rows: R3F and R-Drop may stack the batch with
    itself (2B rows) in one pass."""
    if mask.shape[0] == rows:
        return mask
    if rows % mask.shape[0]:
        raise ValueError(f"NEFTune: {rows} embedding rows for a batch of {mask.shape[0]}")
    return mask.repeat(rows // mask.shape[0], 1)


def sequence_lengths(batch: dict[str, Any], rows: int, length: int) -> torch.Tensor:
    """(rows, T) float: for each real token the real length of its sequence, 0 on padding.

    Without ``position_ids`` a row is one sequence (padded); with them, a new sequence
    starts at every real token whose position id is 0 (packed rows)."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(rows, length, dtype=torch.long, device=batch["input_ids"].device)
    positions = batch.get("position_ids")
    if positions is not None and positions.shape[0] == 1:  # (1, T) position ids shared by the rows
        positions = positions.expand(mask.shape[0], -1)
    mask = _rows(mask, rows).bool()
    if positions is None:
        return mask.sum(dim=1, keepdim=True).float().expand(rows, length) * mask
    positions = _rows(positions, rows)
    segment = ((positions == 0) & mask).long().cumsum(dim=1)  # (rows, T): index of each token's sequence
    counts = torch.zeros(rows, length + 1, device=mask.device).scatter_add_(1, segment, mask.float())
    return counts.gather(1, segment) * mask


def neftune_scale(batch: dict[str, Any], embeds: torch.Tensor, alpha: float) -> torch.Tensor:
    """(rows, T, 1) in float32: alpha / sqrt(L * d) on real tokens, 0 on padding."""
    rows, length, width = embeds.shape
    lengths = sequence_lengths(batch, rows, length)
    return (alpha / (lengths.clamp_min(1.0) * width).sqrt() * (lengths > 0)).unsqueeze(-1)


def neftune_noise(embeds: torch.Tensor, batch: dict[str, Any], alpha: float) -> torch.Tensor:
    """The perturbation for embeddings (rows, T, d), in their dtype: U(-1, 1) * scale."""
    scale = neftune_scale(batch, embeds, alpha)
    noise = torch.empty(embeds.shape, device=embeds.device, dtype=torch.float32).uniform_(-1.0, 1.0)
    return (noise * scale).to(embeds.dtype)


class NEFTune(Modifier):
    """NEFTune's life cycle: nothing to set up or keep; noisy embeddings in training."""

    name = "neftune"

    def around(self, model, batch):
        if not model.training:
            warn_if_eval_mode(model, self.name)
            return contextlib.nullcontext()
        alpha = self.options.neftune_alpha
        # The noise is a constant offset: the embedding table keeps its gradient.
        return perturbed_embeddings(model, lambda e: e + neftune_noise(e, batch, alpha))
