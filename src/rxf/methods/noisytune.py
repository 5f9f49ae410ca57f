"""NoisyTune (Wu et al., ACL 2022, arXiv 2202.12024): perturb the pre-trained model once,
before fine-tuning,

    W <- W + U(-lambda/2, lambda/2) * std(W),     lambda = 0.15,

independently for every element, with std(W) the standard deviation of the elements of
the tensor W (unbiased, as ``torch.std``), so every tensor is perturbed on its own scale.

Which tensors: the paper writes "each parameter matrix"; its released code adds the noise
to every parameter tensor of the model. rxf follows the code: every *trainable* parameter
tensor with more than one element — weight matrices, embedding tables, biases and
LayerNorm weights, the freshly initialised task head too (a tensor whose elements are all
equal, e.g. a zero-initialised bias or a fresh LayerNorm, has std 0 and stays as it is).
Tensors of one element are skipped (their std is undefined; the paper's code would write
NaN into them), and so are frozen tensors (under PEFT the frozen base weights are never
trained back, so noise there would stay for good). Tied tensors are perturbed once.

The noise is drawn on the CPU from torch's global generator (as the official code does),
so the same seed gives the same perturbation on any device. No cost per update.
"""

from __future__ import annotations

import torch
from torch import nn

from rxf.errors import OptionError
from rxf.methods.composite import Modifier
from rxf.models import is_shard, unwrap


def noisy_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The tensors NoisyTune perturbs: trainable, more than one element (tied ones once)."""
    return [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad and p.numel() > 1]


@torch.no_grad()
def noisy_tune(model: nn.Module, noise_lambda: float) -> list[str]:
    """Add U(-lambda/2, lambda/2) * std(W) to every tensor of ``noisy_parameters``, in
    place, in their order; returns their names."""
    names = []
    for name, param in noisy_parameters(model):
        if is_shard(param):
            raise OptionError("noisytune: the model is sharded (FSDP); NoisyTune runs in set-up, before sharding")
        std = param.detach().float().std()
        uniform = torch.rand(param.shape, dtype=torch.float32)  # U(0, 1) on the CPU
        param.add_(((uniform - 0.5) * noise_lambda).to(param.device) * std)
        names.append(name)
    return names


class NoisyTune(Modifier):
    """NoisyTune's life cycle: the perturbation in set-up, once per method object."""

    name = "noisytune"

    def __init__(self, options):
        super().__init__(options)
        self.perturbed: list[str] | None = None

    def setup(self, model):
        if self.perturbed is None:
            self.perturbed = noisy_tune(model, self.options.noisytune_lambda)
