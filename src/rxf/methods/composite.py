"""Composition: one loss (std, std++, r3f, r4f, smart, freelb, rdrop) with any number of
modifiers (mixout, noisytune, childtune, hype, neftune), e.g. NoisyTune + R3F.

A *modifier* changes training without defining the loss: it may change the model once
before training (NoisyTune's noise, Mixout's copy of the pre-trained weights), learn from
the training data before the first update (Child-Tuning-D's Fisher information, through
``prepare``), hook into every training forward pass (NEFTune, HyPe, Mixout, through
``around``), touch the gradients (Child-Tuning's masks) and keep checkpoint state. A
``Composite`` runs every part's life cycle and the main part's loss or step inside the
modifiers' ``around`` contexts:

    setup:        main first (R4F's head exists before Mixout looks for linear layers),
                  then the modifiers in ``MODIFIERS`` order (Mixout records the
                  pre-trained weights before NoisyTune perturbs them)
    prepare:      each modifier (Child-Tuning-D's Fisher pass)
    loss / step:  main's, inside every modifier's ``around(model, batch)`` in training
    after_step, before_eval, state_dict, load_state_dict: every part

``rxf.methods.build_method`` builds one from ``MethodOptions.method`` and ``extras``; no
pair of methods needs a flag of its own. The main part's checkpoint keys are kept as they
are (a composite with SMART saves ``teacher.*`` as SMART does); each modifier prefixes its
keys with its name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from rxf.methods.base import Logs, Method
from rxf.methods.generation import Generation
from rxf.methods.options import MethodOptions
from rxf.methods.standard import standard_loss


class Modifier(Method):
    """A training-time change that combines with any loss.

    On its own (``NEFTune(options).loss(model, batch)``) its loss is the classification
    task loss inside ``around``; ``build_method`` composes it with any other loss,
    including the generation losses."""

    name = ""

    def around(self, model: nn.Module, batch: dict[str, Any]) -> ContextManager:
        """A context entered around each training forward pass of the loss (hooks)."""
        return contextlib.nullcontext()

    def loss(self, model, batch):
        with self.around(model, batch):
            return standard_loss(model, batch)


class Composite(Method):
    """A loss method (``main``) with modifiers; see the module docstring."""

    def __init__(self, options: MethodOptions, main: Method, modifiers: list[Modifier]):
        super().__init__(options)
        self.main = main
        self.modifiers = list(modifiers)

    @property
    def runs_own_backward(self) -> bool:  # FreeLB's K backward calls run inside the modifiers' contexts
        return self.main.runs_own_backward

    @property
    def teacher(self):
        """SMART's EMA teacher when the main part is SMART (RXFTrainer.teacher reads it)."""
        return getattr(self.main, "teacher", None)

    def parts(self) -> list[Method]:
        return [self.main, *self.modifiers]

    def setup(self, model):
        for part in self.parts():
            part.setup(model)

    def prepare(self, model, batches):
        for modifier in self.modifiers:
            modifier.prepare(model, batches)

    def _around(self, model: nn.Module, batch: dict[str, Any]) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if model.training:
            # SMART copies the model for its teacher on first use: made here, before the
            # modifiers' hooks are on the model, or the copy would keep them for good.
            make_teacher = getattr(self.main, "_teacher", None)
            if make_teacher is not None:
                make_teacher(model)
            for modifier in self.modifiers:
                stack.enter_context(modifier.around(model, batch))
        return stack

    def loss(self, model, batch):
        with self._around(model, batch):
            return self.main.loss(model, batch)

    def step(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        update: int | None = None,
        no_sync: Callable[[], ContextManager] | None = None,
    ) -> tuple[torch.Tensor, Logs]:
        if not self.main.runs_own_backward:
            return super().step(model, batch, backward, update, no_sync)  # self.loss, then one backward
        with self._around(model, batch):
            return self.main.step(model, batch, backward, update, no_sync)

    def after_step(self, model, step, total_steps):
        for part in self.parts():
            part.after_step(model, step, total_steps)

    def before_eval(self, model):
        for part in self.parts():
            part.before_eval(model)

    def state_dict(self, model):
        state: dict[str, torch.Tensor] = {}
        for part in self.parts():
            own = part.state_dict(model)
            clash = set(own) & set(state)
            if clash:
                raise RuntimeError(f"checkpoint keys claimed by two parts of {self.options.method_label()}: "
                                   f"{sorted(clash)[:3]}")
            state.update(own)
        return state

    def load_state_dict(self, model, state):
        # Each part picks its own keys (SMART: teacher.*, a modifier: <name>.*).
        for part in self.parts():
            part.load_state_dict(model, state)


class GenerationComposite(Composite, Generation):
    """A composite whose main part is a generation loss; it is a ``Generation`` so that
    RXFTrainer passes the accumulated batch's token count (``num_items_in_batch``)."""

    def loss(self, model, batch, num_items_in_batch=None):
        with self._around(model, batch):
            return self.main.loss(model, batch, num_items_in_batch=num_items_in_batch)
