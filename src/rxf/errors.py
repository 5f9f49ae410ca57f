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
    """The one-line error for a model ``from_pretrained`` could not read (missing, corrupt
    or truncated files): the library's first line. What a local folder lacks is said before
    loading, by ``rxf.models.check_model_folder``."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OptionError(f"{flag}: cannot load {path} ({reason})")
