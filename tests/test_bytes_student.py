"""Byte students: the in-model n-gram lookup, the forward, the cache, storage, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import alm
from alm.bytes.lookup import TokenTable, ngram_ids, usable_run
from alm.bytes.model import (ByteTransformer, body_of, byte_student, byte_tokenizer_for,
                             is_byte_student_dir, load_byte_student, save_byte_student)
from alm.bytes.ngram import SuffixLookup
from alm.models.generate import generate
from alm.testing.models import tiny_model
from alm.testing.tokenizers import GreedyTokenizer
from alm.tokenization.base import TokenizerError

PIECES = ["th", "the", " the", "ing", "an", " a", "er", "he", "in", " t", "ou", "en", " s",
          "ch", "es", "or", "thing", " thing", "ther", "  ", "    ", "é", "café", "東京"]


def _tok():
  return GreedyTokenizer(PIECES, name="tiny-base")


def _texts():
  rng = np.random.default_rng(0)
  return [b"the thing there: thinking and thanking in the thaw.  ",
          "naïve café — 東京 😀 ünïcödé\t\ttabs    spaces\n\n\n  x".encode(),
          bytes(rng.integers(0, 256, 300).astype(np.uint8)),
          b" " * 40 + b"\n" * 20 + b"the" * 30]


def _device_lookup(table: TokenTable, ids, breaks, segment_ids=None):
  arrays = {k: jnp.asarray(getattr(table, k)) for k in ("slots", "words", "lengths")}
  run = usable_run(jnp.asarray(breaks), None if segment_ids is None else
                   jnp.asarray(segment_ids), table.max_bytes)
  return np.asarray(ngram_ids(arrays, jnp.asarray(ids, jnp.int32), run, bits=table.bits,
                              probes=table.probes, max_bytes=table.max_bytes))


def _reference_row(ref: SuffixLookup, ids: np.ndarray, breaks: np.ndarray, seg: np.ndarray):
  """SuffixLookup run separately on every stretch of bytes between breaks / segment changes."""
  out = np.full(len(ids), -1, np.int32)
  start = 0
  for i in range(len(ids) + 1):
    end_here = i == len(ids) or breaks[i] or (i > 0 and seg[i] != seg[i - 1])
    if end_here:
      if i > start:
        out[start:i] = ref(ids[start:i].astype(np.uint8))
      start = i + 1 if i < len(ids) and breaks[i] else i
  return out


@pytest.mark.parametrize("max_bytes", [16, 5])
def test_device_lookup_equals_suffix_lookup_tiny(max_bytes):
  tok = _tok()
  table, ref = TokenTable.build(tok, max_bytes), SuffixLookup(tok, max_bytes)
  for data in _texts():
    ids = np.frombuffer(data, np.uint8).astype(np.int32)[None]
    got = _device_lookup(table, ids, np.zeros(ids.shape, bool))[0]
    np.testing.assert_array_equal(got, ref(data))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "mistral-v3"])
def test_device_lookup_equals_suffix_lookup_real(name):
  """Real vocabularies, with breaks (specials, padding) and packed segments in the rows."""
  tok = alm.load_tokenizer(name)
  table, ref = TokenTable.build(tok), SuffixLookup(tok)
  data = b"".join(_texts()) * 3
  n = 512
  rng = np.random.default_rng(1)
  rows = np.stack([np.frombuffer(data[o:o + n], np.uint8) for o in (0, 200, 500)]).astype(np.int32)
  breaks = rng.random(rows.shape) < 0.02
  seg = np.cumsum(rng.random(rows.shape) < 0.01, axis=1)
  got = _device_lookup(table, rows, breaks, seg)
  for r in range(len(rows)):
    want = _reference_row(ref, rows[r], breaks[r], seg[r])
    np.testing.assert_array_equal(np.where(breaks[r], -1, got[r]), want)


def _student(family="llama", ngram=True, copy_body=False):
  tok = _tok()
  base = tiny_model(family, vocab_size=tok.vocab_size, seed=3)
  st, bt = byte_student(base, tok, ngram=ngram, copy_body=copy_body)
  return base, tok, st, bt


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forward_equals_numpy_embedding_reference(family):
  """x_i = (E_byte[b_i] + E_sub[s_i]) * scale, s_i from SuffixLookup; specials map to base ids."""
  base, tok, st, bt = _student(family)
  data = "the thing there: café 東京  and  the".encode()
  ids = np.concatenate([[bt.bos_id], np.frombuffer(data, np.uint8)]).astype(np.int32)
  sub = np.concatenate([[tok.bos_id], SuffixLookup(tok)(data)])
  e_byte = np.asarray(st.embedder.embedding[...], np.float64)
  e_sub = np.asarray(base.embedder.embedding[...], np.float64)
  x = e_byte[ids] + np.where((sub >= 0)[:, None], e_sub[np.maximum(sub, 0)], 0.0)
  if st.cfg.embed_scale:
    x = x * np.sqrt(st.cfg.hidden_size)
  got = np.asarray(st.embed(jnp.asarray(ids)[None]))[0]
  np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
  out = st(jnp.asarray(ids)[None], hidden_layers=(0,))
  want = body_of(st)(inputs_embeds=jnp.asarray(x, jnp.float32)[None]).logits
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_without_ngram_is_the_plain_byte_model():
  base, tok, st, bt = _student(ngram=False)
  ids = jnp.asarray(np.frombuffer(b"the thing", np.uint8).astype(np.int32))[None]
  np.testing.assert_array_equal(np.asarray(st(ids).logits), np.asarray(body_of(st)(ids).logits))
  assert st.subword is None and st.max_bytes == 0


def test_shared_and_copied_body():
  base, _, shared, _ = _student()
  assert shared.layers is base.layers and shared.subword is base.embedder
  base, _, copied, _ = _student(copy_body=True)
  assert copied.layers is not base.layers
  a = jax.tree.leaves(nnx_state(copied.layers))
  b = jax.tree.leaves(nnx_state(base.layers))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  # Own buffers: the training step donates the trained arrays, the teacher keeps its own.
  assert not any(x.unsafe_buffer_pointer() == y.unsafe_buffer_pointer() for x, y in zip(a, b))
  assert copied.subword is base.embedder  # the frozen table is shared, never copied


def nnx_state(m):
  return nnx.state(m)


_JIT_FWD = nnx.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))


def _fwd(model, ids, mask=None, cache=None):
  """The model's forward under nnx.jit (eager calls compile every op per shape)."""
  ids = jnp.asarray(ids)
  return _JIT_FWD(model, ids, jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask), cache)


def test_cache_is_incremental_and_equals_the_full_forward():
  """Left-padded rows, prefill then one byte at a time = one forward over the whole text."""
  _, _, st, bt = _student("gemma3")
  texts = [b"the thing there: thinking", b"  cafe\xcc\x81 the end"]
  t = max(len(x) for x in texts)
  ids = np.full((2, t), bt.pad_id, np.int32)
  mask = np.zeros((2, t), bool)
  for r, x in enumerate(texts):
    ids[r, t - len(x):] = np.frombuffer(x, np.uint8)
    mask[r, t - len(x):] = True
  full = np.asarray(_fwd(st, ids, mask).logits)
  out = _fwd(st, ids[:, :7], mask[:, :7], st.init_cache(2, t))
  steps = [np.asarray(out.logits)]
  for i in range(7, t):  # row 1 is still padding at the first steps: its mask says so
    out = _fwd(st, ids[:, i:i + 1], mask[:, i:i + 1], out.cache)
    steps.append(np.asarray(out.logits))
  inc = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(inc[mask], full[mask], rtol=2e-4, atol=2e-4)


def test_generate_equals_greedy_reforward():
  """Greedy generation = argmax of a forward over the text so far (causal: a fixed-size
  buffer whose later slots do not change earlier logits)."""
  _, _, st, bt = _student()
  prompt = np.frombuffer(b"the thing th", np.uint8).astype(np.int32)[None]
  n = 6
  res = generate(st, prompt, max_new_tokens=n)
  p = prompt.shape[1]
  buf = np.zeros((1, p + n), np.int32)
  buf[:, :p] = prompt
  for i in range(p, p + n):
    buf[0, i] = int(np.argmax(np.asarray(_fwd(st, buf).logits)[0, i - 1]))
  np.testing.assert_array_equal(res.tokens[0], buf[0, p:])


@pytest.mark.parametrize("ngram", [True, False])
def test_save_and_load_roundtrip(tmp_path, ngram):
  _, _, st, bt = _student("gemma3", ngram=ngram)
  d = save_byte_student(st, tmp_path / "s", bt)
  assert is_byte_student_dir(d)
  model, tok = alm.load_model(d)
  assert isinstance(model, ByteTransformer) and tok.specials == bt.specials
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bt.bos_id, bt.eos_id, bt.pad_id)
  ids = jnp.asarray(np.frombuffer(b"the thing there", np.uint8).astype(np.int32))[None]
  np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(st(ids).logits))
  # Other readers see the body alone: a plain HF model of the byte vocabulary.
  body = alm.models.loading.load_hf(d)
  assert body.cfg.vocab_size == bt.vocab_size and not body.cfg.tie_embeddings


def test_missing_ngram_file_is_named(tmp_path):
  _, _, st, bt = _student()
  d = save_byte_student(st, tmp_path / "s", bt)
  (d / "alm_ngram" / "ngram.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="ngram.safetensors"):
    load_byte_student(d)


def test_byte_tokenizer_keeps_the_base_specials_and_roles():
  for name, bos, eos in [("smollm2-135m-instruct", "<|im_start|>", "<|im_end|>"),
                         ("gemma3-270m", "<bos>", "<eos>")]:
    base = alm.load_tokenizer(name)
    bt = byte_tokenizer_for(base)
    assert bt.specials[bt.bos_id - 256] == bos and bt.specials[bt.eos_id - 256] == eos
    assert not any(s.startswith("<unused") for s in bt.specials)
    assert bt.add_bos == base.add_bos


def test_base_without_every_byte_is_refused():
  tok = GreedyTokenizer(PIECES)
  tok._token_bytes[3 + ord("Q")] = b"Qx"  # pylint: disable=protected-access  (no "Q" token)
  base = tiny_model("llama", vocab_size=tok.vocab_size)
  with pytest.raises(TokenizerError, match=r"no token for 1 byte values of ordinary text \(0x51"):
    byte_student(base, tok)


def test_ids_out_of_range_are_refused():
  _, _, st, bt = _student()
  with pytest.raises(alm.models.transformer.InputError, match="out of range"):
    st(jnp.asarray([[1, 2, bt.vocab_size]]))


@pytest.mark.parametrize("train_body", [True])  # the paper's; LoRA on a shared body is
def test_byte_student_trains_exports_and_reloads(tmp_path, train_body):  # SharedBody's path
  """The engine trains a byte student with no special case: the paper's objective
  (ALM + ALM over space chunks + hidden states, GradMag); what trains is what the kind
  says (never the frozen subword table); the export reloads with identical logits."""
  import training_utils as tu  # pylint: disable=import-outside-toplevel
  from alm.bytes.student import ByteStudent  # pylint: disable=import-outside-toplevel
  from alm.training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  from alm.training.students import export_student  # pylint: disable=import-outside-toplevel
  corpus = tu.write_corpus(tmp_path)
  cfg = TrainConfig.build(method="alm", add_terms="alm_space=1,hidden=1", combine="gradmag",
                          steps=2, warmup_steps=1, batch_size=2, teacher_len=32,
                          student_len=96, lora_rank=0 if train_body else 4,
                          train_body=train_body, learning_rate=1e-2)
  trainer = tu.tiny_trainer(corpus, tmp_path / "run", cfg, kind=ByteStudent(), checkpoint_dir="")
  model = trainer.model()
  sub_before = np.asarray(model.student.transformer.subword.embedding[...]).copy()
  layer_before = np.asarray(model.teacher.transformer.layers[0].mlp.down_proj.kernel[...]).copy()
  summary = trainer.fit()
  assert np.isfinite(summary["final_student_bpb"])
  model = trainer.model()
  st = model.student.transformer
  np.testing.assert_array_equal(np.asarray(st.subword.embedding[...]), sub_before)
  # The teacher never changes (a copied body trains apart from it; LoRA is off on its path).
  np.testing.assert_array_equal(
      np.asarray(model.teacher.transformer.layers[0].mlp.down_proj.kernel[...]), layer_before)
  if train_body:
    assert not np.array_equal(np.asarray(st.layers[0].mlp.down_proj.kernel[...]), layer_before)
  from alm.bytes.model import byte_tokenizer_for  # pylint: disable=import-outside-toplevel
  bt = byte_tokenizer_for(tu.teacher_tokenizer())
  ids = jnp.asarray(np.frombuffer(b"the thing there", np.uint8).astype(np.int32))[None]
  want = np.asarray(_fwd(st, ids).logits)
  d = export_student(model, tmp_path / "export", bt)
  loaded, _ = alm.load_model(d)
  np.testing.assert_allclose(np.asarray(_fwd(loaded, ids).logits), want, rtol=1e-5, atol=1e-5)


def test_byte_row_length_is_checked_against_the_data(tmp_path):
  import training_utils as tu  # pylint: disable=import-outside-toplevel
  from alm.data.sources import open_source  # pylint: disable=import-outside-toplevel
  from alm.training.config import TrainConfig, TrainConfigError  # pylint: disable=import-outside-toplevel
  from alm.training.transfer import check_byte_row_length  # pylint: disable=import-outside-toplevel
  src = open_source(str(tu.write_corpus(tmp_path)))
  tt = tu.teacher_tokenizer()
  ratio = check_byte_row_length(src, tt, TrainConfig.build(teacher_len=32, student_len=64))
  texts = tu.TEXTS
  want = sum(len(t.encode()) for t in texts) / sum(
      len(tt.encode(t, add_special_tokens=False)) for t in texts)
  assert ratio == pytest.approx(want)
  with pytest.raises(TrainConfigError, match=r"Pass --student_len=\d+"):
    check_byte_row_length(src, tt, TrainConfig.build(teacher_len=128, student_len=32))


def test_stored_by_reference_reads_the_base_and_refuses_another(tmp_path):
  """--export_subword=reference: the table comes from the recorded base, checked by its
  vocabulary fingerprint; a missing or different base is one clear error."""
  from alm.models.loading import save_model  # pylint: disable=import-outside-toplevel
  base, tok = alm.load_model("smollm2-135m-instruct")
  base_dir = save_model(base, tmp_path / "base", tok)  # an HF directory: a path base
  base, tok = alm.load_model(base_dir)
  st, bt = byte_student(base, tok)
  d = save_byte_student(st, tmp_path / "s", bt, subword="reference")
  assert "subword_embedding" not in __import__("safetensors.numpy").numpy.load_file(
      str(d / "alm_ngram" / "ngram.safetensors"))
  ids = jnp.asarray(np.frombuffer(b"the thing there", np.uint8).astype(np.int32))[None]
  loaded, _ = alm.load_model(d)
  np.testing.assert_array_equal(np.asarray(_fwd(loaded, ids).logits),
                                np.asarray(_fwd(st, ids).logits))
  with pytest.raises(ValueError, match="another base model"):
    load_byte_student(d, base="gemma3-270m")
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(base_dir)
  with pytest.raises(FileNotFoundError, match="by reference to the base model"):
    load_byte_student(d)


def test_empty_prompt_is_a_clear_error():
  _, _, st, _ = _student()
  with pytest.raises(alm.models.transformer.InputError, match="prompts are empty"):
    generate(st, np.zeros((1, 0), np.int32), max_new_tokens=2)
