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

    ``r3f_noised_no_grad`` makes the noised pass a fixed target (no gradient through it),
    run before the clean pass; ``r3f_concat_batch`` runs both inputs as one batch of 2B.
    """
    embeds = embed(model, batch["input_ids"])  # (B, T, H)
    noisy = model.training
    base = embeds.detach() if options.r3f_detach_embeddings else embeds
    concat = embeds.is_cuda if options.r3f_concat_batch is None else options.r3f_concat_batch
    concat = concat and not options.r3f_noised_no_grad

    def noised_pass() -> torch.Tensor:
        # Reuses the looked-up embeddings rather than a second table lookup. The extra pass
        # runs on the module inside any DDP wrapper: DDP allows one forward per backward, and
        # its gradient hooks sit on the parameters, so both passes' gradients are still
        # all-reduced together, once.
        return forward_embeds(unwrap(model), base + sample_noise(embeds, options.noise_type, options.noise_eps), batch)

    noised = None
    if noisy and options.r3f_noised_no_grad:
        # The fixed target runs first, so that no activations are held during it and the
        # backward follows the clean pass that saved them (see docs/performance.md).
        with torch.no_grad():
            noised = noised_pass()
    if noisy and concat:
        # One pass over the (2B, T, H) stack of clean and noised embeddings.
        noise = sample_noise(embeds, options.noise_type, options.noise_eps)
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        clean, noised = forward_embeds(model, torch.cat([embeds, base + noise]), doubled).chunk(2)
    else:
        clean = forward_embeds(model, embeds, batch)  # (B, C)
    loss = task_loss(clean, batch["labels"])
    logs: Logs = {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    if not noisy:
        return loss, logs

    if noised is None:
        noised = noised_pass()
    regularizer = output_divergence(clean, noised)
    # Passes over a batch of B: the 2B stack counts as two.
    logs.update(regularizer=regularizer.detach(), forward_passes=2)
    return loss + options.r3f_lambda * regularizer, logs
