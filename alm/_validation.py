"""Small option checks shared by the config classes (standard library only).

Importing this module must stay cheap: it is used by configs that are built
before JAX is imported (command-line parsing, data pipeline workers), so it
imports nothing beyond the standard library.
"""

from __future__ import annotations

import typing
from typing import Any, Iterable


def choices(valid: Any) -> tuple[Any, ...]:
  """The allowed values of `valid`: a `typing.Literal[...]` type or an iterable.

  Args:
    valid: a `Literal` type (its arguments are the choices), or an iterable of
      choices (tuple, list, dict keys...), kept in order.

  Returns:
    The choices as a tuple.

  Raises:
    TypeError: `valid` is neither a `Literal` type nor an iterable (a plain
      string is refused too: it would be read as its characters).
  """
  if typing.get_origin(valid) is typing.Literal:
    return typing.get_args(valid)
  if isinstance(valid, (str, bytes)) or not isinstance(valid, Iterable):
    raise TypeError(f"valid choices must be a typing.Literal type or a tuple of values, got "
                    f"{valid!r}; pass e.g. ('a', 'b') or Literal['a', 'b'].")
  return tuple(valid)


def check_choice(name: str, value: Any, valid: Any, *,
                 error: type[Exception] = ValueError) -> None:
  """Raises `error` unless `value` is one of `valid`.

  The message names the option, the bad value and every allowed value:
  `"mode='packed' is not valid; choose one of: pad, pack."`.

  Args:
    name: the option's name, as the user writes it (e.g. "mode", "family").
    value: the value given.
    valid: the allowed values: a tuple of strings (or any iterable), or a
      `typing.Literal[...]` type.
    error: the exception class to raise (a config's own error type, e.g.
      `alm.models.ConfigError`); it is called with the message.

  Raises:
    error: `value` is not one of the choices.
    TypeError: `valid` is not a `Literal` type or an iterable of choices.
  """
  allowed = choices(valid)
  if value not in allowed:
    raise error(f"{name}={value!r} is not valid; choose one of: "
                f"{', '.join(map(str, allowed))}.")
