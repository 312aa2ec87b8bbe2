"""GGUF tokenizers rebuilt as `tokenizers` objects equal llama.cpp id for id.

References:
- An independent pure-Python implementation of llama.cpp's two algorithms,
  written here from llama.cpp's description (llama-vocab.cpp). It reads the raw
  GGUF metadata with our fast reader, which is itself checked against the
  `gguf` package below (`gguf.GGUFReader` takes ~40 s on Gemma's 262k pieces):
  * "gpt2" (SmolLM2): the pre-tokenizer regexes applied in sequence
    (digits one by one, then the GPT-2 regex), then a plain BPE merge loop by
    rank on the GPT-2 byte-table characters of each pretoken.
  * "llama" (Gemma 3, SentencePiece): user-defined pieces cut out of the text
    first (longest pieces first, as llama.cpp's special-token partition does),
    spaces -> "▁", then the resegmentation that repeatedly merges the adjacent
    pair whose concatenation is a piece of highest score (ties: leftmost),
    then `<0xNN>` byte fallback for symbols that are not pieces.
- llama.cpp itself through `llama-cpp-python` (`Llama(..., vocab_only=True)`),
  when that package is installed (it builds llama.cpp from source, so it is
  not a dependency); skipped otherwise.

Text: a few thousand real lines of Python standard-library sources
(code with indentation runs, docstrings, comments) plus some non-ASCII lines.
"""

import heapq
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from alm import assets
from alm.tokenization.gguf import read_gguf_metadata
from alm.tokenization.loading import load_tokenizer

regex = pytest.importorskip("regex")
gguf = pytest.importorskip("gguf")

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]
_STDLIB_FILES = ["argparse.py", "textwrap.py", "json/decoder.py", "difflib.py",
                 "email/_header_value_parser.py", "pydoc.py", "tokenize.py"]
_EXTRA = [
    "Ünïcödé naïve café — “quotes” and ‘single’ …",
    "中文字符和日本語のテキスト、한국어 텍스트.",
    "emoji 🙂👍🏽 flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "tabs\t\tand   spaces    mixed \t \n\n\n\nblank lines",
    "numbers 1234567890 3.14159e-10 0xDEADBEEF",
    "    deeply\n            indented\n\t\t\ttabbed",
    "<h1>html</h1> <div class=\"x\">  </div>",
]


def real_chunks(n_lines: int = 3000, lines_per_chunk: int = 4) -> list[str]:
  """Consecutive stdlib lines, grouped so that newlines and indentation occur inside texts."""
  lib = Path(sysconfig.get_paths()["stdlib"])
  lines = []
  for f in _STDLIB_FILES:
    p = lib / f
    if p.exists():
      lines.extend(p.read_text(encoding="utf-8").splitlines(keepends=True))
  lines = lines[:n_lines]
  chunks = ["".join(lines[i:i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]
  return [c for c in chunks if c] + _EXTRA


# ---- reading the GGUF with the `gguf` package (to check our reader) -----------


def _field(reader, key):
  f = reader.fields.get(key)
  if f is None:
    return None
  if len(f.data) == 1 and f.types[0] != gguf.GGUFValueType.ARRAY:
    return f.contents()
  return f


def _strings(reader, key):
  f = reader.fields[key]
  return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _numbers(reader, key):
  f = reader.fields[key]
  return np.array([f.parts[i][0] for i in f.data])


# ---- reference 1: llama.cpp "gpt2" BPE ------------------------------------------


def _gpt2_table():
  bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


class RefGPT2:
  """llama.cpp's BPE for tokenizer.ggml.model == "gpt2", pre "smollm"."""

  PRE = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]

  def __init__(self, meta):
    assert meta["tokenizer.ggml.pre"] == "smollm"
    self.vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    self.table = _gpt2_table()
    self.res = [regex.compile(p) for p in self.PRE]

  def _split(self, text):
    pieces = [text]
    for r in self.res:
      out = []
      for p in pieces:
        pos = 0
        for m in r.finditer(p):
          if m.start() > pos:
            out.append(p[pos:m.start()])
          out.append(m.group())
          pos = m.end()
        if pos < len(p):
          out.append(p[pos:])
      pieces = [x for x in out if x]
    return pieces

  def _bpe(self, word):
    syms = list(word)
    while len(syms) > 1:
      best, best_i = None, -1
      for i in range(len(syms) - 1):
        r = self.ranks.get((syms[i], syms[i + 1]))
        if r is not None and (best is None or r < best):
          best, best_i = r, i
      if best is None:
        break
      syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]
    return syms

  def encode(self, text):
    ids = []
    for p in self._split(text):
      word = "".join(self.table[b] for b in p.encode("utf-8"))
      ids.extend(self.vocab[s] for s in self._bpe(word))
    return ids


# ---- reference 2: llama.cpp "llama" SentencePiece -------------------------------


class RefSPM:
  """llama.cpp's SentencePiece tokenizer (user-defined partition + score merges)."""

  def __init__(self, meta):
    tokens = meta["tokenizer.ggml.tokens"]
    self.scores = np.asarray(meta["tokenizer.ggml.scores"], np.float64)
    types = meta["tokenizer.ggml.token_type"]
    self.vocab = {}
    for i, t in enumerate(tokens):
      self.vocab.setdefault(t, i)
    self.user = sorted((t for t, ty in zip(tokens, types) if ty == 4), key=len, reverse=True)
    self.space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    self.byte_ids = [self.vocab[f"<0x{b:02X}>"] for b in range(256)]

  def _partition(self, text):
    frags = [(text, False)]  # (text, is_user_token)
    for tok in self.user:
      out = []
      for s, is_tok in frags:
        if is_tok or tok not in s:
          out.append((s, is_tok))
          continue
        pos = 0
        while True:
          k = s.find(tok, pos)
          if k < 0:
            break
          if k > pos:
            out.append((s[pos:k], False))
          out.append((tok, True))
          pos = k + len(tok)
        if pos < len(s):
          out.append((s[pos:], False))
      frags = out
    return frags

  def _resegment(self, text):
    syms = list(text)
    prev = list(range(-1, len(syms) - 1))
    nxt = list(range(1, len(syms) + 1))
    alive = [True] * len(syms)
    heap = []

    def push(i, j):
      if i < 0 or j >= len(syms):
        return
      tid = self.vocab.get(syms[i] + syms[j])
      if tid is not None:
        heapq.heappush(heap, (-self.scores[tid], i, j, syms[i] + syms[j]))

    for i in range(len(syms) - 1):
      push(i, i + 1)
    while heap:
      _, i, j, merged = heapq.heappop(heap)
      if not (alive[i] and alive[j]) or nxt[i] != j or syms[i] + syms[j] != merged:
        continue  # stale bigram
      syms[i] = merged
      alive[j] = False
      nxt[i] = nxt[j]
      if nxt[j] < len(syms):
        prev[nxt[j]] = i
      push(prev[i], i)
      push(i, nxt[i])
    ids = []
    for i, s in enumerate(syms):
      if not alive[i]:
        continue
      if s in self.vocab:
        ids.append(self.vocab[s])
      else:
        ids.extend(self.byte_ids[b] for b in s.encode("utf-8"))
    return ids

  def encode(self, text):
    ids = []
    for k, (s, is_tok) in enumerate(self._partition(text)):
      if is_tok:
        ids.append(self.vocab[s])
      else:
        s = s.replace(" ", "\u2581")
        if self.space_prefix and k == 0:
          s = "\u2581" + s
        ids.extend(self._resegment(s))
    return ids


# ---- tests -----------------------------------------------------------------------


def _installed(name):
  return pytest.param(name, marks=[pytest.mark.slow, pytest.mark.skipif(
      not assets.is_installed(name), reason=f"asset {name} not installed (make setup)")])


@pytest.fixture(scope="module")
def chunks():
  return real_chunks()


@pytest.mark.parametrize("name", [_installed(n) for n in MODELS])
def test_rebuilt_gguf_tokenizer_matches_reference(name, chunks):
  tok = load_tokenizer(name)
  meta = read_gguf_metadata(assets.locate(name), prefix="tokenizer.ggml.")
  ref = RefGPT2(meta) if name.startswith("smollm") else RefSPM(meta)
  n_lines = sum(c.count("\n") + 1 for c in chunks)
  assert n_lines >= 2000, "too few real lines found in the standard library"
  encs = tok.encode_batch(chunks, add_special_tokens=False)
  mismatches = [(c, e.ids.tolist(), ref.encode(c)) for c, e in zip(chunks, encs)]
  mismatches = [m for m in mismatches if m[1] != m[2]]
  assert not mismatches, (f"{len(mismatches)}/{len(chunks)} texts differ; first: "
                          f"{mismatches[0][0]!r}\n ours {mismatches[0][1]}\n ref  {mismatches[0][2]}")


@pytest.mark.parametrize("name", [_installed(n) for n in MODELS])
def test_rebuilt_gguf_tokenizer_matches_llama_cpp(name, chunks):
  llama_cpp = pytest.importorskip(
      "llama_cpp", reason="llama-cpp-python is not installed (optional: `pip install "
      "llama-cpp-python` builds llama.cpp from source); the pure-Python reference test "
      "covers the same algorithms")
  tok = load_tokenizer(name)
  llm = llama_cpp.Llama(model_path=str(assets.locate(name)), vocab_only=True, verbose=False)
  bad = []
  for c in chunks:
    ref = llm.tokenize(c.encode("utf-8"), add_bos=False, special=False)
    ours = tok.encode(c, add_special_tokens=False).ids.tolist()
    if ours != ref:
      bad.append((c, ours, ref))
  assert not bad, f"{len(bad)}/{len(chunks)} differ; first {bad[0]}"


@pytest.mark.parametrize("name", [_installed(n) for n in MODELS])
def test_gguf_special_tokens(name):
  tok = load_tokenizer(name)
  if name.startswith("gemma"):
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, True)
    # Whitespace runs are single atomic pieces, as in llama.cpp.
    enc = tok.encode("a" + " " * 7 + "b\n\n\nc", add_special_tokens=False)
    assert [tok.token_bytes[i] for i in enc.ids] == [b"a", b" " * 7, b"b", b"\n\n\n", b"c"]
  else:
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    enc = tok.encode("x 2025", add_special_tokens=False)
    assert [tok.token_bytes[i] for i in enc.ids] == [b"x", b" ", b"2", b"0", b"2", b"5"]
  assert tok.vocab_size == len(tok.token_bytes)
  # Special tokens are never parsed from text (llama.cpp's parse_special=False).
  marker = "<|im_start|>" if name.startswith("smollm") else "<start_of_turn>"
  enc = tok.encode(marker, add_special_tokens=False)
  assert len(enc) > 1 and not enc.special.any()


def test_gguf_metadata_reader_matches_gguf_package():
  """Our fast metadata reader against the `gguf` package, on the small model."""
  name = "smollm2-135m-instruct"
  if not assets.is_installed(name):
    pytest.skip(f"{name} not installed")
  path = assets.locate(name)
  ours = read_gguf_metadata(path)
  reader = gguf.GGUFReader(str(path))
  assert set(ours) == set(reader.fields) - {k for k in reader.fields if k.startswith("GGUF.")}
  assert ours["tokenizer.ggml.tokens"] == _strings(reader, "tokenizer.ggml.tokens")
  assert ours["tokenizer.ggml.merges"] == _strings(reader, "tokenizer.ggml.merges")
  np.testing.assert_array_equal(ours["tokenizer.ggml.token_type"],
                                _numbers(reader, "tokenizer.ggml.token_type"))
  assert ours["llama.context_length"] == _field(reader, "llama.context_length")


def test_not_a_gguf_file(tmp_path):
  from alm.tokenization.base import TokenizerError  # pylint: disable=import-outside-toplevel
  p = tmp_path / "x.gguf"
  p.write_bytes(b"NOPE" + bytes(20))
  with pytest.raises(TokenizerError, match="not a GGUF file"):
    load_tokenizer(p)
