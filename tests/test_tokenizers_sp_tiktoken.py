"""SentencePiece (.model) and Tekken (tiktoken ranks) wrappers against their libraries."""

import numpy as np
import pytest

from alm import assets
from alm.tokenization.base import TokenizerError
from alm.tokenization.loading import load_tokenizer

TEXTS = ["Hello  world\n\tx 🙂 中文", " leading space", "\nnewline first", "ends with space ",
         "code:\n    return x  # ok\r\n", "é" * 5 + "\u0301"]

pytestmark = pytest.mark.skipif(not assets.is_installed("mistral-v3"),
                                reason="mistral-common not installed (make setup)")


def _check_spans(tok, enc, text):
  data = text.encode()
  assert enc.text == data
  spelled = b"".join(tok.token_bytes[i] for i in enc.ids)
  assert spelled == (tok.dummy_prefix + data if data else b"")
  ns = ~enc.special
  if ns.any():
    np.testing.assert_array_equal(enc.starts[ns][1:], enc.ends[ns][:-1])
    assert enc.starts[ns][0] == 0 and enc.ends[ns][-1] == len(data)
  first = True
  for i, s, e, sp in zip(enc.ids, enc.starts, enc.ends, enc.special):
    if sp:
      continue
    tb = tok.token_bytes[i]
    # Only the first token may differ from its span: by the dummy-prefix space.
    assert tb == data[s:e] or (first and tb == tok.dummy_prefix + data[s:e])
    first = False


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_sentencepiece(name, tmp_path):
  tok = load_tokenizer(name)
  sp = tok.sp
  assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.dummy_prefix) == (1, 2, True, b" ")
  assert tok.token_bytes[sp.piece_to_id("<0x0A>")] == b"\n"
  for text in TEXTS:
    enc = tok.encode(text)
    assert enc.ids.tolist() == [1] + sp.encode(text)
    _check_spans(tok, enc, text)
    assert tok.decode(enc.ids) == text == sp.decode(sp.encode(text))
  tok.save_pretrained(tmp_path)
  again = load_tokenizer(tmp_path)
  assert again.token_bytes == tok.token_bytes and again.add_bos
  batch = tok.encode_batch(TEXTS + [""])
  for t, b in zip(TEXTS + [""], batch):
    np.testing.assert_array_equal(b.ids, tok.encode(t).ids)


def _ref_tekken(path, text):
  """Independent reference: tiktoken's algorithm in plain Python (regex split, then
  repeatedly merge the adjacent pair whose concatenation has the lowest rank);
  ids are rank + 1000 (the special ids come first)."""
  import base64, json, regex  # pylint: disable=import-outside-toplevel,multiple-imports
  data = json.loads(path.read_text())
  n_special = data["config"]["default_num_special_tokens"]
  n_inner = data["config"]["default_vocab_size"] - n_special
  ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in data["vocab"][:n_inner]}
  ids = []
  for piece in regex.findall(data["config"]["pattern"], text):
    parts = [bytes([b]) for b in piece.encode()]
    while len(parts) > 1:
      cands = [(ranks.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1)]
      r, i = min(cands)
      if r == 1 << 30:
        break
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    ids.extend(ranks[p] + n_special for p in parts)
  return ids


def test_tekken_matches_reference(tmp_path):
  path = assets.locate("mistral-tekken")
  tok = load_tokenizer("mistral-tekken")
  assert tok.vocab_size == 131072 and (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.special_ids == frozenset(range(1000))
  assert tok.token_to_id("[INST]") == 3
  for text in TEXTS + ["[INST] stays text </s>"]:
    enc = tok.encode(text)
    assert enc.ids.tolist() == [1] + _ref_tekken(path, text)
    _check_spans(tok, enc, text)
    assert tok.decode(enc.ids) == text
  tok.save_pretrained(tmp_path)
  again = load_tokenizer(tmp_path)
  assert again.token_bytes == tok.token_bytes


def test_not_a_sentencepiece_model(tmp_path):
  p = tmp_path / "bad.model"
  p.write_bytes(b"\x00garbage")
  with pytest.raises(TokenizerError, match="SentencePiece"):
    load_tokenizer(p)
