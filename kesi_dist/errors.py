"""User-facing errors: the CLI prints them as one `error: ...` line, no traceback.

Library code (models/, pruning/, train/, distill/, data/) knows arguments, not config keys: it raises
`BadValue(arg, what)` about a value it was given. The config layer, which knows which key of the
user's file or `--set` the argument came from, turns it into a `UsageError` naming that key.
"""

__all__ = ["KesiError", "UsageError", "RunError", "BadValue", "Interrupted"]


class KesiError(Exception):
    """Base class for errors that are the user's to fix; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(KesiError):
    """Bad invocation or configuration (exit code 2)."""

    exit_code = 2


class RunError(KesiError):
    """A failure at run time: bad data file, diverged training, unreachable cluster (exit code 1)."""

    exit_code = 1


class BadValue(ValueError):
    """A library function's argument `arg` has a value it cannot use; `what` says why.

    `str(e)` is "<arg>: <what>"; the config layer re-raises it as a UsageError naming the config key.
    """

    def __init__(self, arg: str, what: str):
        super().__init__(f"{arg}: {what}")
        self.arg, self.what = arg, what


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (a preempted node, `ray job stop`) reached the driver.

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it. `message` is the one
    line the CLI prints (set once the run is stopped); the exit code is 128 + the signal's number.
    """

    CODES = {"SIGINT": 130, "SIGTERM": 143}
    # The last signal the driver's handler took. Ray re-raises an interrupt that arrives inside a blocking
    # call (ray.get, ray.wait) as a plain KeyboardInterrupt, so the exception alone may not tell which.
    received: str | None = None

    @classmethod
    def signal_of(cls, e: KeyboardInterrupt) -> str:
        return e.signame if isinstance(e, cls) else cls.received or "SIGINT"

    def __init__(self, signame: str, message: str = ""):
        super().__init__(message or f"interrupted by {signame}")
        self.signame, self.message = signame, message or f"interrupted by {signame}"

    @property
    def exit_code(self) -> int:
        return self.CODES.get(self.signame, 130)
