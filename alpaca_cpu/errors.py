"""Exceptions raised for bad input files."""


class ModelFileError(ValueError):
    """A model file is missing, unreadable, not GGUF, or inconsistent.

    The message names the file, the field (metadata key or tensor), the value found and the
    value expected.
    """
