"""FreeLB (Zhu et al., ICLR 2020, arXiv 1909.11764), the adversarial baseline of
Aghajanyan et al. (2021).

K ascent steps on an embedding perturbation delta. Each step runs the model on e + delta
and back-propagates L/K, so the parameter gradients *accumulate* over the K steps (the
"free" adversarial training); between steps delta moves along its own gradient:
l2: delta <- delta + alpha * g / ||g||_2 (per example), projected to ||delta||_2 <=
max_norm when max_norm > 0; inf: delta <- delta + alpha * g / ||g||_inf, clamped to
[-max_norm, max_norm]. The optimiser steps once after the K steps. Norms are taken in
float32 (fp16 norms are a known source of NaNs) and padding is never perturbed.

Because FreeLB runs its own backward calls it is a training *step*, not a loss.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from rxf.methods.base import Logs, Method
from rxf.methods.options import MethodOptions
from rxf.methods.standard import standard_loss, task_loss
from rxf.models import logits_of, perturbed_embeddings, token_mask


def initial_perturbation(embeds: torch.Tensor, mask: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """delta_0, (B, T, H) float32: zero when ``freelb_init_mag`` is 0; otherwise
    U(-1, 1) * mask * init_mag / sqrt(len * H) per example for l2 (len = real tokens),
    U(-init_mag, init_mag) * mask for inf."""
    if options.freelb_init_mag == 0:
        return torch.zeros(embeds.shape, device=embeds.device, dtype=torch.float32)
    noise = torch.empty(embeds.shape, device=embeds.device, dtype=torch.float32).uniform_(-1, 1) * mask
    if options.freelb_norm == "l2":
        dims = mask.sum(dim=(1, 2), keepdim=True) * embeds.shape[-1]
        return noise * (options.freelb_init_mag / dims.sqrt())
    return noise * options.freelb_init_mag


def _ascend(delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    grad = grad.float()
    flat = grad.flatten(1)
    if options.freelb_norm == "l2":
        scale = flat.norm(dim=1)
    else:
        scale = flat.abs().amax(dim=1)
    delta = delta + options.freelb_step_size * grad / (scale.view(-1, 1, 1) + 1e-12)
    if options.freelb_max_norm > 0:
        if options.freelb_norm == "l2":
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
            delta = delta * (options.freelb_max_norm / norms.clamp_min(options.freelb_max_norm))
        else:
            delta = delta.clamp(-options.freelb_max_norm, options.freelb_max_norm)
    return (delta * mask).detach()


def freelb_step(
    model: nn.Module,
    batch: dict[str, Any],
    options: MethodOptions,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    update: int | None = None,
    no_sync: Callable[[], ContextManager] | None = None,
) -> tuple[torch.Tensor, Logs]:
    """Run FreeLB's K forward/backward passes on one batch; gradients are left in
    ``.grad`` for the caller's optimiser step.

    Args:
        model: the model (or its DDP wrapper), in training mode.
        batch: as ``r3f_loss``.
        backward: called on each step's loss (already divided by K); a trainer passes
            its own (gradient-accumulation scaling, mixed-precision scaler).
        update: the number of optimiser updates done so far, for ``freelb_start_after``.
        no_sync: a context manager factory entered for all but the last step, so that
            DDP all-reduces the accumulated gradient once per update.

    Returns:
        ``(loss, logs)``: the mean of the K step losses (detached) and the logs.
    """
    if update is not None and update < options.freelb_start_after:
        loss, logs = standard_loss(model, batch)
        backward(loss)
        return loss.detach(), logs

    steps = options.freelb_steps
    delta = mask = None

    def perturb(e: torch.Tensor) -> torch.Tensor:
        nonlocal delta, mask
        if delta is None:  # made on the first call, with the embeddings' shape
            mask = token_mask(batch, e).float()
            delta = initial_perturbation(e, mask, options).requires_grad_(True)
        return e + delta.to(e.dtype)

    total = torch.zeros((), device=batch["input_ids"].device)
    first = None
    for k in range(steps):
        # DDP decides at forward time whether the next backward all-reduces, so the
        # forward as well as the backward of the first K-1 steps run under no_sync.
        sync = no_sync() if (no_sync is not None and k < steps - 1) else contextlib.nullcontext()
        with sync:
            with perturbed_embeddings(model, perturb):
                logits = logits_of(model, batch)
            loss = task_loss(logits, batch["labels"]) / steps
            backward(loss)
        total = total + loss.detach()
        first = loss.detach() * steps if first is None else first
        if k < steps - 1:
            delta = _ascend(delta.detach(), delta.grad, mask, options).requires_grad_(True)
    logs: Logs = {
        "task_loss": first,
        "adversarial_loss": total,
        "forward_passes": steps,
        "backward_passes": steps,
    }
    return total, logs


class FreeLB(Method):
    """FreeLB's life cycle: a training step of K forward and backward passes."""

    runs_own_backward = True

    def step(self, model, batch, backward=torch.Tensor.backward, update=None, no_sync=None):
        return freelb_step(model, batch, self.options, backward, update, no_sync)
