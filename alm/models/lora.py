"""LoRA on the Transformer's attention and MLP projections, base weights shared.

`apply_lora(model, LoRAConfig(...), rngs=...)` replaces the chosen `Dense`
projections of `alm.models.transformer` in place by `LoRADense`, which keeps
the *same* kernel and bias Variables (no copy: parameter paths stay
`...q_proj.kernel`, so checkpoints and sharding rules of the base model still
apply) and adds `lora_a` [in, r] and `lora_b` [r, out] as `nnx.LoRAParam`:

    y = x @ W (+ b) + (alpha / r) * (x @ A) @ B        B = 0 at init

Why our own module rather than `nnx.LoRA` / `nnx.LoRALinear` (flax 0.12.8) or
qwix: `nnx.LoRA` has no alpha/r scale and nests the base under `base_module`
(paths change), `nnx.LoRALinear` re-creates its own kernel (a second copy), and
neither can switch the delta off — which is how the teacher shares the base:
the teacher *is* the same model with LoRA off (`lora_disabled(model)`), so the
base weights exist once in memory. We do reuse `nnx.LoRAParam` as the variable
type, so `nnx.LoRAParam` is the filter that selects exactly the adapters
(`nnx.DiffState(0, nnx.LoRAParam)` / `nnx.Optimizer(..., wrt=nnx.LoRAParam)`).
qwix is not a dependency here and its interception is not needed for one
layer type.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from alm.models.transformer import Dense

ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS

# The filter of trainable LoRA parameters.
lora_filter = nnx.LoRAParam


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA options.

  Attributes:
    rank: r.
    alpha: the delta is scaled by alpha / r (paper: alpha = r = 64).
    targets: names of the projections to adapt (attention and MLP by default).
  """

  rank: int = 64
  alpha: float = 64.0
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")
    bad = [t for t in self.targets if t not in ALL_TARGETS]
    if bad or not self.targets:
      raise ValueError(f"Unknown LoRA target(s) {bad or self.targets!r}; valid targets: "
                       f"{', '.join(ALL_TARGETS)}.")


class LoRADense(nnx.Module):
  """A `Dense` plus a low-rank delta that can be switched off.

  Args:
    base: the projection to adapt; its kernel/bias Variables are shared.
    rank: r.
    alpha: scale numerator (delta scaled by alpha / r).
    rngs: init streams (A is He-uniform, B is zero).
  """

  def __init__(self, base: Dense, rank: int, alpha: float, *, rngs: nnx.Rngs):
    self.kernel = base.kernel  # the same Variable: one copy in memory
    self.bias = base.bias
    self.dtype = base.dtype
    d_in, d_out = base.kernel.shape
    names = getattr(base.kernel, "out_sharding", None) or (None, None)
    pdt = base.kernel.dtype
    self.lora_a = nnx.LoRAParam(nnx.initializers.he_uniform()(rngs.params(), (d_in, rank), pdt),
                                out_sharding=(names[0], None), eager_sharding=False)
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), pdt), out_sharding=(None, names[1]),
                                eager_sharding=False)
    self.scale = float(alpha) / rank
    self.enabled = True

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.enabled:
      a = self.lora_a[...].astype(self.dtype)
      b = self.lora_b[...].astype(self.dtype)
      y = y + jnp.dot(jnp.dot(x, a), b) * jnp.asarray(self.scale, self.dtype)
    return y


def _targets(model: nnx.Module, names: tuple[str, ...]):
  """(parent module, attribute name, Dense) for every target projection."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Dense) and path and path[-1] in names:
      parent = model
      for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
      out.append((parent, path[-1], node))
  return out


def apply_lora(model: nnx.Module, cfg: LoRAConfig | None = None, *,
               rngs: nnx.Rngs) -> nnx.Module:
  """Adds LoRA adapters to `model`'s projections, in place (returns `model`).

  Args:
    model: an `alm.models.transformer.Transformer` (or any module holding
      `Dense` projections with the target names).
    cfg: rank, alpha and targets (default r = alpha = 64, attention + MLP).
    rngs: init streams for the A matrices.

  Returns:
    The same model, with `LoRADense` in place of the targets.

  Raises:
    ValueError: no target projection was found (already adapted, or not a
      `Transformer`).
  """
  cfg = cfg or LoRAConfig()
  found = _targets(model, cfg.targets)
  if not found:
    raise ValueError(f"No Dense projections named {cfg.targets} in {type(model).__name__} "
                     "(LoRA already applied?).")
  for parent, name, dense in found:
    setattr(parent, name, LoRADense(dense, cfg.rank, cfg.alpha, rngs=rngs))
  return model


def lora_modules(model: nnx.Module) -> Iterator[LoRADense]:
  """Every `LoRADense` inside `model`."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, LoRADense):
      yield node


@contextlib.contextmanager
def lora_disabled(model: nnx.Module):
  """Runs `model` without its LoRA deltas (the teacher path of shared-base training).

  The switch is a Python attribute read while tracing, so use it inside the
  jitted step around the teacher's forward:

      def step(model, batch):
        with lora_disabled(model):
          teacher_out = model(batch["teacher_ids"])   # base model
        student_out = model(...)                      # base + LoRA

  Args:
    model: a model with LoRA applied (a model without LoRA is left as is).

  Yields:
    The model.
  """
  mods = list(lora_modules(model))
  old = [m.enabled for m in mods]
  try:
    for m in mods:
      m.enabled = False
    yield model
  finally:
    for m, e in zip(mods, old):
      m.enabled = e


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every LoRA delta into its kernel and restores plain `Dense` layers, in place.

  Used at export: the result has the base model's parameter structure. Note the
  kernels are shared with any other module holding them (e.g. a teacher).

  Returns:
    The model.
  """
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, LoRADense):
      delta = node.lora_a[...] @ node.lora_b[...] * node.scale
      node.kernel.set_value((node.kernel[...] + delta).astype(node.kernel.dtype))
      parent = model
      for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
      d_in, d_out = node.kernel.shape
      dense = Dense(d_in, d_out, (None, None), bias=node.bias is not None, rngs=nnx.Rngs(0),
                    dtype=node.dtype, param_dtype=node.kernel.dtype)
      dense.kernel, dense.bias = node.kernel, node.bias  # the merged Variables themselves
      setattr(parent, path[-1], dense)
  return model
