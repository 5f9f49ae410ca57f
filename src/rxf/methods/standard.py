"""Standard and Standard++ fine-tuning: the task loss alone.

STD and STD++ compute the same loss; they differ only in the optimiser's Adam bias
correction and the training length (``MethodOptions.adam_bias_correction`` and
``train_length_factor``), which the trainer applies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rxf.methods.base import Logs, Method
from rxf.methods.options import MethodOptions
from rxf.models import logits_of


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy for (B, C) class logits and (B,) integer labels; mean squared error
    for a (B, 1) regression output and (B,) float targets. Computed in float32."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def standard_loss(
    model: nn.Module, batch: dict[str, Any], options: MethodOptions | None = None
) -> tuple[torch.Tensor, Logs]:
    """One forward pass and the task loss. ``batch`` holds ``input_ids`` (B, T),
    ``attention_mask`` (B, T), optional ``token_type_ids`` and ``labels`` (B,).

    Returns ``(loss, logs)``; the caller runs the one backward pass."""
    loss = task_loss(logits_of(model, batch), batch["labels"])
    return loss, {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}


class Standard(Method):
    """STD and STD++: the task loss; their optimiser and length come from the options."""

    def loss(self, model, batch):
        return standard_loss(model, batch)
