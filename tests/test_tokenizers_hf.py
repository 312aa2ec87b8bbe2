"""HF tokenizer.json and byte tokenizer: exact spans, specials, lossy rejection."""

import json

import numpy as np
import pytest

from alm import assets
from alm.tokenization.base import TokenizerError
from alm.tokenization.loading import load_tokenizer
from alm.tokenization.vocab import WHITESPACE_BYTES, gpt2_bytes_to_unicode

HF_NAMES = ["qwen3", "llama3", "deepseek-v4"]
TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\n\nnewlines   ",
    "Ünïcödé: 中文字符, emoji 🙂👍🏽, combining e\u0301 is NFC-normalized below",
    "def f(x):\n        return x  # comment\r\n",
    "literal <|im_end|> and <|begin_of_text|> stay text",
    "12345678 3.14159",
    "a",
]


def _installed(name):
  return pytest.param(name, marks=pytest.mark.skipif(
      not assets.is_installed(name), reason=f"asset {name} not installed (make setup)"))


@pytest.fixture(scope="module", params=[_installed(n) for n in HF_NAMES] + ["bytes"])
def tok(request):
  return load_tokenizer(request.param)


def _check_exact(tok, enc, text_bytes):
  assert enc.ids.dtype == np.int32 and enc.starts.dtype == np.int32
  assert enc.text == text_bytes
  tb = tok.token_bytes
  nonspecial = ~enc.special
  # Spans tile the text: each non-special token starts where the previous ended.
  starts, ends = enc.starts[nonspecial], enc.ends[nonspecial]
  if len(starts):
    assert starts[0] == 0 and ends[-1] == len(text_bytes)
    np.testing.assert_array_equal(starts[1:], ends[:-1])
  for i, s, e, sp in zip(enc.ids, enc.starts, enc.ends, enc.special):
    if sp:
      assert s == e and tb[i] == b""
    else:
      assert tb[i] == text_bytes[s:e]


def test_spans_exact(tok):
  for text in TEXTS:
    text = tok.normalize(text)
    enc = tok.encode(text)
    _check_exact(tok, enc, text.encode())
    assert tok.decode(enc.ids) == text


def test_matches_library_ids_and_offsets(tok):
  """Independent reference: the Rust library's own ids and (character) offsets."""
  if tok.name == "bytes":
    pytest.skip("no library reference for the byte tokenizer")
  hf = tok.hf_tokenizer
  for text in TEXTS[:4]:
    text = tok.normalize(text)
    enc = tok.encode(text, add_special_tokens=False)
    ref = hf.encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(enc.ids, ref.ids)
    # Character offsets -> byte offsets; compare tokens that end on a character boundary.
    char_to_byte = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])])
    for (cs, ce), e in zip(ref.offsets, enc.ends):
      if ce < len(char_to_byte) and char_to_byte[ce] == e:
        continue
      # A token ending inside a multi-byte character: HF rounds to the character.
      assert char_to_byte[ce - 1] < e <= char_to_byte[ce]


def test_bos_and_empty(tok):
  enc = tok.encode("", add_special_tokens=True)
  if tok.add_bos:
    assert enc.ids.tolist() == [tok.bos_id] and enc.special.tolist() == [True]
  else:
    assert len(enc) == 0
  assert len(tok.encode("", add_special_tokens=False)) == 0
  enc = tok.encode("x y", add_special_tokens=False)
  assert tok.bos_id not in enc.ids.tolist()


def test_special_ids_have_no_bytes(tok):
  tb = tok.token_bytes
  assert all(tb[i] == b"" for i in tok.special_ids)
  assert tok.eos_id in tok.special_ids
  if tok.bos_id is not None:
    assert tok.bos_id in tok.special_ids
  assert len(tb) == tok.vocab_size


def test_boundary_bytes_brute_force(tok):
  """Brute force: a whitespace byte is a boundary unless (more than 0.1% as many as
  the tokens starting with it) tokens hold it after a non-whitespace character."""
  ref = set()
  for c in b" \t\n\r":
    inside = starting = 0
    for i, t in enumerate(tok.token_bytes):
      if i in tok.special_ids or not t:
        continue
      starting += t[0] == c
      s = t.decode("utf-8", errors="surrogateescape")
      k = next((j for j, ch in enumerate(s) if not ch.isspace()), len(s))
      inside += c in s[k + 1:].encode("utf-8", errors="surrogateescape")
    if inside <= 1e-3 * starting:
      ref.add(c)
  assert tok.boundary_bytes == ref
  assert 32 in tok.boundary_bytes  # every real tokenizer starts words with a space
  mask = tok.boundary_token_mask()
  ref = np.array([bool(t) and t[0] in tok.boundary_bytes for t in tok.token_bytes])
  ref[tok.eos_id] = True
  np.testing.assert_array_equal(mask, ref)


def test_invalid_utf8(tok):
  with pytest.raises(TokenizerError, match="not valid UTF-8"):
    tok.encode(b"ok \xff\xfe")
  with pytest.raises(TokenizerError, match="surrogate"):
    tok.encode("a\ud800b")


def test_batch_equals_single(tok):
  texts = [tok.normalize(t) for t in TEXTS] + [""]
  for a, b in zip(tok.encode_batch(texts), [tok.encode(t) for t in texts]):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.starts, b.starts)
    np.testing.assert_array_equal(a.ends, b.ends)


def test_save_pretrained_roundtrip(tok, tmp_path):
  tok.save_pretrained(tmp_path)
  again = load_tokenizer(tmp_path)
  assert again.vocab_size == tok.vocab_size
  assert (again.bos_id, again.eos_id, again.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
  assert again.token_bytes == tok.token_bytes
  for text in TEXTS:
    text = tok.normalize(text)
    np.testing.assert_array_equal(again.encode(text).ids, tok.encode(text).ids)


def test_gpt2_table_is_a_bijection():
  t = gpt2_bytes_to_unicode()
  assert sorted(t) == list(range(256)) and len(set(t.values())) == 256


@pytest.mark.skipif(not assets.is_installed("qwen3"), reason="qwen3 not installed")
def test_nfc_text_rejected_with_fix():
  tok = load_tokenizer("qwen3")
  with pytest.raises(TokenizerError, match="NFC"):
    tok.encode("cafe\u0301")
  _check_exact(tok, tok.encode(tok.normalize("cafe\u0301")), "caf\u00e9".encode())


@pytest.mark.skipif(not assets.is_installed("bert"), reason="bert not installed")
def test_lossy_bert_rejected():
  with pytest.raises(TokenizerError, match="WordPiece|lossy"):
    load_tokenizer("bert")


def test_lossy_normalizer_rejected(tmp_path):
  cfg = load_tokenizer("bytes").hf_json()
  cfg["normalizer"] = {"type": "Lowercase"}
  p = tmp_path / "tokenizer.json"
  p.write_text(json.dumps(cfg))
  with pytest.raises(TokenizerError, match="lowercasing"):
    load_tokenizer(p)


def test_unknown_spec():
  with pytest.raises(FileNotFoundError, match="asset name"):
    load_tokenizer("no-such-tokenizer")


def test_bytes_tokenizer_layout():
  tok = load_tokenizer("bytes")
  assert tok.vocab_size == 261 and tok.token_bytes[65] == b"A"
  enc = tok.encode("é")
  assert enc.ids.tolist() == [tok.bos_id, 0xC3, 0xA9]
  assert sorted(tok.boundary_bytes) == sorted(b" \t\n\r")
  assert set(tok.boundary_bytes) <= WHITESPACE_BYTES
