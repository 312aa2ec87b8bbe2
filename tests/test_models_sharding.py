"""The same forward on 1-, 2- and 8-device CPU meshes gives the same logits.

JAX fixes the number of CPU devices at import, so the check runs in a
subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from alm.models.sharding import ShardingRules

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from alm.models import sharding
    from alm.testing.models import tiny_model
    from alm.models.loading import load_weights

    assert len(jax.devices()) == 8, jax.devices()
    real = sys.argv[1] == "real"
    meshes = [(1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 2, 2)]

    @nnx.jit
    def fwd(model, ids):
      return model(ids).logits

    def build(name):
      return load_weights(name) if real else tiny_model(name, 64, seed=5)

    results = {}
    names = ["smollm2-135m-instruct"] if real else ["qwen2", "gemma3"]  # all switches
    for name in names:
      ref_model = build(name)
      vocab = ref_model.cfg.vocab_size
      ids = np.random.RandomState(0).randint(0, vocab, (4, 12)).astype(np.int32)
      want = np.asarray(fwd(ref_model, jnp.asarray(ids)))
      for shape in meshes:
        mesh = sharding.make_mesh(*shape)
        model = sharding.shard_model(ref_model if real else build(name), mesh)
        emb = model.embedder.embedding[...]
        x = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
        got = np.asarray(fwd(model, x))
        results[f"{name} {shape}"] = dict(
            err=float(np.abs(got - want).max() / np.abs(want).max()),
            devices=len(emb.sharding.device_set),
            shard_shape=list(emb.sharding.shard_shape(emb.shape)))
    print("RESULT" + json.dumps(results))
""")


def run(kind: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True,
                        env=env, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def check(results: dict, vocab: int, width: int, tol: float) -> None:
  for key, r in results.items():
    print(key, r)
    assert r["err"] < tol, (key, r)
    shape = tuple(int(s) for s in key[key.index("(") + 1:-1].split(","))
    n = int(np.prod(shape))
    assert r["devices"] == n, (key, r)
    # Embedding [vocab, embed]: vocab over tensor, embed over fsdp (default rules).
    assert r["shard_shape"] == [vocab // shape[2], width // shape[1]], (key, r)


def test_tiny_models_same_logits_on_1_2_8_devices():
  check(run("tiny"), 64, 32, 1e-5)


@pytest.mark.slow
def test_smollm2_same_logits_on_1_2_8_devices():
  # Tensor parallelism reorders float32 sums over 30 layers: ~3e-5 of the logit
  # scale; the same bound as the numpy parity test.
  check(run("real"), 49152, 576, 1e-4)


def test_sharding_rules_validate():
  with pytest.raises(ValueError, match="valid mesh axes: data, fsdp, tensor"):
    ShardingRules(vocab="model")


def test_logical_to_spec_replicates_indivisible_dims_and_uses_each_axis_once():
  from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
  from alm.models.sharding import logical_to_spec
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = ShardingRules()
  assert logical_to_spec(("vocab", "embed"), (64, 32), mesh, rules) == P("tensor", "fsdp")
  assert logical_to_spec(("embed", "kv_heads"), (32, 3), mesh, rules) == P("fsdp", None)
  assert logical_to_spec(("heads", "mlp"), (8, 8), mesh, rules) == P("tensor", None)
  assert logical_to_spec(("batch", None), (8, 5), mesh, rules) == P(("data", "fsdp"), None)
  assert logical_to_spec(("norm",), (7,), mesh, rules) == P(None)
  with pytest.raises(ValueError, match="Unknown logical axis 'foo'"):
    logical_to_spec(("foo",), (4,), mesh, rules)
