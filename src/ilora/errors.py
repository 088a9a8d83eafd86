"""The one exception type that means "the user gave us something we cannot use".

The CLI prints it as a single line and exits with code 2; everything else is a bug and keeps
its traceback.
"""


class ILoRAError(ValueError):
    """A bad input: flag, config key, data file, adapter directory. The message names the culprit."""
