"""obs-gateway: an authenticated, streaming ingest gateway for VictoriaMetrics
remote-write and OTLP/HTTP traces."""

from gateway import build

# Before any other gateway module loads: compiled or pure (gateway/build.py).
build.install()

# The one place the version is written (pyproject.toml reads it from here):
# importlib.metadata would cost every process ~3.7 MB of private memory
# (it imports email, zipfile, csv, ...) to read it back.
__version__ = "0.1.0"

__all__ = ["__version__"]
