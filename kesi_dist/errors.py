"""User-facing errors: the CLI prints them as one `error: ...` line, no traceback."""

__all__ = ["KesiError", "UsageError", "RunError"]


class KesiError(Exception):
    """Base class for errors that are the user's to fix; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(KesiError):
    """Bad invocation or configuration (exit code 2)."""

    exit_code = 2


class RunError(KesiError):
    """A failure at run time: bad data file, diverged training, unreachable cluster (exit code 1)."""

    exit_code = 1
