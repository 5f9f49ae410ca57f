"""R-Drop (Liang et al., NeurIPS 2021, arXiv 2106.14448): the same batch through the model
twice, with independent dropout masks, predictions P1 and P2; Eq. 3 for example i:

    L_i = CE(P1_i, y_i) + CE(P2_i, y_i) + alpha * 1/2 (KL(P1_i || P2_i) + KL(P2_i || P1_i))

rxf's reduction, exactly: L = mean_i L_i over the batch, i.e. the *sum* of the two passes'
mean cross entropies plus alpha * 1/2 * the batch mean of KL_S = KL(P1||P2) + KL(P2||P1)
(``rxf.divergence.symmetric_kl``, float32, differentiable through both passes). The two
task terms are summed, as Eq. 3 writes them, not averaged: the loss is about twice STD's
(the logged ``task_loss`` is their mean, comparable with the other methods).

- Regression (one output): squared error per pass, and the symmetric divergence
  1/2 (D(P1, P2) + D(P2, P1)) with D the squared error between the predictions, which is
  the squared error itself: L = MSE1 + MSE2 + alpha * mean_i (p1_i - p2_i)^2.
- Generation (seq2seq, decoder-only): label-smoothed CE of each pass plus alpha * 1/2 *
  the mean KL_S over the target positions that carry a label (padding and prompt
  excluded), with the accumulated batch's token normalisation of ``rxf.methods.generation``.

Passes: 2 forward, 1 backward through both graphs (R3F's cost without noise). The second
pass runs on the model inside a DDP wrapper (``extra_pass_model``), so the gradients of
both are all-reduced once per update; ``rdrop_concat_batch`` runs both as one batch of 2B.
In eval mode only the first pass runs and the loss is its task loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rxf.divergence import output_divergence
from rxf.methods.base import Logs, Method
from rxf.methods.generation import (
    Generation, _share_of_accumulated_batch, _shifted, label_smoothed_nll, token_divergence,
)
from rxf.methods.options import MethodOptions
from rxf.methods.standard import task_loss
from rxf.models import extra_pass_model, is_seq2seq, logits_of, warn_if_eval_mode, with_decoder_inputs


def _two_passes(model: nn.Module, batch: dict[str, Any], concat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of two dropout passes over the batch: (B, ...) each."""
    if concat:
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        first, second = logits_of(model, doubled).chunk(2)
        return first, second
    return logits_of(model, batch), logits_of(extra_pass_model(model), batch)


def _concat(options: MethodOptions, batch: dict[str, Any]) -> bool:
    return batch["input_ids"].is_cuda if options.rdrop_concat_batch is None else options.rdrop_concat_batch


def symmetric_term(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """1/2 (D(P1, P2) + D(P2, P1)) averaged over the batch: 1/2 KL_S for class logits
    (B, C), the squared error for one regression output (B, 1)."""
    divergence = output_divergence(first, second)  # KL_S (both directions summed), or the squared error
    return divergence if first.shape[-1] == 1 else 0.5 * divergence


def rdrop_loss(model: nn.Module, batch: dict[str, Any], options: MethodOptions) -> tuple[torch.Tensor, Logs]:
    """R-Drop loss of a sequence classifier (shapes as ``r3f_loss``); uses ``rdrop_alpha``
    and ``rdrop_concat_batch``. Returns ``(loss, logs)`` with ``task_loss`` (the mean of
    the two passes' task losses) and ``regularizer`` (the term alpha multiplies)."""
    warn_if_eval_mode(model, "rdrop")
    labels = batch["labels"]
    if not model.training:
        loss = task_loss(logits_of(model, batch), labels)
        return loss, {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    first, second = _two_passes(model, batch, _concat(options, batch))
    tasks = task_loss(first, labels) + task_loss(second, labels)  # summed, as Eq. 3
    regularizer = symmetric_term(first, second)
    logs: Logs = {"task_loss": tasks.detach() / 2, "regularizer": regularizer.detach(),
                  "forward_passes": 2, "backward_passes": 1}
    return tasks + options.rdrop_alpha * regularizer, logs


def rdrop_generation_loss(
    model: nn.Module,
    batch: dict[str, Any],
    options: MethodOptions,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Logs]:
    """R-Drop for a seq2seq or decoder-only LM batch (shapes and ``num_items_in_batch`` as
    ``rxf.methods.generation.generation_loss``): LS-CE(P1) + LS-CE(P2) + alpha * 1/2 *
    mean KL_S over the scored target tokens, all three token means over the same tokens."""
    warn_if_eval_mode(model, "rdrop")
    seq2seq = is_seq2seq(model)
    if seq2seq:
        batch = with_decoder_inputs(model, batch)
    labels = batch["labels"]

    def scored(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (logits, labels) if seq2seq else _shifted(logits, labels)

    smoothing = options.label_smoothing
    if not model.training:
        logits, scored_labels = scored(logits_of(model, batch))
        task = label_smoothed_nll(logits, scored_labels, smoothing)
        share = _share_of_accumulated_batch(scored_labels, num_items_in_batch)
        return task * share, {"task_loss": task.detach(), "forward_passes": 1, "backward_passes": 1}
    first, second = _two_passes(model, batch, _concat(options, batch))
    (first, scored_labels), (second, _) = scored(first), scored(second)
    tasks = label_smoothed_nll(first, scored_labels, smoothing) + label_smoothed_nll(second, scored_labels, smoothing)
    regularizer = 0.5 * token_divergence(first, second, scored_labels)
    share = _share_of_accumulated_batch(scored_labels, num_items_in_batch)
    logs: Logs = {"task_loss": tasks.detach() / 2, "regularizer": regularizer.detach(),
                  "forward_passes": 2, "backward_passes": 1}
    return (tasks + options.rdrop_alpha * regularizer) * share, logs


class RDrop(Method):
    """R-Drop's life cycle: nothing to set up or keep; the loss is ``rdrop_loss``."""

    def loss(self, model, batch):
        return rdrop_loss(model, batch, self.options)


class RDropGeneration(Generation):
    """R-Drop for seq2seq and decoder-only LMs (a ``Generation``, so that RXFTrainer passes
    the accumulated batch's token count)."""

    def loss(self, model, batch, num_items_in_batch=None):
        return rdrop_generation_loss(model, batch, self.options, num_items_in_batch)
