"""LoRA: identity at init, only adapters train, teacher path = base model, one copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.models import lora
from alm.testing.models import tiny_model

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)


@nnx.jit
def fwd(model, ids):
  return model(ids).logits


@pytest.fixture(scope="module")
def base_logits():
  return np.asarray(fwd(tiny_model("qwen2", vocab_size=64, seed=0), IDS))


def _lora_model(rank=4, alpha=8.0, **kw):
  m = tiny_model("qwen2", vocab_size=64, seed=0)
  return lora.apply_lora(m, lora.LoRAConfig(rank=rank, alpha=alpha, **kw), rngs=nnx.Rngs(1))


def test_init_is_identity_and_kernels_shared(base_logits):
  m = tiny_model("qwen2", vocab_size=64, seed=0)
  kernel = m.layers[0].attn.q_proj.kernel
  lora.apply_lora(m, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  assert m.layers[0].attn.q_proj.kernel is kernel  # the same Variable, not a copy
  assert len(list(lora.lora_modules(m))) == 7 * 2
  np.testing.assert_array_equal(np.asarray(fwd(m, IDS)), base_logits)
  # Parameter paths of the base stay where they were (checkpoints/sharding rules).
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert "layers.0.attn.q_proj.kernel" in paths and "layers.0.attn.q_proj.bias" in paths
  assert "layers.1.mlp.down_proj.lora_b" in paths


def test_only_lora_params_get_gradients_and_teacher_path_is_base(base_logits):
  m = _lora_model()
  # Make the delta non-zero so that the LoRA path differs from the base.
  for mod in lora.lora_modules(m):
    mod.lora_b.set_value(jnp.full(mod.lora_b.shape, 0.01))
  assert not np.allclose(np.asarray(fwd(m, IDS)), base_logits)

  @nnx.jit
  def both(model, ids):
    with lora.lora_disabled(model):
      teacher = model(ids).logits
    return teacher, model(ids).logits

  teacher, student = both(m, IDS)
  # jit vs eager: float32 fusion noise only (the LoRA delta itself is ~1e-1 here).
  np.testing.assert_allclose(np.asarray(teacher), base_logits, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(student), base_logits)
  assert all(mod.enabled for mod in lora.lora_modules(m))  # switch restored

  def loss(model):
    return jnp.mean(model(IDS).logits ** 2)

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.lora_filter)))(m)
  flat = nnx.to_flat_state(grads)
  assert flat and all(p[-1] in ("lora_a", "lora_b") for p, _ in flat)
  assert any(float(jnp.abs(v[...]).max()) > 0 for _, v in flat)
  # Reference: full gradient restricted to the LoRA entries agrees.
  full = nnx.to_flat_state(nnx.jit(nnx.grad(loss))(m))
  full = {p: v for p, v in full}
  for p, v in flat:
    np.testing.assert_allclose(np.asarray(v[...]), np.asarray(full[p][...]), rtol=1e-5,
                               atol=1e-7)


def test_delta_formula_and_merge():
  m = _lora_model(rank=2, alpha=6.0, targets=("q_proj",))
  q = m.layers[0].attn.q_proj
  rng = np.random.default_rng(3)
  q.lora_b.set_value(jnp.asarray(rng.normal(size=q.lora_b.shape), jnp.float32))
  x = jnp.asarray(rng.normal(size=(5, q.kernel.shape[0])), jnp.float32)
  ref = (np.asarray(x, np.float64) @ np.asarray(q.kernel[...], np.float64)
         + np.asarray(q.bias[...], np.float64)
         + 3.0 * np.asarray(x, np.float64) @ np.asarray(q.lora_a[...], np.float64)
         @ np.asarray(q.lora_b[...], np.float64))
  np.testing.assert_allclose(np.asarray(q(x)), ref, rtol=1e-4, atol=1e-5)
  before = np.asarray(fwd(m, IDS))
  lora.merge_lora(m)
  assert not list(lora.lora_modules(m))
  np.testing.assert_allclose(np.asarray(fwd(m, IDS)), before, rtol=1e-4, atol=1e-5)


def test_bad_config():
  with pytest.raises(ValueError, match="valid targets: q_proj"):
    lora.LoRAConfig(targets=("qproj",))
  m = _lora_model()
  with pytest.raises(ValueError, match="already applied"):
    lora.apply_lora(m, lora.LoRAConfig(), rngs=nnx.Rngs(0))
