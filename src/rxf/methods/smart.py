"""SMART (Jiang et al., ACL 2020, arXiv 1911.03437), the adversarial trust-region
baseline of Aghajanyan et al. (2021):

    min_theta  L(theta) + lambda_s * R_s(theta) + mu * D_Breg(theta, theta~)
    R_s = E_x max_{||delta|| <= eps} KL_S( g.f(e), g.f(e + delta) )

The inner maximisation takes S projected ascent steps from delta_0 ~ N(0, sigma^2):
delta <- Proj_eps(delta + eta * grad / ||grad||), with the clean distribution held fixed.
The regulariser is then evaluated at the delta found (delta detached), with gradient to
the parameters. The Bregman proximal term compares the student with an exponential
moving average ("momentum") teacher theta~ <- (1 - beta) theta + beta theta~.

Unlike the public mt-dnn and smart-pytorch code, the perturbation is projected onto the
eps-ball, padding is never perturbed, the Bregman term is implemented, and the word
embeddings (not the full embedding module's output) are perturbed.

Passes per update: 1 clean + S ascent + 1 final forward, S ascent backward (through
``torch.autograd.grad`` to delta only, so no parameter gradient is touched or
all-reduced) + the caller's 1 backward; plus one gradient-free teacher forward when the
Bregman term is on (``teacher_forward_passes``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from rxf.divergence import output_divergence
from rxf.errors import OptionError
from rxf.methods.options import MethodOptions
from rxf.methods.standard import Logs, task_loss
from rxf.models import LABEL_KEYS, embed, forward_embeds, is_shard, token_mask, unwrap


class EMATeacher:
    """The momentum teacher theta~ of SMART's Bregman proximal point term.

    Call ``update(model, step, total_steps)`` after each optimiser step: beta is
    ``smart_beta`` for the first ``smart_beta_switch`` fraction of updates, then
    ``smart_beta_late``.
    """

    def __init__(self, model: nn.Module, options: MethodOptions):
        self.options = options
        inner = unwrap(model)
        if any(is_shard(p) for p in inner.parameters()):
            raise OptionError(
                "SMART's Bregman teacher (--smart-bregman, on by default) keeps a full copy of the model, which "
                "cannot be made of a model sharded by FSDP; turn it off (--no-smart-bregman, smart_bregman=False) "
                "or train with DDP"
            )
        self.model = copy.deepcopy(inner).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, total_steps: int) -> None:
        o = self.options
        beta = o.smart_beta if step < o.smart_beta_switch * max(total_steps, 1) else o.smart_beta_late
        student = dict(unwrap(model).named_parameters())
        for name, teacher_param in self.model.named_parameters():
            teacher_param.mul_(beta).add_(student[name].detach(), alpha=1.0 - beta)
        student_buffers = dict(unwrap(model).named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(student_buffers[name])

    @torch.no_grad()
    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS}).logits


def _normalise(grad: torch.Tensor, norm: str, mask: torch.Tensor) -> torch.Tensor:
    """grad / ||grad|| in float32: per token for ``inf``, per example for ``l2``."""
    grad = grad.float()
    if norm == "inf":
        scale = grad.abs().amax(dim=-1, keepdim=True)
    else:
        scale = grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    return grad / (scale + 1e-12) * mask


def _project(delta: torch.Tensor, norm: str, radius: float) -> torch.Tensor:
    """Projection onto the radius ball: per-coordinate clamp (inf, each token's max
    coordinate <= radius) or per-example rescale (l2)."""
    if norm == "inf":
        return delta.clamp(-radius, radius)
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
    return delta * (radius / norms.clamp_min(radius))


def find_perturbation(
    model: nn.Module,
    embeds: torch.Tensor,
    clean_logits: torch.Tensor,
    batch: dict[str, Any],
    options: MethodOptions,
) -> torch.Tensor:
    """S steps of projected gradient ascent on KL_S(clean, perturbed).

    Args:
        embeds: (B, T, H) word embeddings, detached.
        clean_logits: (B, C) clean logits, detached (held fixed during the search).

    Returns:
        delta (B, T, H), detached, inside the eps-ball, zero on padding.
    """
    mask = token_mask(batch, embeds).float()
    delta = torch.randn(embeds.shape, device=embeds.device, dtype=torch.float32) * options.smart_noise_var * mask
    delta = _project(delta, options.smart_norm, options.smart_epsilon)
    for _ in range(options.smart_steps):
        delta.requires_grad_(True)
        perturbed = forward_embeds(model, embeds + delta.to(embeds.dtype), batch)
        divergence = output_divergence(perturbed, clean_logits)
        (grad,) = torch.autograd.grad(divergence, delta)
        step = options.smart_step_size * _normalise(grad, options.smart_norm, mask)
        delta = _project(delta.detach() + step, options.smart_norm, options.smart_epsilon) * mask
    return delta.detach()


def smart_loss(
    model: nn.Module,
    batch: dict[str, Any],
    options: MethodOptions,
    teacher: EMATeacher | None = None,
) -> tuple[torch.Tensor, Logs]:
    """SMART loss for one batch (shapes as ``r3f_loss``).

    ``teacher`` is required when ``options.smart_bregman`` is on and the model is in
    training mode; pass ``None`` otherwise.

    Returns ``(loss, logs)`` with ``task_loss``, ``regularizer`` (R_s), ``bregman``.
    """
    embeds = embed(model, batch["input_ids"])
    clean = forward_embeds(model, embeds, batch)
    loss = task_loss(clean, batch["labels"])
    logs: Logs = {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    if not model.training:
        return loss, logs

    # Extra passes run on the module inside any DDP wrapper (one DDP forward per
    # backward); the parameters' gradient hooks still all-reduce the sum once.
    inner = unwrap(model)
    delta = find_perturbation(inner, embeds.detach(), clean.detach(), batch, options)
    perturbed = forward_embeds(inner, embeds + delta.to(embeds.dtype), batch)
    regularizer = output_divergence(clean, perturbed)
    loss = loss + options.smart_lambda * regularizer
    logs.update(
        regularizer=regularizer.detach(),
        forward_passes=2 + options.smart_steps,
        backward_passes=1 + options.smart_steps,
    )
    if options.smart_bregman:
        if teacher is None:
            raise ValueError("smart_loss: smart_bregman is on but no EMATeacher was given")
        bregman = output_divergence(clean, teacher.logits(batch))
        loss = loss + options.smart_mu * bregman
        logs.update(bregman=bregman.detach(), teacher_forward_passes=1)
    return loss, logs
