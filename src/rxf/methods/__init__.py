"""The six fine-tuning methods, one file each. See docs/methods.md."""

from rxf.methods.freelb import freelb_step
from rxf.methods.options import METHODS, MethodOptions
from rxf.methods.r3f import r3f_loss
from rxf.methods.r4f import apply_spectral_norm, normalised_linears
from rxf.methods.smart import EMATeacher, smart_loss
from rxf.methods.standard import standard_loss, task_loss


def method_loss(model, batch, options: MethodOptions, teacher: EMATeacher | None = None):
    """``(loss, logs)`` of ``options.method`` for one batch, for every method computed as
    a loss: std and std++ (the task loss), r3f and r4f (R3F's loss; R4F's difference is
    the model's head), smart (needs its ``teacher`` when ``smart_bregman`` is on). FreeLB,
    which runs its own backward calls, is ``freelb_step``."""
    if options.method in ("r3f", "r4f"):
        return r3f_loss(model, batch, options)
    if options.method == "smart":
        return smart_loss(model, batch, options, teacher)
    if options.method == "freelb":
        raise ValueError("method_loss: FreeLB is a training step; call freelb_step")
    return standard_loss(model, batch)


__all__ = [
    "METHODS",
    "MethodOptions",
    "EMATeacher",
    "apply_spectral_norm",
    "freelb_step",
    "method_loss",
    "normalised_linears",
    "r3f_loss",
    "smart_loss",
    "standard_loss",
    "task_loss",
]
