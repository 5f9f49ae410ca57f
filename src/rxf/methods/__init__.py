"""The six fine-tuning methods, one file each, each with its loss (or step) and its life
cycle in a training run (a ``Method``). See docs/methods.md."""

from torch import nn

from rxf.methods.base import Method
from rxf.methods.freelb import FreeLB, freelb_step
from rxf.methods.generation import Generation, generation_loss
from rxf.methods.options import METHODS, MethodOptions
from rxf.methods.r3f import R3F, r3f_loss
from rxf.methods.r4f import R4F, apply_spectral_norm, normalised_linears
from rxf.methods.smart import SMART, EMATeacher, smart_loss
from rxf.methods.standard import Standard, standard_loss, task_loss


def build_method(options: MethodOptions, model: nn.Module | None = None) -> Method:
    """The life cycle of ``options.method``; a generation model (seq2seq or decoder-only
    LM) gets the generation losses, which offer std, std++ and r3f."""
    from rxf.models import is_generation_model

    if model is not None and is_generation_model(model):
        from rxf.methods.generation import check_generation_method

        check_generation_method(options.method)
        return Generation(options)
    if options.method == "r3f":
        return R3F(options)
    if options.method == "r4f":
        return R4F(options)
    if options.method == "smart":
        return SMART(options)
    if options.method == "freelb":
        return FreeLB(options)
    return Standard(options)


__all__ = [
    "METHODS",
    "EMATeacher",
    "FreeLB",
    "Generation",
    "Method",
    "MethodOptions",
    "R3F",
    "R4F",
    "SMART",
    "Standard",
    "apply_spectral_norm",
    "build_method",
    "freelb_step",
    "generation_loss",
    "normalised_linears",
    "r3f_loss",
    "smart_loss",
    "standard_loss",
    "task_loss",
]
