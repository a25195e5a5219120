"""cltool: a command-line experiment runner for contrastive representation learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cltool")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
