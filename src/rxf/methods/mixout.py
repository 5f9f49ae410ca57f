"""Mixout (Lee et al., ICLR 2020, arXiv 1909.11299): dropout towards the pre-trained weights.

For a linear layer with current weight w (out, in) and pre-trained weight u, each training
forward pass uses

    Mixout(w; u, p) = ( M * w + (1 - M) * u - p * u ) / (1 - p)
                    = u + M * (w - u) / (1 - p),

M a Bernoulli(1 - p) mask: with probability p an entry takes its pre-trained value. Its
expectation is E[M] = 1 - p, so E[Mixout] = u + (w - u) = w: the current weight, as
dropout's rescaling keeps a unit's expectation (with u = 0 it *is* dropconnect). The
gradient w.r.t. w is M / (1 - p) times the gradient w.r.t. the mixed weight. In eval mode
the layer uses w itself.

- The mask is drawn per *input neuron*, as in the paper (mixout "drops" a neuron by
  replacing all its outgoing weights) and the official code (one Bernoulli row of length
  ``in`` repeated over the ``out`` rows): M[i, j] = m_j, m ~ Bernoulli(1 - p)^in. Biases
  are not mixed.
- Which layers: every ``nn.Linear`` of the model whose weight is trainable, the task head
  included, whose u is its fresh initialisation (the official code replaces every
  ``nn.Linear``, the head too). Spectrally normalised (R4F) layers are left out: their
  weight is W / sigma, recomputed every pass. Other linear maps (GPT-2's ``Conv1D``) are
  not covered.
- Dropout: as in the paper's experiments and the official code, mixout replaces dropout;
  set-up sets every ``nn.Dropout`` to p = 0 unless ``mixout_keep_dropout``.
- The official backward returns grad * M, without the 1 / (1 - p) of its own forward;
  rxf's gradient is autograd's, the exact derivative.

Implementation: while a training forward pass of the method runs, a forward pre-hook on
each covered layer puts the mixed weight in place of the ``weight`` parameter and a
forward hook (run even when the layer raises) puts the parameter back, so the model's
state-dict keys and ``save_pretrained`` checkpoints stay plain (``from_pretrained`` loads
them) and the optimiser keeps updating w. The pre-trained weights u are the method's
checkpoint state (``mixout.<layer>.u``): a copy of every covered weight, so checkpoints
grow by the size of the linear layers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from rxf.errors import OptionError
from rxf.methods.composite import Modifier
from rxf.models import is_shard, unwrap, warn_if_eval_mode


def mixout_mask(weight: torch.Tensor, p: float) -> torch.Tensor:
    """M for a weight (out, in): (1, in), 1 with probability 1 - p, in the weight's dtype."""
    return torch.empty((1, weight.shape[1]), device=weight.device, dtype=weight.dtype).bernoulli_(1.0 - p)


def mixout_weight(weight: torch.Tensor, target: torch.Tensor, p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """u + M * (w - u) / (1 - p) for w = ``weight`` (out, in), u = ``target``; M drawn
    when not given (any shape broadcasting to (out, in))."""
    if mask is None:
        mask = mixout_mask(weight, p)
    return target + mask * (weight - target) / (1.0 - p)


def mixout_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers Mixout covers: every ``nn.Linear`` with a trainable, plain weight."""
    return [
        (name, module)
        for name, module in unwrap(model).named_modules()
        if isinstance(module, nn.Linear)
        and not parametrize.is_parametrized(module, "weight")
        and module.weight.requires_grad
    ]


@contextlib.contextmanager
def mixed_weights(layers: dict[str, nn.Linear], targets: dict[str, torch.Tensor], p: float) -> Iterator[None]:
    """Inside the block, each training-mode call of a layer in ``layers`` uses its mixed
    weight, with a fresh mask per call."""

    parameters: dict[int, nn.Parameter] = {}  # id(layer) -> its weight parameter, while swapped out

    def swap_in(name: str):
        def pre(module, args):
            if module.training:
                weight = module._parameters["weight"]
                parameters[id(module)] = weight
                # Writing the dict directly: Module.__setattr__ accepts only a Parameter here.
                module._parameters["weight"] = mixout_weight(weight, targets[name].to(weight.dtype), p)
        return pre

    def swap_out(module, args, output):
        weight = parameters.pop(id(module), None)
        if weight is not None:
            module._parameters["weight"] = weight

    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(swap_in(name)))
            handles.append(layer.register_forward_hook(swap_out, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Mixout(Modifier):
    """Mixout's life cycle: the pre-trained weights recorded (and dropout turned off) in
    set-up, mixed weights in every training forward pass, u in every checkpoint."""

    name = "mixout"

    def __init__(self, options):
        super().__init__(options)
        self.targets: dict[str, torch.Tensor] | None = None  # u, by layer name
        self._layers: dict[str, nn.Linear] | None = None
        self._set_up = False

    def _find(self, model) -> dict[str, nn.Linear]:
        if self._layers is None:
            self._layers = dict(mixout_linears(model))
            if not self._layers:
                raise OptionError(f"mixout: {type(unwrap(model)).__name__} has no trainable nn.Linear layers")
            if any(is_shard(layer.weight) for layer in self._layers.values()):
                raise OptionError("mixout: the model is sharded (FSDP); Mixout supports one device and DDP")
        return self._layers

    def setup(self, model):
        if self.targets is None:  # not already loaded from a checkpoint
            self.targets = {name: layer.weight.detach().clone() for name, layer in self._find(model).items()}
        if not self.options.mixout_keep_dropout:
            for module in unwrap(model).modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        self._set_up = True

    def around(self, model, batch):
        if not model.training:
            warn_if_eval_mode(model, self.name)
            return contextlib.nullcontext()
        if not self._set_up:
            self.setup(model)
        if self.options.mixout_p == 0:
            return contextlib.nullcontext()
        return mixed_weights(self._find(model), self.targets, self.options.mixout_p)

    def state_dict(self, model):
        if self.targets is None:
            return {}
        return {f"mixout.{name}.u": target.detach().clone() for name, target in self.targets.items()}

    @torch.no_grad()
    def load_state_dict(self, model, state):
        saved = {k[len("mixout."):-len(".u")]: v for k, v in state.items() if k.startswith("mixout.") and k.endswith(".u")}
        if not saved:
            return
        layers = self._find(model)
        missing = set(layers) - set(saved)
        if missing:
            raise OptionError(f"mixout: the checkpoint's pre-trained weights lack {sorted(missing)[:3]}")
        self.targets = {name: saved[name].to(layer.weight.device, layer.weight.dtype) for name, layer in layers.items()}
