"""Representation drift measures that need no probe training.

- Linear CKA (Kornblith et al., ICML 2019) between the pre-trained and the fine-tuned
  representations of the same examples, per layer. It is invariant to orthogonal
  transforms, isotropic scaling and constant shifts — exactly the changes that leave
  what a linear probe can read unchanged, and that make plain distances between
  representations misleading (the objection Aghajanyan et al. 2021 raise against
  distance-based measures).
- Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular
  values of the centred representations — how many directions they really use; a
  collapsing representation loses rank.
"""

from __future__ import annotations

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (N, D1) and (N, D2) representations of the same N examples:
    ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred. In [0, 1]."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} vs {y.shape[0]} examples")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    return float(cross / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")))


def effective_rank(x: np.ndarray) -> float:
    """exp(H(p)) with p the normalised singular values of the centred (N, D) matrix."""
    x = np.asarray(x, dtype=np.float64)
    singular = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    singular = singular[singular > singular.max() * 1e-12] if singular.size else singular
    if singular.size == 0:
        return 0.0
    p = singular / singular.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def layer_drift(reference: np.ndarray, tuned: np.ndarray) -> list[dict]:
    """Per layer of (L, N, H) stacks: CKA to the reference and both effective ranks."""
    return [
        {"layer": i, "cka": linear_cka(r, t), "effective_rank": effective_rank(t), "reference_effective_rank": effective_rank(r)}
        for i, (r, t) in enumerate(zip(reference, tuned))
    ]
