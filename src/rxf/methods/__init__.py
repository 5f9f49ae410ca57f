"""The fine-tuning methods, one file each, each with its loss (or step, or transform) and
its life cycle in a training run (a ``Method``): the paper's six, R-Drop, and the
modifiers NEFTune, NoisyTune, HyPe, Child-Tuning and Mixout, which combine with any loss
through a ``Composite``. See docs/methods.md.

Names are imported on first use (PEP 562), so that reading ``rxf.methods.options`` — the
command line's ``--help`` — does not import torch."""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "Method": "base",
    "ChildTuning": "childtune", "fisher_information": "childtune", "top_fraction_mask": "childtune",
    "Composite": "composite", "GenerationComposite": "composite", "Modifier": "composite",
    "FreeLB": "freelb", "freelb_step": "freelb",
    "Generation": "generation", "generation_loss": "generation",
    "HyPe": "hype", "transformer_layers": "hype",
    "Mixout": "mixout", "mixout_weight": "mixout",
    "NEFTune": "neftune", "neftune_scale": "neftune",
    "NoisyTune": "noisytune", "noisy_tune": "noisytune",
    "LOSSES": "options", "METHODS": "options", "MODIFIERS": "options", "MethodOptions": "options",
    "R3F": "r3f", "r3f_loss": "r3f",
    "R4F": "r4f", "apply_spectral_norm": "r4f", "normalised_linears": "r4f",
    "RDrop": "rdrop", "RDropGeneration": "rdrop", "rdrop_generation_loss": "rdrop", "rdrop_loss": "rdrop",
    "SMART": "smart", "EMATeacher": "smart", "smart_loss": "smart",
    "Standard": "standard", "standard_loss": "standard", "task_loss": "standard",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rxf.methods' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rxf.methods.{_EXPORTS[name]}"), name)


def _loss_method(options, generation: bool):
    """The main part: the loss of ``options.resolved_loss()``, for a classifier or for a
    generation model (seq2seq or decoder-only LM)."""
    import dataclasses

    loss = options.resolved_loss()
    if generation:
        from rxf.methods.generation import Generation, check_generation_method
        from rxf.methods.rdrop import RDropGeneration

        if loss == "rdrop":
            return RDropGeneration(options)
        check_generation_method(loss)
        return Generation(options if loss == options.method else dataclasses.replace(options, method=loss))
    from rxf.methods.freelb import FreeLB
    from rxf.methods.r3f import R3F
    from rxf.methods.r4f import R4F
    from rxf.methods.rdrop import RDrop
    from rxf.methods.smart import SMART
    from rxf.methods.standard import Standard

    kinds = {"r3f": R3F, "r4f": R4F, "smart": SMART, "freelb": FreeLB, "rdrop": RDrop}
    return kinds.get(loss, Standard)(options)


def _modifier(name: str, options):
    from rxf.methods.childtune import ChildTuning
    from rxf.methods.hype import HyPe
    from rxf.methods.mixout import Mixout
    from rxf.methods.neftune import NEFTune
    from rxf.methods.noisytune import NoisyTune

    kinds = {"mixout": Mixout, "noisytune": NoisyTune, "childtune": ChildTuning, "hype": HyPe, "neftune": NEFTune}
    return kinds[name](options)


def build_method(options, model=None):
    """The life cycle (a ``Method``) of ``options``: the loss of ``options.method`` (a
    generation model — seq2seq or decoder-only LM — gets the generation losses, which offer
    std, std++, r3f and rdrop), combined in a ``Composite`` with the modifiers of
    ``options.extras`` and with the method itself when it is a modifier
    (``--method neftune`` = std's loss + NEFTune)."""
    from rxf.models import is_generation_model

    generation = model is not None and is_generation_model(model)
    extras = options.resolved_extras()
    loss_options = options
    if "mixout" in extras:
        # Mixout's mask is one per weight, shared by every row of a pass: in a stacked batch
        # of 2B both R3F/R-Drop halves would see the same mixed weights. Two passes keep the
        # two draws independent, as dropout's are (an explicit setting is kept).
        import dataclasses

        loss_options = dataclasses.replace(
            options,
            r3f_concat_batch=False if options.r3f_concat_batch is None else options.r3f_concat_batch,
            rdrop_concat_batch=False if options.rdrop_concat_batch is None else options.rdrop_concat_batch,
        )
    main = _loss_method(loss_options, generation)
    modifiers = [_modifier(name, options) for name in extras]
    if not modifiers:
        return main
    from rxf.methods.composite import Composite, GenerationComposite

    return (GenerationComposite if generation else Composite)(options, main, modifiers)


__all__ = sorted([*_EXPORTS, "build_method"])
