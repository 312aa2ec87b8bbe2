"""Lazy re-exports for the packages' `__init__`s (standard library only).

    __getattr__, __dir__ = lazy_exports(__name__, {"Name": "alm.pkg.module", ...})

A name is imported from its module on first use and then cached in the
package's namespace, so importing a package stays cheap (no JAX).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, names: dict[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """`(__getattr__, __dir__)` for `package` re-exporting `names` ({name: module})."""

  def __getattr__(name: str):
    if name in names:
      mod = importlib.import_module(names[name])
      # A name that is its module's own (e.g. `alm.assets`) is the module itself.
      value = mod if mod.__name__.endswith("." + name) else getattr(mod, name)
      vars(sys.modules[package])[name] = value  # later look-ups skip this hook
      return value
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__() -> list[str]:
    return sorted(set(vars(sys.modules[package])) | set(names))

  return __getattr__, __dir__
