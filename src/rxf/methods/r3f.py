"""R3F: the task loss plus lambda * KL_S between predictions on clean and noised word
embeddings (Aghajanyan et al., ICLR 2021, eq. 1):

    L_R3F = L(theta) + lambda * E_x[ KL_S( g.f(e), g.f(e + z) ) ],   z ~ N(0, s^2) or U(-s, s)

One extra forward pass and no extra backward call: the single backward goes through the
graphs of both passes. The noise enters inside the model's forward, on the output of its
word-embedding module (``rxf.models.perturbed_embeddings``). The symmetric KL is float32
and differentiable through both distributions. For a scalar regression head the squared
error between the two predictions replaces the KL (see ``rxf.divergence``). In eval mode
only the clean pass runs, so evaluation costs what Standard's does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rxf.divergence import output_divergence
from rxf.methods.options import MethodOptions
from rxf.methods.base import Logs, Method
from rxf.methods.standard import task_loss
from rxf.models import extra_pass_model, logits_of, perturbed_embeddings, warn_if_eval_mode
from rxf.noise import sample_noise


def noised(options: MethodOptions):
    """e -> e + z (or e.detach() + z with ``r3f_detach_embeddings``): (B, T, H) -> (B, T, H)."""

    def perturb(e: torch.Tensor) -> torch.Tensor:
        base = e.detach() if options.r3f_detach_embeddings else e
        return base + sample_noise(e, options.resolved_noise_type(generation=False), options.noise_eps)

    return perturb


def r3f_loss(
    model: nn.Module, batch: dict[str, Any], options: MethodOptions
) -> tuple[torch.Tensor, Logs]:
    """R3F (and R4F, whose difference lies in the model's head) loss for one batch.

    Args:
        model: a Hugging Face sequence-classification model (or DDP around one).
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T), optional
            ``token_type_ids`` (B, T), ``labels`` (B,).
        options: uses ``noise_type``, ``noise_eps``, ``r3f_lambda``,
            ``r3f_detach_embeddings``, ``r3f_noised_no_grad``, ``r3f_concat_batch``.

    Returns:
        ``(loss, logs)``: the scalar loss to back-propagate once, and detached terms
        (``task_loss``, ``regularizer``) with the passes this call ran.

    ``r3f_noised_no_grad`` makes the noised pass a fixed target (no gradient through it),
    run before the clean pass; ``r3f_concat_batch`` runs both inputs as one batch of 2B.
    """
    warn_if_eval_mode(model, options.method)
    training = model.training
    concat = batch["input_ids"].is_cuda if options.r3f_concat_batch is None else options.r3f_concat_batch
    concat = training and concat and not options.r3f_noised_no_grad

    def noised_pass() -> torch.Tensor:
        extra = extra_pass_model(model)
        with perturbed_embeddings(extra, noised(options)):
            return logits_of(extra, batch)

    noised_logits = None
    if training and options.r3f_noised_no_grad:
        # The fixed target runs first, so that no activations are held during it and the
        # backward follows the clean pass that saved them (see docs/performance.md).
        with torch.no_grad():
            noised_logits = noised_pass()
    if concat:
        # One pass over the (2B, T) stack of the batch with itself; the noise goes on the
        # second half of the (2B, T, H) embeddings.
        size = batch["input_ids"].shape[0]
        perturb = noised(options)
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        with perturbed_embeddings(model, lambda e: torch.cat([e[:size], perturb(e[size:])])):
            clean, noised_logits = logits_of(model, doubled).chunk(2)
    else:
        clean = logits_of(model, batch)  # (B, C)
    loss = task_loss(clean, batch["labels"])
    logs: Logs = {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    if not training:
        return loss, logs

    if noised_logits is None:
        noised_logits = noised_pass()
    regularizer = output_divergence(clean, noised_logits)
    # Passes over a batch of B: the 2B stack counts as two.
    logs.update(regularizer=regularizer.detach(), forward_passes=2)
    return loss + options.r3f_lambda * regularizer, logs


class R3F(Method):
    """R3F's life cycle: nothing to set up or keep; the loss is ``r3f_loss``."""

    def loss(self, model, batch):
        return r3f_loss(model, batch, self.options)
