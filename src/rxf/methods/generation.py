"""R3F for generation: encoder-decoder summarisers (BART, T5, PEGASUS, mBART) and
decoder-only language models (GPT-2, Llama-style), Aghajanyan et al. 2021, Section 5.2.

    L = LS-CE(clean) + lambda * mean over scored target tokens of KL_S(p_clean, p_noised)

- The task loss is label-smoothed cross entropy (smoothing 0.1 by default, the usual
  BART setting), averaged over target tokens that carry a label (``labels != -100``).
- The symmetric KL is taken at every target position over the vocabulary, in float32,
  and only where the loss is taken: padding never contributes (fairseq's version sums
  over padding), and for a decoder-only model only the response tokens count when the
  prompt is masked out of the labels.
- With gradient accumulation both terms are token means over the *whole* accumulated
  batch (``num_items_in_batch``), so a micro-batch weighs by its scored tokens, as one
  large batch would weigh them.
- Noise goes on the encoder input embeddings by default (``noise_target="encoder"``);
  ``"decoder"`` noises the decoder input embeddings instead. Decoder-only models have one
  input: it is noised either way. The noise is normal N(0, eps^2) unless ``noise_type``
  says otherwise (fairseq's seq2seq default; classification defaults to uniform).
- Embeddings are not detached here (fairseq noises seq2seq embeddings without detaching).
- R4F is refused: the paper's head g has no weights in generation, so there is nothing
  to normalise. SMART and FreeLB are offered for classification only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rxf.divergence import symmetric_kl
from rxf.errors import OptionError
from rxf.methods.base import Logs, Method
from rxf.methods.options import MethodOptions
from rxf.models import extra_pass_model, is_seq2seq, logits_of, perturbed_embeddings, warn_if_eval_mode, with_decoder_inputs
from rxf.noise import sample_noise

IGNORE = -100
GENERATION_METHODS = ("std", "std++", "r3f")


def check_generation_method(method: str) -> None:
    if method == "r4f":
        raise OptionError("--method r4f is not defined for generation: the paper's head g has no weights there "
                          "(use r3f)")
    if method not in GENERATION_METHODS:
        raise OptionError(f"--method {method} is not offered for generation; choose from {', '.join(GENERATION_METHODS)}")


def label_smoothed_nll(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Label-smoothed cross entropy in float32, averaged over positions with a label.

    Args:
        logits: (B, T, V) scores for each target position.
        labels: (B, T) token ids, ``-100`` where there is no target (padding, prompt).

    Per position: (1 - eps) * NLL + eps * mean over all V tokens of -log p, i.e. the
    cross entropy against a target putting 1 - eps + eps/V on the label and eps/V on
    every token (the uniform prior of Szegedy et al. 2016). This is what transformers'
    ``LabelSmoother`` (the Trainer's ``label_smoothing_factor``) and
    ``F.cross_entropy(label_smoothing=eps)`` compute, and what fairseq computed before it
    changed. fairseq's current ``label_smoothed_nll_loss`` instead puts 1 - eps on the
    label and eps/(V-1) on each *other* token:
    (1 - eps - eps/(V-1)) * NLL + eps/(V-1) * sum over all V tokens of -log p. The two
    differ by eps/V * (mean over the other tokens of -log p - NLL), i.e. O(eps/V).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    nll = -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    per_token = (1.0 - smoothing) * nll + smoothing * uniform
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def token_divergence(clean: torch.Tensor, noised: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL_S over target positions that carry a label: (B, T, V), (B, T, V), (B, T)."""
    return symmetric_kl(clean, noised, labels != IGNORE)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-only: position t predicts token t+1."""
    return logits[:, :-1], labels[:, 1:]


def _share_of_accumulated_batch(
    scored_labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> float | torch.Tensor:
    """What turns a token mean over this micro-batch into its share of the token mean
    over the whole accumulated batch: (its scored tokens) / num_items_in_batch, so that
    mean * share = (sum over its scored tokens) / num_items_in_batch and the shares of
    all micro-batches add up to the full batch's mean. 1 without ``num_items_in_batch``.

    Args:
        scored_labels: (B, T) labels of the scored positions (-100 elsewhere).
    """
    if num_items_in_batch is None:
        return 1.0
    scored = (scored_labels != IGNORE).sum()
    if torch.is_tensor(num_items_in_batch):  # the Trainer's count may sit on another device
        num_items_in_batch = num_items_in_batch.to(scored.device)
    return scored / num_items_in_batch


def generation_loss(
    model: nn.Module,
    batch: dict[str, Any],
    options: MethodOptions,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Logs]:
    """STD (label-smoothed CE) or R3F loss for a seq2seq or causal LM batch.

    Args:
        batch: ``input_ids`` (B, S), ``attention_mask`` (B, S), ``labels`` (B, T) with
            -100 where nothing is scored, and for seq2seq optionally
            ``decoder_input_ids`` (B, T) (made from the labels when absent). For a
            decoder-only model T = S and ``labels`` is the input with the prompt and the
            padding set to -100.
        options: ``method`` (std, std++ or r3f), ``label_smoothing``, ``noise_target``,
            ``noise_type`` (unset: normal), ``noise_eps``, ``r3f_lambda``.
        num_items_in_batch: scored target tokens in the whole accumulated batch (all
            micro-batches of one update, on every process when the caller averages
            over processes): ``labels != -100`` for seq2seq, ``labels[:, 1:] != -100``
            for a decoder-only model, as the Trainer counts them. When given, both terms
            are summed over this micro-batch's scored tokens and divided by it, so the
            losses of the micro-batches add up to the full batch's; the caller must then
            not divide by the number of accumulation steps. None: means over this batch.

    Returns:
        ``(loss, logs)``; the logged ``task_loss`` and ``regularizer`` are means over
        this micro-batch's scored tokens whether or not ``num_items_in_batch`` is given.
    """
    check_generation_method(options.method)
    warn_if_eval_mode(model, options.method)
    seq2seq = is_seq2seq(model)
    if seq2seq:
        batch = with_decoder_inputs(model, batch)
    labels = batch["labels"]
    clean = logits_of(model, batch)
    clean_scored, scored_labels = (clean, labels) if seq2seq else _shifted(clean, labels)
    share = _share_of_accumulated_batch(scored_labels, num_items_in_batch)
    task = label_smoothed_nll(clean_scored, scored_labels, options.label_smoothing)
    logs: Logs = {"task_loss": task.detach(), "forward_passes": 1, "backward_passes": 1}
    if options.method != "r3f" or not model.training:
        return task * share, logs
    # Not detached: fairseq noises seq2seq embeddings without detaching them.
    noise_type = options.resolved_noise_type(generation=True)  # normal unless set, as fairseq
    extra = extra_pass_model(model)
    with perturbed_embeddings(extra, lambda e: e + sample_noise(e, noise_type, options.noise_eps),
                              target=options.noise_target):
        noised = logits_of(extra, batch)
    noised_scored = noised if seq2seq else _shifted(noised, labels)[0]
    regularizer = token_divergence(clean_scored, noised_scored, scored_labels)
    logs.update(regularizer=regularizer.detach(), forward_passes=2)
    # Both terms are means over the same scored tokens, so one share weighs them alike.
    return (task + options.r3f_lambda * regularizer) * share, logs


class Generation(Method):
    """STD, STD++ or R3F for a seq2seq or decoder-only LM: ``generation_loss``.

    ``num_items_in_batch`` is the Trainer's count of scored tokens over the accumulated
    batch (see ``generation_loss``)."""

    def loss(self, model, batch, num_items_in_batch=None):
        return generation_loss(model, batch, self.options, num_items_in_batch)
