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
from rxf.methods.base import Logs, Method
from rxf.methods.options import MethodOptions
from rxf.methods.standard import task_loss
from rxf.models import (
    extra_pass_model, is_shard, logits_of, perturbed_embeddings, token_mask, unwrap, warn_if_eval_mode,
)


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
        return logits_of(self.model, batch)


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
    clean_logits: torch.Tensor,
    batch: dict[str, Any],
    options: MethodOptions,
) -> torch.Tensor:
    """S steps of projected gradient ascent on KL_S(clean, perturbed), the perturbation
    delta added to the detached word embeddings inside the model's forward.

    Args:
        clean_logits: (B, C) clean logits, detached (held fixed during the search).

    Returns:
        delta (B, T, H) float32, detached, inside the eps-ball, zero on padding.
    """
    delta = mask = None

    def perturb(e: torch.Tensor) -> torch.Tensor:
        nonlocal delta, mask
        if delta is None:  # delta_0 ~ N(0, sigma^2), made on the first call with e's shape
            mask = token_mask(batch, e).float()
            delta = torch.randn(e.shape, device=e.device, dtype=torch.float32) * options.smart_noise_var * mask
            delta = _project(delta, options.smart_norm, options.smart_epsilon).requires_grad_(True)
        return e.detach() + delta.to(e.dtype)

    for _ in range(options.smart_steps):
        with perturbed_embeddings(model, perturb):
            divergence = output_divergence(logits_of(model, batch), clean_logits)
        (grad,) = torch.autograd.grad(divergence, delta)
        step = options.smart_step_size * _normalise(grad, options.smart_norm, mask)
        delta = (_project(delta.detach() + step, options.smart_norm, options.smart_epsilon) * mask).requires_grad_(True)
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
    warn_if_eval_mode(model, options.method)
    clean = logits_of(model, batch)
    loss = task_loss(clean, batch["labels"])
    logs: Logs = {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    if not model.training:
        return loss, logs

    extra = extra_pass_model(model)
    delta = find_perturbation(extra, clean.detach(), batch, options)
    with perturbed_embeddings(extra, lambda e: e + delta.to(e.dtype)):
        perturbed = logits_of(extra, batch)
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


class SMART(Method):
    """SMART's life cycle: the EMA teacher, made from the model on its first use (once
    the model sits on its device), moved after every optimiser step, and saved with every
    checkpoint so that a resumed run keeps the teacher it had."""

    def __init__(self, options: MethodOptions):
        super().__init__(options)
        self.teacher: EMATeacher | None = None

    def _teacher(self, model: nn.Module) -> EMATeacher | None:
        if self.options.smart_bregman and self.teacher is None:
            self.teacher = EMATeacher(model, self.options)
        return self.teacher

    def loss(self, model, batch):
        return smart_loss(model, batch, self.options, self._teacher(model) if model.training else self.teacher)

    def after_step(self, model, step, total_steps):
        if self.teacher is not None:
            self.teacher.update(model, step, total_steps)

    def state_dict(self, model):
        if self.teacher is None:
            return {}
        # Clones: tied weights share storage, which safetensors refuses to save.
        return {f"teacher.{k}": v.detach().clone() for k, v in self.teacher.model.state_dict().items()}

    def load_state_dict(self, model, state):
        teacher_state = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        if teacher_state and self._teacher(model) is not None:
            self.teacher.model.load_state_dict(teacher_state)
