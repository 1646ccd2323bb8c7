"""Which build of the hot path runs: the mypyc-compiled modules or the pure ones.

``setup.py`` compiles the modules listed in pyproject.toml next to their
``.py`` source, and Python prefers an extension module to a source file.
``install`` (called by ``gateway/__init__.py``, before any other gateway
module loads) puts a finder in front that loads the ``.py`` files instead
when ``OBS_GATEWAY_PURE`` is set, or when the build is stale: a compiled
module whose source no longer matches the digest recorded at build time
(``gateway/_compiled.json``), as after editing a checkout with an in-place
build.  It is all or nothing: compiled modules call each other directly in
C, so one pure module among compiled ones would not run its new source.

Must not import anything of gateway (it runs first, and the supervisor
asks ``running`` without loading the data path).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec, PathFinder
from importlib.util import find_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType

__all__ = ["PURE_ENV", "install", "running"]

PURE_ENV = "OBS_GATEWAY_PURE"
_ROOT = Path(__file__).resolve().parent
_MANIFEST = _ROOT / "_compiled.json"

# Why the pure modules run although compiled ones are installed ("" when
# they do not, or none are installed).
_reason = ""


class _PureFinder:
    """Finds the ``.py`` source of a gateway module that has a compiled twin."""

    @staticmethod
    def find_spec(
        fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith("gateway."):
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, ExtensionFileLoader) or not spec.origin:
            return None  # the ordinary machinery finds it as usual
        source = Path(spec.origin).with_name(fullname.rpartition(".")[2] + ".py")
        return spec_from_file_location(fullname, source)


def _compiled_modules() -> dict[str, str]:
    """Module name → digest of the source it was compiled from."""
    try:
        modules = json.loads(_MANIFEST.read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return modules if isinstance(modules, dict) else {}


def _stale(modules: dict[str, str]) -> bool:
    for name, digest in modules.items():
        source = _ROOT.parent.joinpath(*name.split(".")).with_suffix(".py")
        try:
            if hashlib.sha256(source.read_bytes()).hexdigest() != digest:
                return True
        except OSError:
            return True
    return False


def _has_extensions() -> bool:
    return any(p.name.endswith(tuple(EXTENSION_SUFFIXES)) for p in _ROOT.glob("*/*") if p.is_file())


def install() -> None:
    """Decide once per process, before the first gateway submodule loads."""
    global _reason  # noqa: PLW0603  (decided once, at import)
    modules = _compiled_modules()
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _reason = PURE_ENV
    elif modules and _stale(modules):
        _reason = "stale build"
    elif not modules and _has_extensions():
        _reason = "incomplete build"  # extensions without the build's manifest
    if _reason and not any(isinstance(f, _PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PureFinder())


def running() -> tuple[str, str]:
    """("compiled" | "pure", why pure although a build is installed, or "")."""
    hot = find_spec("gateway.datapath.connection")  # found as an import would, not loaded
    compiled = hot is not None and isinstance(hot.loader, ExtensionFileLoader)
    return ("compiled" if compiled else "pure"), ("" if compiled else _reason)
