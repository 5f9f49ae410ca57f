"""Parametric noise for R3F (Aghajanyan et al. 2021, Section 3.1).

R3F replaces SMART's adversarial search with a single draw z ~ N(0, sigma^2 I) or
z ~ U(-sigma, sigma) added to the word embeddings. The noise is drawn on the
embeddings' own device and dtype (never on the host and copied over), so that drawing it
costs no transfer and no synchronisation.
"""

from __future__ import annotations

import torch

from rxf.methods.options import NOISE_TYPES


def sample_noise(like: torch.Tensor, noise_type: str, sigma: float) -> torch.Tensor:
    """Noise with the shape, dtype and device of ``like`` (e.g. (B, T, H) embeddings).

    Args:
        like: the tensor to be perturbed.
        noise_type: ``"normal"`` for N(0, sigma^2), ``"uniform"`` for U(-sigma, sigma).
        sigma: the scale; 0 gives exact zeros.
    """
    if noise_type == "normal":
        return torch.randn_like(like) * sigma
    if noise_type == "uniform":
        return torch.empty_like(like).uniform_(-sigma, sigma)
    raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
