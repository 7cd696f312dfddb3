"""Importing the ORIGINAL code (CompVis / Stability / sgm trees, whose top package is also named `ldm` or `sgm`)
in a fixture generator, while our own `ldm` is set aside. Used by the tests/make_fixtures_*.py generators only;
nothing here is imported by the tests themselves."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def original_package(repo: Path, package: str = "ldm") -> Iterator[None]:
    """Within the block `<package>` is the original repository's, also for the imports the original makes
    while it runs (instantiate_from_config imports its targets lazily); our own is set aside and restored
    afterwards. Modules imported inside keep working after the block."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == package or k.startswith(package + ".")}
    path = list(sys.path)
    # the originals' `ldm` has no __init__.py: a regular `ldm` package anywhere on the path would win
    sys.path[:] = [str(repo)] + [p for p in path if not (Path(p or ".") / package / "__init__.py").exists()]
    try:
        yield
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            sys.modules.pop(k)
        sys.modules.update(ours)


def import_original(repo: Path, modules: list[str], package: str = "ldm") -> list[types.ModuleType]:
    """Import `<package>.<module>` from an original repository while our own `ldm` is set aside (and restored
    afterwards); returns the modules in the order asked."""
    with original_package(repo, package):
        return [importlib.import_module(name) for name in modules]
