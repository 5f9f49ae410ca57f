"""Divergences between the model's predictions on clean and perturbed inputs.

R3F (Aghajanyan et al. 2021, eq. 1) and SMART (Jiang et al. 2020) both penalise the
symmetric KL divergence KL_S(P, Q) = KL(P||Q) + KL(Q||P) between the output distribution
on clean embeddings and on perturbed embeddings. For a scalar regression output a KL is
undefined (the paper skipped STS-B for that reason); rxf uses the squared error between
the two predictions instead, as SMART does for regression.

Everything is computed in float32, whatever dtype the logits arrive in, because the
divergence of two nearly identical distributions is a small difference of large numbers
that half precision rounds away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_kl(
    logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean symmetric KL divergence KL(P||Q) + KL(Q||P) between two sets of logits.

    Args:
        logits_p: (..., C) unnormalised scores, e.g. (B, C) for classification or
            (B, T, C) for token-level outputs.
        logits_q: same shape as ``logits_p``.
        mask: optional (...) boolean or 0/1 tensor over the leading dimensions; only
            positions where it is non-zero are averaged (padding is excluded).

    Returns:
        A float32 scalar: the divergence summed over classes and averaged over the
        (unmasked) positions. Differentiable through both arguments.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"symmetric_kl: shapes differ, {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    # Autocast must not pull the log-softmax back into half precision.
    with torch.autocast(device_type=logits_p.device.type, enabled=False):
        log_p = F.log_softmax(logits_p.float(), dim=-1)
        log_q = F.log_softmax(logits_q.float(), dim=-1)
        # KL(P||Q) + KL(Q||P) = sum_c (p_c - q_c) (log p_c - log q_c): one pass, no
        # double counting of the shared terms.
        per_position = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)
        return masked_mean(per_position, mask)


def symmetric_squared_error(
    pred_p: torch.Tensor, pred_q: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared difference between two regression predictions, in float32.

    Squared error is already symmetric in its arguments; it is the smoothness term rxf
    uses where a KL divergence is undefined (scalar regression heads, e.g. STS-B).

    Args:
        pred_p: (B,) or (B, 1) predictions (any trailing dims are summed).
        pred_q: same shape as ``pred_p``.
        mask: optional (B,) mask over examples.

    Returns:
        A float32 scalar.
    """
    if pred_p.shape != pred_q.shape:
        raise ValueError(
            f"symmetric_squared_error: shapes differ, {tuple(pred_p.shape)} vs {tuple(pred_q.shape)}"
        )
    with torch.autocast(device_type=pred_p.device.type, enabled=False):
        diff = (pred_p.float() - pred_q.float()).pow(2)
        per_example = diff.reshape(diff.shape[0], -1).sum(dim=-1) if diff.dim() > 1 else diff
        return masked_mean(per_example, mask)


def output_divergence(
    logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The smoothness divergence suited to the head: KL_S for classifiers, squared
    error for a single regression output (last dimension of size 1)."""
    if logits_p.shape[-1] == 1:
        return symmetric_squared_error(logits_p.squeeze(-1), logits_q.squeeze(-1), mask)
    return symmetric_kl(logits_p, logits_q, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is non-zero (all if None).

    An all-zero mask gives 0 rather than NaN, so a batch without any scored position
    contributes nothing.
    """
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
