"""A method's whole life in a training run, in one object.

Each method file defines a small ``Method`` subclass next to its loss; the trainer, the
cost measurement and the examples all drive a method through these five calls and
nothing else, so R4F's head, SMART's teacher and FreeLB's step are arranged in one
place each:

    method = build_method(options)         # rxf.methods
    method.setup(model)                    # before the optimiser is built (R4F: normalise the head)
    method.prepare(model, batches)         # with training batches (Child-Tuning-D: the Fisher mask)
    loss, logs = method.step(model, batch, backward)   # one (micro-)batch: loss and backward
    optimizer.step(); method.after_step(model, step, total_steps)   # SMART: move the teacher
    method.before_eval(model)              # before evaluating or saving (R4F: settle sigma)
    state = method.state_dict(model)       # what a checkpoint must hold beyond the model
    method.load_state_dict(model, state)   # on resume, after the model's weights are loaded
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch
from torch import nn

from rxf.methods.options import MethodOptions

Logs = dict[str, Any]


class Method:
    """The default life cycle: no set-up, no state, a loss and one backward per batch.

    Subclasses implement ``loss`` (or override ``step`` when, like FreeLB, they run their
    own backward calls) and whichever hooks they need."""

    # True for a method whose ``step`` runs its own backward calls (FreeLB).
    runs_own_backward = False

    def __init__(self, options: MethodOptions):
        self.options = options

    def setup(self, model: nn.Module) -> None:
        """Change the model before training (and before the optimiser holds its
        parameters)."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Logs]:
        """``(loss, logs)`` for one batch; the caller runs one backward."""
        raise NotImplementedError(f"{type(self).__name__} is a training step; call step()")

    def step(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        update: int | None = None,
        no_sync: Callable[[], ContextManager] | None = None,
    ) -> tuple[torch.Tensor, Logs]:
        """One batch's loss and its backward (through ``backward``, which a trainer
        replaces with its own scaling); returns the detached loss and the logs.
        ``update`` (updates done so far) and ``no_sync`` (DDP) serve methods that run
        several backward calls."""
        loss, logs = self.loss(model, batch)
        backward(loss)
        return loss.detach(), logs

    def prepare(self, model: nn.Module, batches) -> None:
        """Before the first update, with an iterable of training batches (Child-Tuning-D
        measures its Fisher information here); the trainer calls it after a resume too,
        when a method whose state was loaded has nothing left to do."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """After each optimiser step; ``step`` counts the updates done."""

    def before_eval(self, model: nn.Module) -> None:
        """Before the model is evaluated or saved."""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict``'s tensors; the model's weights are already loaded."""
