"""The exceptions that mean "stop, and say why in one line".

The CLI prints them as a single line; everything else is a bug and keeps its traceback.
"""

# Exit codes of the `ilora` command (the README lists them).
EXIT_BAD_INPUT = 2  # a flag, config key, data file, path or saved state we cannot use
EXIT_DIVERGED = 1  # training produced a non-finite loss or adapter: nothing was marked finished
EXIT_INTERRUPTED = 130  # Ctrl-C: re-running the same command resumes


class ILoRAError(ValueError):
    """A bad input: flag, config key, data file, adapter directory. The message names the culprit."""

    exit_code = EXIT_BAD_INPUT


class TrainingDiverged(ILoRAError):
    """A loss, adapter or score stopped being finite. The task is not written as finished."""

    exit_code = EXIT_DIVERGED
