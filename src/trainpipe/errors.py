"""The errors trainpipe explains to its users, each with the exit code it ends in."""


class TrainpipeError(Exception):
    """An error with a message meant for the user; no traceback unless --verbose."""

    exit_code = 1


class ConfigError(TrainpipeError):
    """The configuration is wrong: unknown option, bad key, bad value."""

    exit_code = 2


class SourceError(TrainpipeError):
    """A data source is missing, unreadable, or in a format trainpipe cannot read."""

    exit_code = 2


class DataValidationError(TrainpipeError):
    """The data broke its dataset's contract; the message is the readable report."""

    exit_code = 3

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report  # a steps.Report to record on the failed step's run


class ClusterError(TrainpipeError):
    """compute=dask: the cluster failed the work (a worker died, the scheduler went away)."""


class GateFailed(TrainpipeError):
    """The registry gate kept the champion and `registry.require_promotion` is true."""

    exit_code = 4


class Interrupted(BaseException):  # noqa: N818 - a BaseException like KeyboardInterrupt
    """SIGTERM arrived: unwind like Ctrl-C so every run ends KILLED."""
