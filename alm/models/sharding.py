"""Logical sharding axes and the rules that map them onto a device mesh.

Every parameter of `alm.models.transformer.Transformer` carries logical axis
names in its `out_sharding` metadata, e.g. the embedding table is
`("vocab", "embed")` and an MLP up-projection `("embed", "mlp")`. A
`ShardingRules` table maps logical names to the mesh axes `data`, `fsdp` and
`tensor`; `shard_model` places a model on a mesh with those rules, so the same
model code runs on 1 device or many without changes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by the models.
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "mlp", "norm", "head_dim")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axis (or axes, or None for replicated).

  The defaults give FSDP over the model width and tensor parallelism over heads,
  MLP width and vocabulary; batch is split over `data` and `fsdp`.
  """

  batch: MeshAxes = ("data", "fsdp")
  vocab: MeshAxes = "tensor"
  embed: MeshAxes = "fsdp"
  heads: MeshAxes = "tensor"
  kv_heads: MeshAxes = "tensor"
  mlp: MeshAxes = "tensor"
  norm: MeshAxes = None
  head_dim: MeshAxes = None

  def __post_init__(self):
    for name in LOGICAL_AXES:
      v = getattr(self, name)
      axes = (v,) if isinstance(v, str) else (v or ())
      for a in axes:
        if a not in MESH_AXES:
          raise ValueError(f"ShardingRules.{name}={v!r} names mesh axis {a!r}; valid mesh axes: "
                           f"{', '.join(MESH_AXES)} (or None).")

  def as_tuples(self) -> tuple[tuple[str, MeshAxes], ...]:
    """The rules in the `(logical, mesh)` pair form `nnx.logical_axis_rules` takes."""
    return tuple((n, getattr(self, n)) for n in LOGICAL_AXES)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a (data, fsdp, tensor) mesh with Auto axes (GSPMD propagates shardings).

  Args:
    data: data-parallel axis size.
    fsdp: fully-sharded data-parallel axis size.
    tensor: tensor-parallel axis size.
    devices: devices to use (default: the first data*fsdp*tensor of jax.devices()).

  Returns:
    The mesh.
  """
  n = data * fsdp * tensor
  devices = list(devices if devices is not None else jax.devices())
  if n > len(devices):
    raise ValueError(f"A mesh of data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices "
                     f"but only {len(devices)} are available (on CPU, set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n} before importing jax).")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices[:n])


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh: jax.sharding.Mesh, rules: ShardingRules) -> PartitionSpec:
  """Resolves logical axis names to a PartitionSpec for an array of `shape`.

  A dimension that the mapped mesh axes do not divide evenly is replicated
  rather than failing (e.g. 3 KV heads on a tensor axis of 2), and a mesh axis
  is used at most once per array.

  Args:
    names: one logical name (or None) per dimension.
    shape: the array shape.
    mesh: the mesh.
    rules: the logical -> mesh mapping.

  Returns:
    The PartitionSpec.
  """
  used: set[str] = set()
  out = []
  for name, size in zip(names, shape):
    m = getattr(rules, name) if name in LOGICAL_AXES else None
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"Unknown logical axis {name!r}; known: {', '.join(LOGICAL_AXES)}.")
    axes = (m,) if isinstance(m, str) else tuple(m or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % total:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def model_shardings(model: nnx.Module, mesh: jax.sharding.Mesh,
                    rules: ShardingRules | None = None) -> nnx.State:
  """NamedShardings for every variable of `model` (replicated when unannotated)."""
  rules = rules or ShardingRules()
  state = nnx.state(model)

  def one(v):
    names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    shape = getattr(value, "shape", ())
    spec = logical_to_spec(names, shape, mesh, rules) if names else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh,
                rules: ShardingRules | None = None) -> nnx.Module:
  """Places every parameter of `model` on `mesh` by its logical axes (in place).

  Args:
    model: an NNX module whose params carry `out_sharding` logical names.
    mesh: the device mesh (see `make_mesh`).
    rules: the logical -> mesh mapping (default `ShardingRules()`).

  Returns:
    The same model, its arrays now sharded.
  """
  state = nnx.state(model)
  # A NamedSharding in place of each Variable is a pytree prefix of the state.
  nnx.update(model, jax.device_put(state, model_shardings(model, mesh, rules)))
  return model


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int,
                   rules: ShardingRules | None = None) -> NamedSharding:
  """Sharding of a batch-major input ([B, ...]) of `ndim` dims: batch over rules.batch."""
  rules = rules or ShardingRules()
  axes = (rules.batch,) if isinstance(rules.batch, str) else tuple(rules.batch or ())
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  first = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))
