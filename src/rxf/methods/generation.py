"""R3F for generation: encoder-decoder summarisers (BART, T5, PEGASUS, mBART) and
decoder-only language models (GPT-2, Llama-style), Aghajanyan et al. 2021, Section 5.2.

    L = LS-CE(clean) + lambda * mean over scored target tokens of KL_S(p_clean, p_noised)

- The task loss is label-smoothed cross entropy (smoothing 0.1 by default, the usual
  BART setting), averaged over target tokens that carry a label (``labels != -100``).
- The symmetric KL is taken at every target position over the vocabulary, in float32,
  and only where the loss is taken: padding never contributes (fairseq's version sums
  over padding), and for a decoder-only model only the response tokens count when the
  prompt is masked out of the labels.
- Noise goes on the encoder input embeddings by default (``noise_target="encoder"``);
  ``"decoder"`` noises the decoder input embeddings instead. Decoder-only models have one
  input: it is noised either way.
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
from rxf.methods.options import MethodOptions
from rxf.methods.standard import Logs
from rxf.models import LABEL_KEYS, unwrap
from rxf.noise import sample_noise

IGNORE = -100
GENERATION_METHODS = ("std", "std++", "r3f")


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(unwrap(model).config, "is_encoder_decoder", False))


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

    (1 - eps) * NLL + eps * mean over the vocabulary of -log p, per position — the
    uniform-prior smoothing of Szegedy et al. (2016) that fairseq and the Trainer use.
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


def _decoder_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    if "decoder_input_ids" not in batch and "decoder_inputs_embeds" not in batch:
        batch["decoder_input_ids"] = unwrap(model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return batch


def generation_loss(
    model: nn.Module, batch: dict[str, Any], options: MethodOptions
) -> tuple[torch.Tensor, Logs]:
    """STD (label-smoothed CE) or R3F loss for a seq2seq or causal LM batch.

    Args:
        batch: ``input_ids`` (B, S), ``attention_mask`` (B, S), ``labels`` (B, T) with
            -100 where nothing is scored, and for seq2seq optionally
            ``decoder_input_ids`` (B, T) (made from the labels when absent). For a
            decoder-only model T = S and ``labels`` is the input with the prompt and the
            padding set to -100.
        options: ``method`` (std, std++ or r3f), ``label_smoothing``, ``noise_target``,
            ``noise_type``, ``noise_eps``, ``r3f_lambda``.
    """
    check_generation_method(options.method)
    seq2seq = is_seq2seq(model)
    if seq2seq:
        batch = _decoder_inputs(model, batch)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    embed_key = "decoder_input_ids" if seq2seq and options.noise_target == "decoder" else "input_ids"
    embeds = unwrap(model).get_input_embeddings()(inputs[embed_key])
    embeds_name = "decoder_inputs_embeds" if embed_key == "decoder_input_ids" else "inputs_embeds"

    def run(e: torch.Tensor) -> torch.Tensor:
        call = {k: v for k, v in inputs.items() if k != embed_key}
        return model(**call, **{embeds_name: e}).logits

    clean = run(embeds)
    clean_scored, scored_labels = (clean, labels) if seq2seq else _shifted(clean, labels)
    loss = label_smoothed_nll(clean_scored, scored_labels, options.label_smoothing)
    logs: Logs = {"task_loss": loss.detach(), "forward_passes": 1, "backward_passes": 1}
    if options.method != "r3f" or not model.training:
        return loss, logs
    noised = run(embeds + sample_noise(embeds, options.noise_type, options.noise_eps))
    noised_scored = noised if seq2seq else _shifted(noised, labels)[0]
    regularizer = token_divergence(clean_scored, noised_scored, scored_labels)
    logs.update(regularizer=regularizer.detach(), forward_passes=2)
    return loss + options.r3f_lambda * regularizer, logs
