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
