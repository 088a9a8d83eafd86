"""The exceptions that mean "stop, and say why in one line".

The CLI prints them as a single line; everything else is a bug and keeps its traceback.
"""

import contextlib
import difflib
import errno
from collections.abc import Iterable

# Exit codes of the `ilora` command (the README lists them).
EXIT_BAD_INPUT = 2  # a flag, config key, data file, path or saved state we cannot use
EXIT_DIVERGED = 1  # training diverged or collapsed: nothing was marked finished
EXIT_WRITE_FAILED = 1  # the machine refused a write (disk full, I/O error, read-only): retry once it is fixed
EXIT_GATE = 3  # the run finished and was written, but its released model breached the forgetting gate
EXIT_INTERRUPTED = 130  # Ctrl-C: re-running the same command resumes


class ILoRAError(ValueError):
    """A bad input: flag, config key, data file, adapter directory. The message names the culprit."""

    exit_code = EXIT_BAD_INPUT


class TrainingDiverged(ILoRAError):
    """A loss, adapter or score stopped being finite. The task is not written as finished."""

    exit_code = EXIT_DIVERGED


class GateBreached(ILoRAError):
    """A finished run whose released model forgot more than the run's gate allows (written as usual)."""

    exit_code = EXIT_GATE


class WriteFailed(ILoRAError):
    """A write the machine refused. Nothing half-written is left where it would block the retry."""

    exit_code = EXIT_WRITE_FAILED


# What a refused write looks like once a library has wrapped the OSError: safetensors' Rust IoError,
# torch's stream writer.
WRITE_FAILURE_SIGNS = (
    "IoError",
    "No space left",
    "file write failed",
    "Disk quota",
    "Read-only file system",
    "Input/output error",
)
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def is_refused_write(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in REFUSED_WRITES
    return (
        isinstance(err, RuntimeError | ValueError)
        and any(sign in str(err) for sign in WRITE_FAILURE_SIGNS)
        or (type(err).__name__ == "SafetensorError" and any(sign in str(err) for sign in WRITE_FAILURE_SIGNS))
    )


@contextlib.contextmanager
def writing(path):
    """Around a write into `path`: a refused write (full disk, I/O error) becomes one `WriteFailed`
    line naming the path and the cause; any other error is left as it is."""
    try:
        yield
    except ILoRAError:
        raise
    except Exception as err:
        if not is_refused_write(err):
            raise
        cause = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
        where = err.filename if isinstance(err, OSError) and err.filename else path
        raise WriteFailed(f"could not write {where}: {cause}") from None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest known word, or an empty string: the one helper for unknown
    commands, flags, keys, methods and module names."""
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
