"""FVT initialisation vs a direct per-token loop on tiny tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from alm.hypernet import fvt
from alm.tokenization.bytes_tok import BytesTokenizer
from alm.testing.tokenizers import GreedyTokenizer


Greedy = GreedyTokenizer


OLD = Greedy(["th", "the", " the", "ing", "an", "é", "日"], specials=("<eos>", "<bos>",
                                                                  "<|im_start|>"), name="old")
NEW = Greedy(["the", " thing", "and", "é!", b"\xe6\x97",
              "日本"], specials=("<bos>", "<eos>", "<pad>", "<|im_start|>", "<x>"), name="new")


def loop_reference(old_emb, old, new):
  """Plain loop: copy / mean of old encoding / specials by role and string / mean of all."""
  p2i = {b: i for i, b in reversed(list(enumerate(old.token_bytes)))
         if b and i not in old.special_ids}
  out = np.zeros((new.vocab_size, old_emb.shape[1]), np.float64)
  old_str = {old.id_to_token(i): i for i in old.special_ids}
  for v in range(new.vocab_size):
    if v in new.special_ids:
      if v == new.bos_id:
        out[v] = old_emb[old.bos_id]
      elif v == new.eos_id:
        out[v] = old_emb[old.eos_id]
      elif new.id_to_token(v) in old_str:
        out[v] = old_emb[old_str[new.id_to_token(v)]]
      else:
        out[v] = old_emb.mean(0)
      continue
    b = new.token_bytes[v]
    if b in p2i:
      out[v] = old_emb[p2i[b]]
      continue
    ids = old.encode(b.decode(), add_special_tokens=False).ids if _utf8(b) else None
    if ids is None:  # greedy over bytes (the tiny tokenizer is greedy anyway)
      ids, i = [], 0
      while i < len(b):
        for n in range(len(b) - i, 0, -1):
          if b[i:i + n] in p2i:
            ids.append(p2i[b[i:i + n]])
            i += n
            break
    out[v] = old_emb[np.asarray(ids)].mean(0)
  return out


def _utf8(b):
  try:
    b.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


def test_fvt_matches_loop():
  rng = np.random.default_rng(0)
  old_in = rng.normal(size=(OLD.vocab_size, 6))
  old_out = rng.normal(size=(OLD.vocab_size, 6))
  new_in, new_out = fvt.fvt_embeddings(old_in, old_out, OLD, NEW)
  np.testing.assert_allclose(new_in, loop_reference(old_in, OLD, NEW), rtol=1e-12)
  np.testing.assert_allclose(new_out, loop_reference(old_out, OLD, NEW), rtol=1e-12)
  d = fvt.decompose(OLD, NEW)
  c = d.counts()
  assert c["special"] == 3 and c["mean_of_all"] == 2  # <pad>, <x> have no old match
  assert c["copied"] == 256 + 1  # bytes and "the"
  # A decomposition spells the new token's bytes exactly.
  v = NEW.vocab_size - 5
  assert b"".join(OLD.token_bytes[i] for i in d.flat[d.offsets[v]:d.offsets[v + 1]]) == b" thing"


def test_fvt_block_boundaries_do_not_matter():
  rng = np.random.default_rng(1)
  old_in = rng.normal(size=(OLD.vocab_size, 3)).astype(np.float32)
  d = fvt.decompose(OLD, NEW)
  a = fvt.apply_decomposition(old_in, d, block=7)
  b = fvt.apply_decomposition(old_in, d, block=100_000)
  np.testing.assert_array_equal(a, b)


def test_fvt_to_bytes_tokenizer_and_wrong_table():
  new = BytesTokenizer()
  rng = np.random.default_rng(2)
  old_in = rng.normal(size=(OLD.vocab_size, 4))
  out, _ = fvt.fvt_embeddings(old_in, None, OLD, new)
  np.testing.assert_array_equal(out[:256], old_in[3:259])  # every byte is an old token
  np.testing.assert_array_equal(out[new.token_to_id("<|im_start|>")], old_in[2])
  with pytest.raises(ValueError, match="rows but the old tokenizer"):
    fvt.fvt_embeddings(old_in[:10], None, OLD, new)


@pytest.mark.slow
def test_fvt_real_tokenizers_is_fast():
  import time  # pylint: disable=import-outside-toplevel
  import alm  # pylint: disable=import-outside-toplevel
  from alm import assets  # pylint: disable=import-outside-toplevel
  if not (assets.is_installed("qwen3") and assets.is_installed("llama3")):
    pytest.skip("qwen3/llama3 tokenizers not installed")
  old, new = alm.load_tokenizer("llama3"), alm.load_tokenizer("qwen3")
  emb = np.random.default_rng(0).normal(size=(old.vocab_size, 8)).astype(np.float32)
  t0 = time.perf_counter()
  out, _ = fvt.fvt_embeddings(emb, None, old, new)
  dt = time.perf_counter() - t0
  assert out.shape == (new.vocab_size, 8) and np.isfinite(out).all()
  c = fvt.decompose(old, new).counts()
  assert c["copied"] > 0.5 * new.vocab_size
  assert dt < 60, dt


def test_fvt_transformer_shares_the_body_and_matches_on_copied_tokens():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from alm.testing.models import tiny_model  # pylint: disable=import-outside-toplevel
  teacher = tiny_model("qwen2", vocab_size=OLD.vocab_size, seed=0)  # untied lm_head
  student = fvt.fvt_transformer(teacher, OLD, NEW)
  assert student.cfg.vocab_size == NEW.vocab_size
  assert student.layers[0].attn.q_proj.kernel is teacher.layers[0].attn.q_proj.kernel
  # Text made only of tokens both vocabularies share (bytes): identical logits
  # on the shared ids, since every new byte token copies its old embedding.
  text = b"xyz"
  t_ids = jnp.asarray([[OLD.token_bytes.index(bytes([c])) for c in text]], jnp.int32)
  s_ids = jnp.asarray([[NEW.token_bytes.index(bytes([c])) for c in text]], jnp.int32)
  fwd = nnx.jit(lambda m, i: m(i).logits)
  lt, ls = np.asarray(fwd(teacher, t_ids)), np.asarray(fwd(student, s_ids))
  np.testing.assert_allclose(ls[..., 5:5 + 256], lt[..., 3:3 + 256], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, param_dtype", [("qwen2", "float32"), ("llama", "bfloat16")])
def test_fvt_transformer_with_a_passed_decomposition_equals_its_own(family, param_dtype):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from alm.testing.models import tiny_model  # pylint: disable=import-outside-toplevel
  pdt = jnp.dtype(param_dtype)
  teacher = tiny_model(family, vocab_size=OLD.vocab_size, seed=3, param_dtype=pdt)
  own = fvt.fvt_transformer(teacher, OLD, NEW)
  d = fvt.decompose(OLD, NEW)
  # What `alm.training.students.cached_decomposition` returns: arrays read back from disk.
  d = fvt.Decomposition(offsets=d.offsets.copy(), flat=d.flat.copy(), kind=d.kind.copy())
  given = fvt.fvt_transformer(teacher, OLD, NEW, decomposition=d)
  assert given.cfg == own.cfg and given.cfg.vocab_size == NEW.vocab_size
  assert (own.lm_head is None) == (teacher.lm_head is None) == (given.lm_head is None)
  tables = [(m.embedder.embedding[...], None if m.lm_head is None else m.lm_head.kernel[...])
            for m in (own, given)]
  for a, b in zip(*tables):
    if a is None:
      continue
    assert a.dtype == b.dtype == pdt
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert given.layers is teacher.layers and given.final_norm is teacher.final_norm
  assert given.dtype == teacher.dtype and given.param_dtype == teacher.param_dtype


def test_fvt_transformer_refuses_the_wrong_tokenizer_or_decomposition():
  from alm.testing.models import tiny_model  # pylint: disable=import-outside-toplevel
  small = tiny_model("llama", vocab_size=OLD.vocab_size - 1, seed=0)
  with pytest.raises(ValueError, match=r"rows but the old tokenizer.*model's own tokenizer"):
    fvt.fvt_transformer(small, OLD, NEW)
  with pytest.raises(ValueError, match=r"rows but the old tokenizer"):
    fvt.fvt_transformer(small, OLD, NEW, decomposition=fvt.decompose(OLD, NEW))
  teacher = tiny_model("llama", vocab_size=OLD.vocab_size, seed=0)
  other = fvt.decompose(OLD, BytesTokenizer())  # for another new tokenizer
  with pytest.raises(ValueError, match="decompose\\(old, new\\)"):
    fvt.fvt_transformer(teacher, OLD, NEW, decomposition=other)
