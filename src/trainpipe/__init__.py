"""trainpipe: raw tabular data in a lake to a validated, tracked, registered model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trainpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
