"""The subpackages' curated public APIs: every name resolves, lists are tidy, imports stay cheap."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

SUBPACKAGES = ("alm.losses", "alm.data", "alm.tokenization", "alm.hypernet", "alm.eval")


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_all_is_sorted_and_unique(name):
  mod = importlib.import_module(name)
  names = list(mod.__all__)
  assert names, f"{name}.__all__ is empty"
  assert names == sorted(names), f"{name}.__all__ is not sorted"
  assert len(names) == len(set(names)), f"{name}.__all__ has duplicates"
  assert not [n for n in names if n.startswith("_")], f"{name}.__all__ names a private name"


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_public_name_resolves(name):
  mod = importlib.import_module(name)
  for attr in mod.__all__:
    value = getattr(mod, attr)
    # The re-export is the defining module's own object, not a copy.
    home = getattr(value, "__module__", None)
    if home and home.startswith(name + "."):
      assert getattr(importlib.import_module(home), attr) is value, f"{name}.{attr}"
  assert set(mod.__all__) <= set(dir(mod))


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_star_import(name):
  namespace: dict = {}
  exec(f"from {name} import *", namespace)  # pylint: disable=exec-used
  assert set(importlib.import_module(name).__all__) <= set(namespace)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_unknown_name_is_an_attribute_error(name):
  mod = importlib.import_module(name)
  with pytest.raises(AttributeError, match="no_such_name"):
    getattr(mod, "no_such_name")


def test_submodules_still_import_by_name():
  from alm.data import pipeline  # pylint: disable=import-outside-toplevel
  from alm.losses import alm as alm_lib  # pylint: disable=import-outside-toplevel
  assert alm_lib.alm_loss is importlib.import_module("alm.losses").alm_loss
  assert pipeline.Pipeline is importlib.import_module("alm.data").Pipeline


def test_importing_the_subpackages_is_cheap():
  code = ("import sys; import " + ", ".join(SUBPACKAGES) + "; "
          "heavy = sorted(m for m in ('jax', 'numpy', 'grain', 'tokenizers') if m in sys.modules); "
          "print(','.join(heavy))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"importing {SUBPACKAGES} pulled in {out.stdout.strip()}"
