"""The six fine-tuning methods, one file each, each with its loss (or step) and its life
cycle in a training run (a ``Method``). See docs/methods.md.

Names are imported on first use (PEP 562), so that reading ``rxf.methods.options`` — the
command line's ``--help`` — does not import torch."""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "Method": "base",
    "FreeLB": "freelb", "freelb_step": "freelb",
    "Generation": "generation", "generation_loss": "generation",
    "METHODS": "options", "MethodOptions": "options",
    "R3F": "r3f", "r3f_loss": "r3f",
    "R4F": "r4f", "apply_spectral_norm": "r4f", "normalised_linears": "r4f",
    "SMART": "smart", "EMATeacher": "smart", "smart_loss": "smart",
    "Standard": "standard", "standard_loss": "standard", "task_loss": "standard",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rxf.methods' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rxf.methods.{_EXPORTS[name]}"), name)


def build_method(options, model=None):
    """The life cycle (a ``Method``) of ``options.method``; a generation model (seq2seq or
    decoder-only LM) gets the generation losses, which offer std, std++ and r3f."""
    from rxf.methods.freelb import FreeLB
    from rxf.methods.generation import Generation, check_generation_method
    from rxf.methods.r3f import R3F
    from rxf.methods.r4f import R4F
    from rxf.methods.smart import SMART
    from rxf.methods.standard import Standard
    from rxf.models import is_generation_model

    if model is not None and is_generation_model(model):
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


__all__ = sorted([*_EXPORTS, "build_method"])
