"""Build hook: compiles the hot path with mypyc when it can, else builds pure.

Metadata lives in pyproject.toml; this file only adds the extension modules.
The modules named in ``[tool.obs-gateway] compiled`` (pyproject.toml) are
compiled from the same typed source that ships beside them as ``.py``, so
the package is complete when nothing compiles: no working C compiler or
Python headers, mypyc unavailable or failing, or ``OBS_GATEWAY_PURE=1`` at
build time.  Which build runs is decided at import (``gateway/build.py``),
and the ``listening`` log line says which.

A compiled build writes ``gateway/_compiled.json``: the SHA-256 of each
compiled module's source.  ``gateway/build.py`` runs the pure modules when
any source no longer matches (an edited checkout with an in-place build),
so a stale build is never what runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MANIFEST = "gateway/_compiled.json"


def _modules() -> list[str]:
    with open(HERE / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["obs-gateway"]
    return list(table["compiled"])


def _say(message: str) -> None:
    print(f"obs-gateway build: {message}", file=sys.stderr)


def _compiler_works() -> bool:
    """A C compiler that can build against this Python's headers."""
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        _say("no Python.h for this interpreter")
        return False
    from distutils.ccompiler import new_compiler  # setuptools' copy
    from distutils.errors import CCompilerError, DistutilsError
    from distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler.compile(
                [str(src)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except (CCompilerError, DistutilsError, OSError) as exc:
            _say(f"no working C compiler ({type(exc).__name__})")
            return False
    return True


def _extensions(modules: list[str]) -> list[object]:
    if os.environ.get("OBS_GATEWAY_PURE", "") not in ("", "0"):
        _say("OBS_GATEWAY_PURE is set: building the pure-Python package")
        return []
    if not _compiler_works():
        _say("building the pure-Python package")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not installed: building the pure-Python package")
        return []
    # mypyc only needs the types; the strict gate is `make check`.  Missing
    # third-party stubs in an isolated build environment are Any here.
    options = ["--config-file", os.devnull, "--ignore-missing-imports", "--python-version=3.11"]
    try:
        return list(mypycify([*options, *modules], opt_level="3", group_name="gateway"))
    except Exception as exc:  # noqa: BLE001  (mypyc reports type errors as SystemExit too)
        _say(f"mypyc failed ({type(exc).__name__}: {exc}): building the pure-Python package")
        return []
    except SystemExit as exc:
        _say(f"mypyc failed (exit {exc.code}): building the pure-Python package")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that leaves a pure package behind when compiling fails."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  (compiler errors have no common base)
            _say(f"compiling failed ({type(exc).__name__}: {exc}): building pure")
            self._remove_outputs()
            return
        self._write_manifest()

    def _out_dir(self) -> Path:
        return HERE if self.inplace else Path(self.build_lib)

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        (self._out_dir() / MANIFEST).unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        sources = {
            path.removesuffix(".py").replace("/", "."): hashlib.sha256(
                (HERE / path).read_bytes()
            ).hexdigest()
            for path in _modules()
        }
        target = self._out_dir() / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"modules": sources}, indent=1, sort_keys=True) + "\n")
        _say(f"compiled {len(sources)} modules with mypyc")

    def get_outputs(self) -> list[str]:
        # The manifest travels with the extensions (wheels, editable installs).
        outputs = list(super().get_outputs())
        if self.extensions:
            outputs.append(str(self._out_dir() / MANIFEST))
        return outputs


setup(ext_modules=_extensions(_modules()), cmdclass={"build_ext": OptionalBuildExt})
