"""R3F: the task loss plus lambda * KL_S between predictions on clean and noised word
embeddings (Aghajanyan et al., ICLR 2021, eq. 1):

    L_R3F = L(theta) + lambda * E_x[ KL_S( g.f(e), g.f(e + z) ) ],   z ~ N(0, s^2) or U(-s, s)

One extra forward pass and no extra backward call: the single backward goes through the
graphs of both passes. The symmetric KL is float32 and differentiable through both
distributions. For a scalar regression head the squared error between the two
predictions replaces the KL (see ``rxf.divergence``). In eval mode only the clean pass
runs, so evaluation costs what Standard's does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rxf.divergence import output_divergence
from rxf.methods.options import MethodOptions
from rxf.methods.standard import Logs, task_loss
from rxf.models import embed, forward_embeds, unwrap
from rxf.noise import sample_noise


def r3f_loss(
    model: nn.Module, batch: dict[str, Any], options: MethodOptions
) -> tuple[torch.Tensor, Logs]:
    """R3F (and R4F, whose difference lies in the model's head) loss for one batch.

    Args:
        model: a Hugging Face sequence-classification model (or DDP around one).
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T), optional
            ``token_type_ids`` (B, T), ``labels`` (B,).
        options: uses ``noise_type``, ``noise_eps``, ``r3f_lambda``,
            ``r3f_detach_embeddings``.

    Returns:
        ``(loss, logs)``: the scalar loss to back-propagate once, and detached terms
        (``task_loss``, ``regularizer``) with the passes this call ran.
    """
    embeds = embed(model, batch["input_ids"])  # (B, T, H)
    clean = forward_embeds(model, embeds, batch)  # (B, C)
    loss = task_loss(clean, batch["labels"])
    logs: Logs = {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    if not model.training:
        return loss, logs

    # Reuse the looked-up embeddings rather than a second table lookup. The extra pass
    # runs on the module inside any DDP wrapper: DDP allows one forward per backward, and
    # its gradient hooks sit on the parameters, so both passes' gradients are still
    # all-reduced together, once.
    base = embeds.detach() if options.r3f_detach_embeddings else embeds
    noise = sample_noise(embeds, options.noise_type, options.noise_eps)
    noised = forward_embeds(unwrap(model), base + noise, batch)
    regularizer = output_divergence(clean, noised)
    logs.update(regularizer=regularizer.detach(), forward_passes=2)
    return loss + options.r3f_lambda * regularizer, logs
