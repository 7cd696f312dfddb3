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


def import_original(repo: Path, modules: list[str], package: str = "ldm") -> list[types.ModuleType]:
    """Import `<package>.<module>` from an original repository while our own `ldm` is set aside (and restored
    afterwards); returns the modules in the order asked."""
    with original_tree(repo, (package,)):
        return [importlib.import_module(name) for name in modules]


@contextlib.contextmanager
def original_tree(repo: Path, packages: tuple[str, ...] = ("ldm",)) -> Iterator[None]:
    """While active, `import <package>...` resolves to the original tree `repo`, also for the imports the original
    makes while it runs (instantiate_from_config imports its targets lazily); our own modules of those names are
    set aside and restored afterwards, and the original's are dropped from sys.modules (modules imported inside
    keep working). The originals' `ldm` has no __init__.py: a regular package of that name on the path would win,
    so such path entries are left out meanwhile."""
    def ours(name):
        return any(name == p or name.startswith(p + ".") for p in packages)

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    path = list(sys.path)
    sys.path[:] = [str(repo)] + [p for p in path if not any((Path(p or ".") / q / "__init__.py").exists()
                                                            for q in packages)]
    try:
        yield
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if ours(k)]:
            sys.modules.pop(k)
        sys.modules.update(saved)


def original_package(repo: Path, package: str = "ldm"):
    """original_tree for one package."""
    return original_tree(repo, (package,))
