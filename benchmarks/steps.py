"""Helpers shared by the step benchmarks (no flags here: each benchmark defines its own)."""

from __future__ import annotations

from flax import nnx


def step_memory(compiled) -> dict[str, int]:
  """A compiled step's peak device memory from XLA's buffer assignment.

  `memory_analysis()`: arguments + outputs + temporaries - donated aliases, i.e.
  deterministic and separable per configuration (process RSS is neither on CPU).
  """
  m = compiled.memory_analysis()
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes")
  out = {k: int(getattr(m, k)) for k in keys}
  out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def keep_layers(model, n: int):
  """Keeps only the first `n` blocks of `model` (0: all), in place; returns it."""
  if n:
    model.layers = nnx.List(list(model.layers)[:n])
    model.cfg = model.cfg.replace(num_layers=n, **(
        {"layer_types": model.cfg.layer_types[:n]} if model.cfg.layer_types else {}))
  return model
