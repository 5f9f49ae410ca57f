"""R4F: R3F with a head g reparameterised to be at most 1-Lipschitz by spectral
normalisation, W_SN = W / sigma_max(W) (Aghajanyan et al., ICLR 2021, Section 3.2;
Miyato et al. 2018). The loss is R3F's (``rxf.methods.r3f.r3f_loss``); this file changes
the model and owns what that change needs during training (``R4F``).

Scope ``all`` normalises every linear layer of the head, as the paper states; ``last``
normalises only the last one, as fairseq does. ``torch.nn.utils.parametrizations.
spectral_norm`` renames a weight to ``parametrizations.weight.original`` and adds power
iteration vectors; hooks registered here fold the normalised weight back into a plain
``weight`` entry in every ``state_dict()``, so ``save_pretrained`` checkpoints load with a
plain ``from_pretrained``, and accept plain ``weight`` entries when loading.

Training state: each training-mode evaluation of W / sigma advances the power iteration
one step, so the clean and the noised pass would see different heads. ``R4F.loss`` runs
both passes under ``parametrize.cached()``: one power iteration per batch, shared by its
passes. A checkpoint's weights are the folded W / sigma; the raw weight W and the vectors
u, v that training continues from go into the method state (``R4F.state_dict``), so a
resumed run continues exactly where the unbroken one would.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from rxf.errors import OptionError
from rxf.methods.base import Method
from rxf.methods.r3f import r3f_loss
from rxf.models import classification_head, is_shard, unwrap, whole

_ORIGINAL = "parametrizations.weight.original"
_U = "parametrizations.weight.0._u"
_V = "parametrizations.weight.0._v"


def head_linears(model: nn.Module, scope: str = "all") -> list[tuple[str, nn.Linear]]:
    """The head's linear layers to normalise, as (qualified name, module) pairs.

    Raises OptionError when the model has no head rxf can find."""
    linears = [
        (f"{head_name}.{name}" if name else head_name, module)
        for head_name, head in classification_head(model)
        for name, module in head.named_modules()
        if isinstance(module, nn.Linear)
    ]
    if not linears:
        raise OptionError(
            f"--method r4f: cannot find a classification head with linear layers on "
            f"{type(unwrap(model)).__name__} (looked for children beside its base model)"
        )
    return linears if scope == "all" else linears[-1:]


def apply_spectral_norm(model: nn.Module, scope: str = "all") -> list[str]:
    """Spectrally normalise the head's linear layers in place; returns their names.

    Idempotent: layers already normalised are left alone."""
    names = []
    for name, linear in head_linears(model, scope):
        if not parametrize.is_parametrized(linear, "weight"):
            spectral_norm(linear)
            linear.register_state_dict_post_hook(_fold_into_weight)
            linear.register_load_state_dict_pre_hook(_unfold_from_weight)
        names.append(name)
    return names


def normalised_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The spectrally normalised linear layers in ``model``."""
    return [
        (name, module)
        for name, module in unwrap(model).named_modules()
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight")
    ]


@torch.no_grad()
def refresh_spectral_norm(model: nn.Module, iterations: int = 30) -> None:
    """Run extra power iterations on every normalised layer's stored singular vectors.

    Training advances the iteration by one step per forward pass, *before* the
    optimiser moves the weight, so after the last update the stored vectors lag one
    step behind and eval mode slightly underestimates sigma. Call this before
    evaluating or saving (RXFTrainer does) so that the folded weights are 1-Lipschitz.
    """
    for _, linear in normalised_linears(model):
        weight = whole(linear.parametrizations.weight.original)
        sn = linear.parametrizations.weight[0]
        u, v = sn._u, sn._v
        for _ in range(iterations):
            v = torch.nn.functional.normalize(torch.mv(weight.t(), u), dim=0, eps=sn.eps)
            u = torch.nn.functional.normalize(torch.mv(weight, v), dim=0, eps=sn.eps)
        sn._u.copy_(u)
        sn._v.copy_(v)


@torch.no_grad()
def folded_weight(linear: nn.Linear) -> torch.Tensor:
    """W / sigma with sigma estimated from the stored power-iteration vectors, exactly as
    the parametrisation computes it in eval mode, without advancing the iteration."""
    original = whole(linear.parametrizations.weight.original)
    sn = linear.parametrizations.weight[0]
    sigma = torch.vdot(sn._u, torch.mv(original, sn._v))
    return original / sigma


def _fold_into_weight(module, state_dict, prefix, local_metadata):
    if _ORIGINAL not in dict(module.named_parameters()):
        return
    state_dict[prefix + "weight"] = folded_weight(module).detach().clone()
    for key in (_ORIGINAL, _U, _V):
        state_dict.pop(prefix + key, None)


def _unfold_from_weight(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    plain = prefix + "weight"
    if plain in state_dict and prefix + _ORIGINAL not in state_dict:
        # sigma_max(W_SN) = 1, so W_SN is a valid "original" weight whose normalisation is
        # itself; the stored power-iteration vectors stay those of the same singular pair.
        state_dict[prefix + _ORIGINAL] = state_dict.pop(plain)
        sn = module.parametrizations.weight[0]
        state_dict.setdefault(prefix + _U, sn._u.detach().clone())
        state_dict.setdefault(prefix + _V, sn._v.detach().clone())


class R4F(Method):
    """R4F's life cycle: normalise the head before training, one power iteration per
    batch shared by R3F's two passes, sigma settled before evaluating and saving, and the
    raw weights with their power-iteration vectors in every checkpoint."""

    def setup(self, model):
        apply_spectral_norm(model, self.options.r4f_scope)

    def loss(self, model, batch):
        with parametrize.cached():
            return r3f_loss(model, batch, self.options)

    def before_eval(self, model):
        refresh_spectral_norm(model)

    def state_dict(self, model):
        state = {}
        for name, linear in normalised_linears(model):
            sn = linear.parametrizations.weight[0]
            state[f"{name}.weight_original"] = whole(linear.parametrizations.weight.original).detach().clone()
            state[f"{name}.weight_u"] = sn._u.detach().clone()
            state[f"{name}.weight_v"] = sn._v.detach().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, model, state):
        for name, linear in normalised_linears(model):
            sn = linear.parametrizations.weight[0]
            original = linear.parametrizations.weight.original
            saved = state[f"{name}.weight_original"].to(original.device, original.dtype)
            if is_shard(original):
                from torch.distributed.tensor import distribute_tensor

                saved = distribute_tensor(saved, original.device_mesh, original.placements)
            original.copy_(saved)
            sn._u.copy_(state[f"{name}.weight_u"])
            sn._v.copy_(state[f"{name}.weight_v"])
