"""Errors that rxf reports to the user as one clear line (the CLI exits non-zero)."""


class RXFError(ValueError):
    """Base class: a problem with the user's input, not a bug in rxf."""


class OptionError(RXFError):
    """An option has a value rxf cannot use; the message names the option."""


class DataError(RXFError):
    """A data file is missing or malformed; the message names the file and line."""


class TrainingDiverged(RXFError):
    """Training produced non-finite losses or gradients for too many consecutive updates,
    or no evaluation produced a finite score: nothing is kept as a result."""


def unloadable_model(flag: str, path, exc: BaseException) -> OptionError:
    """The one-line error for a model folder ``from_pretrained`` could not read: the
    library's first line, and what the folder looks like when that explains it (an empty
    folder, or a run folder whose model is in ``best/``)."""
    from pathlib import Path

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "best" / "config.json").is_file():
            return OptionError(f"{flag}: {folder} is a run folder; its fine-tuned model is {folder / 'best'}")
        reason = "no config.json in it: a model folder holds config.json, the weights and the tokenizer's files"
    return OptionError(f"{flag}: cannot load {path} ({reason})")
