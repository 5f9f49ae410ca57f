"""HyPe (Yuan et al., ACL 2023, arXiv 2212.08853): hidden representation perturbation.

During training, the hidden states h (B, T, H) entering each Transformer layer become
h + z, z ~ U(-eps, eps) or N(0, eps^2) per element, eps = 1e-5; nothing else changes (no
extra pass, no extra loss term). Evaluation is untouched.

The layers are found generically (``transformer_layers``): the outermost ``ModuleList``s
of the base model whose entries are all of one class and are modules with parameters —
BERT/RoBERTa/DeBERTa ``encoder.layer``, GPT-2 ``h``, Llama ``layers``, BART's encoder and
decoder ``layers``, T5's ``block``s. Each gets a forward pre-hook (installed only while a
training forward pass of the method runs) that perturbs its first input, the hidden
states, whether passed by position or as ``hidden_states=``. A model without such a list
is refused with an OptionError; a pass in which no layer was called raises.

Two differences from the official code, both deliberate: its ``uniform`` noise is
``eps * U(0, 1)`` (``uniform_()``'s default range, a noise of mean eps/2), rxf's is
U(-eps, eps), zero-mean like R3F's and like the paper's description of uniform noise;
and rxf finds the layers of any architecture instead of editing each model's encoder
class. Like the official code, every position (padding too) is perturbed: padding is
masked out of the attention, so noise there reaches no real token. The official scripts
fine-tune with dropout 0 (``--dropout_rate 0.0``); rxf leaves dropout to the model's
configuration.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from rxf.errors import OptionError
from rxf.methods.composite import Modifier
from rxf.models import unwrap, warn_if_eval_mode
from rxf.noise import sample_noise


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Transformer layers of ``model`` as (qualified name, module), in order.

    Raises OptionError when the model has no list of layers rxf can recognise."""
    inner = unwrap(model)
    base = getattr(inner, "base_model", None)
    base = inner if base is None else base
    prefix = next((name for name, module in inner.named_modules() if module is base), "")
    stacks: list[str] = []
    layers = []
    for name, module in base.named_modules():
        if any(name.startswith(stack + ".") for stack in stacks):
            continue  # inside a stack already found (e.g. T5's sub-layer lists)
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        child = module[0]
        if len(kinds) != 1 or isinstance(child, (nn.ModuleList, nn.ModuleDict)) or not any(True for _ in child.parameters()):
            continue
        if not any(True for _ in child.children()):
            continue  # a list of leaf modules (e.g. per-task linear heads), not of layers
        stacks.append(name)
        full = ".".join(part for part in (prefix, name) if part)
        layers += [(f"{full}.{i}", layer) for i, layer in enumerate(module)]
    if not layers:
        raise OptionError(
            f"hype: cannot find the Transformer layers of {type(inner).__name__} (looked for a ModuleList of "
            "identical layers in its base model)"
        )
    return layers


@contextlib.contextmanager
def perturbed_layer_inputs(layers: list[nn.Module], noise_type: str, eps: float) -> Iterator[None]:
    """Inside the block, each call of a layer in training mode gets h + z as its hidden
    states. Raises when no layer was called (the noise would reach nothing)."""
    calls = 0

    def hook(module, args, kwargs):
        nonlocal calls
        if not module.training:
            return None
        calls += 1
        if args:
            hidden = args[0]
            return (hidden + sample_noise(hidden, noise_type, eps), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden + sample_noise(hidden, noise_type, eps)}
        raise RuntimeError(f"hype: {type(module).__name__} was called without its hidden states")

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if calls == 0:
        raise RuntimeError("hype: no Transformer layer was called in training mode during the perturbed pass")


class HyPe(Modifier):
    """HyPe's life cycle: the layers found in set-up (refusing a model without them),
    their inputs perturbed in every training forward pass."""

    name = "hype"

    def __init__(self, options):
        super().__init__(options)
        self.layers: list[nn.Module] | None = None

    def setup(self, model):
        self.layers = [layer for _, layer in transformer_layers(model)]

    def around(self, model, batch):
        if not model.training:
            warn_if_eval_mode(model, self.name)
            return contextlib.nullcontext()
        if self.layers is None:
            self.setup(model)
        return perturbed_layer_inputs(self.layers, self.options.hype_noise_type, self.options.hype_eps)
