"""What an ``rxf`` run prints: one progress bar for training (the current loss and
regulariser beside it), one line per evaluation, one line naming the newly initialised
head — and nothing that is not the user's concern (transformers' load report and its
ANSI codes, weight-loading bars, log dicts with numbers as strings, the pin-memory
warning of a CPU-only machine).
"""

from __future__ import annotations

import sys

from transformers import TrainerCallback

_SHOWN = ("loss", "task_loss", "regularizer", "bregman")


def quiet_libraries() -> None:
    """Silence transformers' reports and bars that an rxf run replaces with its own."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()  # "Saving the dataset" bars of the tokenisation cache


def new_weights_line(loading_info: dict) -> str | None:
    """One line naming the weights a model got freshly initialised (its new head)."""
    missing = sorted(loading_info.get("missing_keys", []))
    mismatched = sorted(k for k, *_ in loading_info.get("mismatched_keys", []))
    if not missing and not mismatched:
        return None
    names = ", ".join(missing + mismatched)
    return f"rxf: new weights, initialised at random (the task head): {names}"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunConsole(TrainerCallback):
    """The Trainer's progress and printer callbacks, replaced: a bar with the last loss
    terms (or nothing between evaluations with ``progress=False``) and one line per
    evaluation: ``update 50/250: dev accuracy 0.7592, loss 0.5996``."""

    def __init__(self, progress: bool = True):
        self.progress = progress
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix({k: _number(logs[k]) for k in _SHOWN if k in logs}, refresh=False)
        metrics = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")
                   and not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second"))}
        if metrics:
            line = f"update {state.global_step}/{state.max_steps}: " + ", ".join(
                f"{k.replace('_', ' ', 1)} {_number(v)}" for k, v in metrics.items())
            (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def take_over_console(trainer, progress: bool) -> None:
    """Replace the Trainer's own printing with ``RunConsole``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RunConsole(progress))
