"""Tiny random models of every family: parity with the numpy reference, masks, cache, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm.models import loading
from alm.models.config import ModelConfig
from alm.models.generate import SamplingConfig, generate, sample_logits
from alm.models.transformer import InputError, abstract_transformer
from alm.testing.models import TINY_FAMILIES, tiny_model
import models_reference as ref

V = 64


def arch_of(cfg: ModelConfig) -> ref.Arch:
  """Reference architecture facts of a tiny config."""
  sliding = [t == "sliding" for t in cfg.layer_types]
  rs = cfg.rope_scaling
  return ref.Arch(
      n_layers=cfg.num_layers, d=cfg.hidden_size, n_heads=cfg.num_heads, n_kv=cfg.num_kv_heads,
      head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, act=cfg.activation, rope_style="half",
      rope_base=[cfg.rope_local_theta if s and cfg.rope_local_theta else cfg.rope_theta
                 for s in sliding],
      window=[cfg.sliding_window if s else None for s in sliding], tied=cfg.tie_embeddings,
      sandwich=cfg.sandwich_norm, qk_norm=cfg.qk_norm, embed_scale=cfg.embed_scale,
      qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
      query_scale=(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
      attn_softcap=cfg.attn_logit_softcap, final_softcap=cfg.final_logit_softcap,
      llama3_scaling=(None if rs is None else (rs.factor, rs.low_freq_factor,
                                                rs.high_freq_factor,
                                                rs.original_max_position_embeddings)))


def getter(model):
  """Reference weight access ([out, in], full norm multipliers) on an alm model's params."""
  off = model.cfg.norm_offset
  a = lambda v: np.asarray(v[...], np.float64)

  def get(key, layer):
    if layer is None:
      return {"embed": lambda: a(model.embedder.embedding),
              "final_norm": lambda: off + a(model.final_norm.scale),
              "lm_head": lambda: a(model.lm_head.kernel).T}[key]()
    blk = model.layers[layer]
    proj = {"q": blk.attn.q_proj, "k": blk.attn.k_proj, "v": blk.attn.v_proj, "o": blk.attn.o_proj,
            "gate": blk.mlp.gate_proj, "up": blk.mlp.up_proj, "down": blk.mlp.down_proj}
    if key in proj:
      return a(proj[key].kernel).T
    if key.endswith("_bias"):
      return a(proj[key[0]].bias)
    norms = {"attn_norm": blk.attn_norm, "mlp_norm": blk.mlp_norm,
             "post_attn_norm": blk.post_attn_norm, "post_mlp_norm": blk.post_mlp_norm,
             "q_norm": blk.attn.q_norm, "k_norm": blk.attn.k_norm}
    return off + a(norms[key].scale)

  return get


@nnx.jit(static_argnames=("hidden_layers",))
def fwd(model, ids, positions=None, segment_ids=None, attention_mask=None, hidden_layers=()):
  return model(ids, positions=positions, segment_ids=segment_ids, attention_mask=attention_mask,
               hidden_layers=hidden_layers)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_parity_with_numpy_reference(family):
  model = tiny_model(family, V, seed=3)
  ids = np.random.RandomState(0).randint(0, V, (1, 13))  # longer than the window of 4
  out = fwd(model, jnp.asarray(ids), hidden_layers=(0, 1, -1))
  want, states = ref.forward(arch_of(model.cfg), getter(model), ids[0], hidden=True)
  assert rel_err(out.logits[0], want) < 1e-5
  assert rel_err(out.hidden_states[0][0], states[0]) < 1e-6
  assert rel_err(out.hidden_states[1][0], states[1]) < 1e-5
  assert rel_err(out.hidden_states[model.cfg.num_layers][0], states[-1]) < 1e-5
  # The hidden state of the last block gives the logits through unembed.
  np.testing.assert_allclose(model.unembed(out.hidden_states[model.cfg.num_layers]), out.logits,
                             atol=1e-5)


def test_reference_is_sensitive_to_each_switch():
  # Guard against a reference that agrees vacuously: flipping one switch changes logits.
  model = tiny_model("gemma3", V, seed=3)
  ids = np.random.RandomState(0).randint(0, V, 13)
  base = ref.forward(arch_of(model.cfg), getter(model), ids)
  for change in (dict(window=[None] * 6), dict(rope_base=[1e4] * 6), dict(embed_scale=False),
                 dict(query_scale=0.5), dict(act="silu")):
    a = arch_of(model.cfg)
    for k, v in change.items():
      setattr(a, k, v)
    assert rel_err(ref.forward(a, getter(model), ids), base) > 1e-3, change


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv_cache_matches_full_forward(family):
  model = tiny_model(family, V, seed=1)
  ids = jnp.asarray(np.random.RandomState(1).randint(0, V, (2, 11)))
  full = fwd(model, ids).logits
  step = nnx.jit(lambda m, x, c: m(x, cache=c))
  cache = model.init_cache(2, 16)
  pieces = []
  for lo, hi in ((0, 5), (5, 6), (6, 11)):  # 2 shapes: 2 compilations
    out = step(model, ids[:, lo:hi], cache)
    cache = out.cache
    pieces.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5)
  assert int(cache.index) == 11


def test_greedy_generation_equals_recomputation():
  model = tiny_model("qwen3", V, seed=2)
  prompt = np.random.RandomState(2).randint(0, V, (1, 6))
  got = generate(model, prompt, max_new_tokens=7).tokens[0]
  seq = list(prompt[0])
  for _ in range(7):
    logits = fwd(model, jnp.asarray([seq])).logits
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert got.tolist() == seq[6:]


def test_batched_left_padded_generation_matches_single():
  model = tiny_model("gemma3", V, seed=2)
  rs = np.random.RandomState(3)
  a, b = rs.randint(1, V, 7), rs.randint(1, V, 4)
  ids = np.stack([a, np.concatenate([[0, 0, 0], b])])
  mask = np.stack([np.ones(7, bool), np.arange(7) >= 3])
  both = generate(model, ids, attention_mask=mask, max_new_tokens=3).tokens
  assert both[0].tolist() == generate(model, a[None], max_new_tokens=3).tokens[0].tolist()
  assert both[1].tolist() == generate(model, b[None], max_new_tokens=3).tokens[0].tolist()


def test_sampling_options():
  model = tiny_model("llama", V, seed=2)
  prompt = np.random.RandomState(4).randint(0, V, (2, 5))
  greedy = generate(model, prompt, max_new_tokens=6).tokens
  top1 = generate(model, prompt, max_new_tokens=6, sampling=SamplingConfig(1.0, top_k=1)).tokens
  np.testing.assert_array_equal(top1, greedy)
  nucleus = SamplingConfig(1.0, top_p=0.5)
  s1 = generate(model, prompt, max_new_tokens=6, sampling=nucleus, seed=7).tokens
  s2 = generate(model, prompt, max_new_tokens=6, sampling=nucleus, seed=7).tokens
  np.testing.assert_array_equal(s1, s2)
  others = [generate(model, prompt, max_new_tokens=6, sampling=nucleus, seed=k).tokens
            for k in range(8, 12)]
  assert any((s1 != o).any() for o in others)
  eos = int(greedy[0, 2])
  r = generate(model, prompt, max_new_tokens=6, eos_id=eos, pad_id=63)
  assert r.lengths[0] == 3 and (r.tokens[0, 3:] == 63).all()
  np.testing.assert_array_equal(r.tokens[0, :3], greedy[0, :3])
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(-1.0)


def test_top_k_top_p_filtering_against_brute_force():
  logits = jnp.asarray(np.random.RandomState(0).normal(size=(3, 10)) * 2)
  keys = jax.random.split(jax.random.key(0), 400)
  for cfg in (SamplingConfig(1.0, top_k=3), SamplingConfig(1.0, top_p=0.6)):
    draws = np.stack([np.asarray(sample_logits(logits, k, cfg)) for k in keys[:60]])
    for row in range(3):
      lg = np.asarray(logits[row], np.float64)
      order = np.argsort(-lg)
      if cfg.top_k:
        allowed = set(order[:cfg.top_k])
      else:
        p = np.exp(lg - lg.max())
        p /= p.sum()
        cum, allowed = 0.0, set()
        for i in order:
          if cum >= cfg.top_p:
            break
          allowed.add(i)
          cum += p[i]
      assert set(draws[:, row].tolist()) <= allowed
      if len(allowed) > 1:
        assert len(set(draws[:, row].tolist())) > 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padding_does_not_change_real_logits(family):
  model = tiny_model(family, V, seed=4)
  x = np.random.RandomState(5).randint(1, V, 8)
  alone = fwd(model, jnp.asarray(x[None])).logits[0]
  left = np.concatenate([[0, 0, 0], x])
  right = np.concatenate([x, [0, 0, 0]])
  ids = jnp.asarray(np.stack([left, right]))
  mask = jnp.asarray(np.stack([np.arange(11) >= 3, np.arange(11) < 8]))
  out = fwd(model, ids, attention_mask=mask).logits
  np.testing.assert_allclose(out[0, 3:], alone, atol=2e-5)
  np.testing.assert_allclose(out[1, :8], alone, atol=2e-5)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_packed_segments_match_separate_documents(family):
  model = tiny_model(family, V, seed=6)
  rs = np.random.RandomState(6)
  a, b = rs.randint(0, V, 5), rs.randint(0, V, 7)
  seg = jnp.asarray(np.concatenate([np.zeros(5, int), np.ones(7, int)])[None])
  packed = fwd(model, jnp.asarray(np.concatenate([a, b])[None]), segment_ids=seg).logits[0]
  np.testing.assert_allclose(packed[:5], fwd(model, jnp.asarray(a[None])).logits[0], atol=2e-5)
  np.testing.assert_allclose(packed[5:], fwd(model, jnp.asarray(b[None])).logits[0], atol=2e-5)


def test_inputs_embeds_equals_ids():
  model = tiny_model("gemma3", V, seed=7)
  ids = jnp.asarray(np.random.RandomState(7).randint(0, V, (2, 6)))
  by_ids = model(ids).logits
  by_embeds = model(inputs_embeds=model.embed(ids)).logits
  np.testing.assert_allclose(by_embeds, by_ids, atol=1e-6)


def test_bf16_compute_is_close_to_f32():
  model = tiny_model("gemma3", V, seed=8)
  bf16 = abstract_transformer(model.cfg, dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(model))
  ids = jnp.asarray(np.random.RandomState(8).randint(0, V, (2, 9)))
  f32 = fwd(model, ids).logits
  low = fwd(bf16, ids).logits
  assert low.dtype == jnp.bfloat16
  assert rel_err(low, f32) < 5e-2
  # bf16 parameters as well.
  both = abstract_transformer(model.cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  nnx.update(both, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model)))
  assert both.embedder.embedding[...].dtype == jnp.bfloat16
  assert rel_err(fwd(both, ids).logits, f32) < 5e-2


def test_every_param_has_logical_axes():
  model = tiny_model("gemma3", V)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      names = var.get_metadata()["out_sharding"]
      assert len(names) == var[...].ndim, path
  assert model.embedder.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
  assert model.layers[0].mlp.up_proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_and_load_hf_directory(family, tmp_path):
  model = tiny_model(family, V, seed=9)
  loading.save_model(model, tmp_path)
  again = loading.load_hf(tmp_path)
  assert again.cfg == model.cfg
  ids = jnp.asarray(np.random.RandomState(9).randint(0, V, (1, 7)))
  np.testing.assert_array_equal(fwd(again, ids).logits, fwd(model, ids).logits)


def test_bad_inputs_give_clear_errors():
  model = tiny_model("llama", V)
  with pytest.raises(InputError, match=r"out of range.*64 ids"):
    model(jnp.asarray([[1, 2, 64]]))
  with pytest.raises(InputError, match="out of range"):
    model(np.array([[-1, 2]]))
  with pytest.raises(InputError, match="integer"):
    model(jnp.ones((1, 3)))
  with pytest.raises(InputError, match=r"\[batch, length\]"):
    model(jnp.asarray([1, 2, 3]))
  with pytest.raises(InputError, match="exactly one"):
    model()
  with pytest.raises(InputError, match="hidden layer 5"):
    model(jnp.asarray([[1]]), hidden_layers=(5,))
  with pytest.raises(InputError, match="overflows"):
    model(jnp.asarray([[1, 2, 3]]), cache=model.init_cache(1, 2))
  with pytest.raises(InputError, match="segment_ids"):
    model(jnp.asarray([[1]]), segment_ids=jnp.asarray([[0]]), cache=model.init_cache(1, 2))
  with pytest.raises(InputError, match="out of range"):
    generate(model, [[1, 99]], max_new_tokens=2)
  with pytest.raises(InputError, match="left-pad"):
    generate(model, [[1, 2]], attention_mask=[[1, 0]], max_new_tokens=2)


def test_bits_per_byte_against_manual_computation():
  import alm
  from alm.eval.bpb import bits_per_byte
  tok = alm.load_tokenizer("bytes")
  model = tiny_model("llama", tok.vocab_size, seed=10)
  text = "héllo wörld"
  enc = tok.encode(text)
  logits = np.asarray(fwd(model, jnp.asarray(enc.ids[None])).logits[0], np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll_bits = -sum(logits[t - 1, enc.ids[t]] - lse[t - 1] for t in range(1, len(enc))) / np.log(2)
  assert enc.special[0] and not enc.special[1:].any()
  want = nll_bits / len(text.encode())
  got = bits_per_byte(model, tok, [text])
  assert (got.bytes, got.tokens) == (len(text.encode()), len(enc) - 1)
  assert abs(got.bpb - want) < 1e-4 * want
