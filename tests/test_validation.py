"""`alm._validation.check_choice`: one "value must be one of" check for every config."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import pytest

from alm._validation import check_choice, choices


class MyError(ValueError):
  pass


def test_valid_values_pass():
  check_choice("mode", "pad", ("pad", "pack"))
  check_choice("mode", "pack", Literal["pad", "pack"])
  check_choice("n", 2, (1, 2, 3))


def test_message_names_option_value_and_choices():
  with pytest.raises(ValueError) as e:
    check_choice("mode", "packed", ("pad", "pack"))
  assert str(e.value) == "mode='packed' is not valid; choose one of: pad, pack."
  with pytest.raises(ValueError, match=r"divergence='kld' is not valid; choose one of: kl, tv\.$"):
    check_choice("divergence", "kld", Literal["kl", "tv"])
  with pytest.raises(ValueError, match=r"family=None is not valid"):
    check_choice("family", None, ("llama",))


def test_error_type_is_the_callers():
  with pytest.raises(MyError, match="x='c'"):
    check_choice("x", "c", ("a", "b"), error=MyError)
  with pytest.raises(KeyError):
    check_choice("x", "c", ("a", "b"), error=KeyError)


def test_choices_keep_order_and_refuse_strings():
  assert choices(Literal["b", "a"]) == ("b", "a")
  assert choices(["b", "a"]) == ("b", "a")
  assert choices({"b": 1, "a": 2}.keys()) == ("b", "a")
  with pytest.raises(TypeError, match="Literal"):
    check_choice("x", "a", "abc")  # a string is not a tuple of choices
  with pytest.raises(TypeError, match="Literal"):
    check_choice("x", "a", 3)


def test_importing_does_not_import_jax():
  code = ("import sys, alm._validation; "
          "bad = [m for m in ('jax', 'numpy', 'flax') if m in sys.modules]; "
          "assert not bad, bad")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
