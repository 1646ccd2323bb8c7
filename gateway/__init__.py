"""obs-gateway: an authenticated, streaming ingest gateway for VictoriaMetrics
remote-write and OTLP/HTTP traces."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("obs-gateway")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
