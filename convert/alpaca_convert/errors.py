"""The one exception the converter raises for bad input."""


class ConvertError(ValueError):
    """An input checkpoint, tokenizer, adapter or output path is unusable.

    The message names the file, the field or tensor, what was found and what was expected.
    """
