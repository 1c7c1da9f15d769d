"""Errors for bad conversion input. The CLI prints their message (which names the file, key, shape or
argument at fault) instead of a traceback; anything else is a bug and keeps its traceback."""


class ConversionError(ValueError):
    """Bad input to a conversion."""


class CheckpointError(ConversionError):
    """A checkpoint that cannot be read as weights: missing, wrong format, truncated, not plain weights."""


class KeyMismatchError(ConversionError):
    """Source and target keys do not account for each other."""


class ShapeMismatchError(ConversionError):
    """A converted tensor would not have the shape the target model expects."""


class OutputExistsError(ConversionError, FileExistsError):
    """OUTPUT exists and --overwrite was not given."""
