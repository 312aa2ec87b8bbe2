"""FVT: Fast Vocabulary Transfer initialisation of new embeddings (docs/method.md §8).

For every token of the new tokenizer:
- a non-special token whose bytes are an old (non-special) token keeps that
  token's embedding;
- another non-special token gets the mean of the old embeddings of its
  decomposition by the old tokenizer (`old.encode(bytes, add_special_tokens=
  False)`); when its bytes are not valid UTF-8 on their own (byte-level BPE
  pieces of a multi-byte character) or the old tokenizer cannot spell them
  exactly, the decomposition is the greedy longest match over the old
  vocabulary's bytes;
- a special token is mapped by role (BOS->BOS, EOS->EOS, PAD->PAD), then by
  its string (chat markers like "<|im_start|>" present in both), else it gets
  the mean of all old embeddings.

Input and output embeddings are transferred separately with the same
decompositions. The mean is a segment mean over a flat list of old ids
(`np.add.reduceat`), in blocks, so a 150k vocabulary takes seconds.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from alm.tokenization.base import ByteTokenizer, TokenizerError


@dataclasses.dataclass(frozen=True)
class Decomposition:
  """How every new token is built from old ones.

  Attributes:
    offsets: int64 [V_new + 1]; new token v averages old ids
      `flat[offsets[v]:offsets[v+1]]`. An empty range means "mean of all".
    flat: int32 [N] old ids.
    kind: per new token, 0 = copied, 1 = decomposed, 2 = special by role or
      string, 3 = mean of all.
  """

  offsets: np.ndarray
  flat: np.ndarray
  kind: np.ndarray

  def counts(self) -> dict[str, int]:
    """How many new tokens were copied / decomposed / mapped specials / mean-of-all."""
    names = ("copied", "decomposed", "special", "mean_of_all")
    return {n: int((self.kind == i).sum()) for i, n in enumerate(names)}


def special_strings(tok: ByteTokenizer) -> dict[int, str]:
  """The strings of a tokenizer's special tokens (when the tokenizer exposes them)."""
  out: dict[int, str] = {}
  for i in sorted(tok.special_ids):
    s = None
    for getter in ("id_to_token", "id_to_piece"):
      fn = getattr(tok, getter, None)
      if fn is not None:
        s = fn(i)
        break
    else:
      hf = getattr(tok, "hf_tokenizer", None)
      if hf is not None:
        s = hf.id_to_token(i)
      elif hasattr(tok, "specials") and i >= 256:  # the toolkit's byte tokenizer
        s = tok.specials[i - 256]
    if s is not None:
      out[i] = s
  return out


def _greedy(data: bytes, piece_to_id: dict[bytes, int], max_len: int) -> list[int] | None:
  out, i = [], 0
  while i < len(data):
    for n in range(min(max_len, len(data) - i), 0, -1):
      j = piece_to_id.get(data[i:i + n])
      if j is not None:
        out.append(j)
        i += n
        break
    else:
      return None
  return out


def _piece_to_id(tok: ByteTokenizer) -> dict[bytes, int]:
  p = getattr(tok, "piece_to_id", None)
  if isinstance(p, dict):
    return p
  out: dict[bytes, int] = {}
  for i, b in enumerate(tok.token_bytes):
    if b and i not in tok.special_ids and b not in out:
      out[b] = i
  return out


def decompose(old: ByteTokenizer, new: ByteTokenizer, *, log: bool = True) -> Decomposition:
  """Decomposes every new token into old ids (see the module docstring).

  Args:
    old: the tokenizer the embeddings belong to.
    new: the tokenizer to initialise embeddings for.
    log: log the counts of each kind of row.

  Returns:
    The decomposition (shared by the input and output embeddings).
  """
  old_p2i = _piece_to_id(old)
  max_len = max((len(b) for b in old_p2i), default=1)
  n_new = new.vocab_size
  parts: list[list[int]] = [[] for _ in range(n_new)]
  kind = np.full(n_new, 3, np.int8)
  new_tb = new.token_bytes
  to_encode: list[int] = []
  for v in range(n_new):
    if v in new.special_ids:
      continue
    b = new_tb[v]
    j = old_p2i.get(b)
    if j is not None:
      parts[v], kind[v] = [j], 0
    elif b:
      to_encode.append(v)
  # Old-tokenizer decompositions, batched where the tokenizer batches.
  texts, valid = [], []
  for v in to_encode:
    try:
      texts.append(new_tb[v].decode("utf-8"))
      valid.append(v)
    except UnicodeDecodeError:
      pass
  prefix = getattr(old, "dummy_prefix", b"")
  encs = []
  if texts:
    enc_batch = getattr(old, "encode_batch", None)
    try:
      encs = (enc_batch(texts, add_special_tokens=False) if enc_batch
              else [old.encode(t, add_special_tokens=False) for t in texts])
    except (TokenizerError, ValueError):  # one bad text spoils the batch: go one by one
      encs = []
      for t in texts:
        try:
          encs.append(old.encode(t, add_special_tokens=False))
        except (TokenizerError, ValueError):
          encs.append(None)
  by_v = dict(zip(valid, encs))
  old_tb = old.token_bytes
  for v in to_encode:
    enc = by_v.get(v)
    ids = None
    if enc is not None:
      ids = [int(i) for i, sp in zip(enc.ids, enc.special) if not sp]
      spelled = b"".join(old_tb[i] for i in ids)
      if prefix and spelled == prefix + new_tb[v] and ids and old_tb[ids[0]] == prefix:
        ids = ids[1:]  # SentencePiece's dummy "▁" as a token of its own: not part of v
      elif spelled != new_tb[v]:
        ids = None
    if not ids:
      ids = _greedy(new_tb[v], old_p2i, max_len)
    if ids:
      parts[v], kind[v] = ids, 1
  # Specials by role, then by string.
  old_str = {s: i for i, s in special_strings(old).items()}
  new_str = special_strings(new)
  roles = [(new.bos_id, old.bos_id), (new.eos_id, old.eos_id),
           (getattr(new, "pad_id", None), getattr(old, "pad_id", None))]
  for v in sorted(new.special_ids):
    match = next((o for n, o in roles if n == v and o is not None), None)
    if match is None and new_str.get(v) in old_str:
      match = old_str[new_str[v]]
    if match is not None:
      parts[v], kind[v] = [int(match)], 2
  lens = np.fromiter((len(p) for p in parts), np.int64, n_new)
  offsets = np.concatenate([[0], np.cumsum(lens)])
  flat = np.fromiter((i for p in parts for i in p), np.int32, int(offsets[-1]))
  d = Decomposition(offsets=offsets, flat=flat, kind=kind)
  if log:
    logging.info("FVT %s -> %s: %s", getattr(old, "name", "old"), getattr(new, "name", "new"),
                 d.counts())
  return d


def apply_decomposition(old_emb: np.ndarray, d: Decomposition, *,
                        block: int = 16384) -> np.ndarray:
  """New embedding rows as segment means of old rows.

  Tokens are grouped by decomposition length L, so each group is one gather of
  an [n, L] index matrix and a sum over L (much faster than `np.add.reduceat`
  over rows, which numpy does not vectorise across D).

  Args:
    old_emb: [V_old, D] old embeddings (input, or output as [V_old, D]).
    d: the decomposition from `decompose`.
    block: new rows per gather (bounds the [block, L, D] temporary).

  Returns:
    [V_new, D] new embeddings (float32, or the input's dtype if wider).
  """
  old_emb = np.asarray(old_emb)
  dt = np.promote_types(old_emb.dtype, np.float32)
  n_new = len(d.offsets) - 1
  out = np.empty((n_new, old_emb.shape[1]), dt)
  lens = np.diff(d.offsets)
  out[lens == 0] = old_emb.astype(dt).mean(axis=0)
  for length in np.unique(lens[lens > 0]).tolist():
    rows = np.flatnonzero(lens == length)  # new ids with this many pieces
    for lo in range(0, len(rows), block):
      r = rows[lo:lo + block]
      idx = d.flat[d.offsets[r][:, None] + np.arange(length)]  # [n, L]
      out[r] = old_emb[idx].astype(dt).sum(axis=1) / length
  return out


def check_embedding_rows(rows: int, old: ByteTokenizer) -> None:
  """Raises ValueError unless an embedding table of `rows` rows covers `old`'s ids.

  Args:
    rows: rows of the old embedding table.
    old: the tokenizer the table is supposed to belong to.
  """
  if rows < old.vocab_size:
    raise ValueError(f"The embedding table has {rows} rows but the old tokenizer has "
                     f"{old.vocab_size} ids; pass the model's own tokenizer as `old`.")


def check_decomposition(d: Decomposition, new: ByteTokenizer, rows: int) -> None:
  """Raises ValueError unless `d` decomposes `new`'s ids into rows below `rows`.

  Args:
    d: a decomposition (e.g. a cached one).
    new: the tokenizer it should build embeddings for.
    rows: rows of the old embedding table it indexes.
  """
  if len(d.offsets) - 1 != new.vocab_size:
    raise ValueError(f"The decomposition has {len(d.offsets) - 1} new tokens but the new "
                     f"tokenizer has {new.vocab_size} ids; compute it with "
                     f"decompose(old, new) for this tokenizer pair.")
  if d.flat.size and int(d.flat.max()) >= rows:
    raise ValueError(f"The decomposition uses old id {int(d.flat.max())} but the embedding "
                     f"table has {rows} rows; compute it with decompose(old, new) for the "
                     f"model's own tokenizer.")


def fvt_embeddings(old_input: np.ndarray, old_output: np.ndarray | None, old: ByteTokenizer,
                   new: ByteTokenizer, *, decomposition: Decomposition | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
  """FVT-initialised (input, output) embeddings for the new tokenizer.

  Args:
    old_input: [V_old, D] input embedding table.
    old_output: [V_old, D] output embeddings (the lm_head transposed), or None
      for a tied model.
    old: the old tokenizer.
    new: the new tokenizer.
    decomposition: `decompose(old, new)` when the caller has it already
      (e.g. cached on disk); computed here when None.

  Returns:
    ([V_new, D] input, [V_new, D] output or None).

  Raises:
    ValueError: the table has fewer rows than `old` has ids (`old` is not the
      model's tokenizer), or `decomposition` does not fit `new` and the table.
  """
  check_embedding_rows(old_input.shape[0], old)
  d = decompose(old, new) if decomposition is None else decomposition
  check_decomposition(d, new, old_input.shape[0])
  out = None if old_output is None else apply_decomposition(old_output, d)
  return apply_decomposition(old_input, d), out


def fvt_transformer(model, old: ByteTokenizer, new: ByteTokenizer, *,
                    decomposition: Decomposition | None = None):
  """A student Transformer for `new`: FVT embeddings, body shared with `model`.

  The student's blocks and final norm are the very same NNX Variables as the
  teacher's (one copy in memory; with `alm.models.lora` the teacher is the same
  body with LoRA switched off). Only the embedding table (and the lm_head of
  an untied model) is new, stored in `model.param_dtype`.

  Args:
    model: the teacher `alm.models.transformer.Transformer`.
    old: its tokenizer.
    new: the student's tokenizer.
    decomposition: `decompose(old, new)` when the caller has it already (e.g.
      `alm.training.students.cached_decomposition`); computed here when None.

  Returns:
    The student Transformer (config with the new vocabulary size and ids).

  Raises:
    ValueError: the model has fewer embedding rows than `old` has ids (pass
      the model's own tokenizer), or `decomposition` does not fit.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from alm.models import transformer as tfm  # pylint: disable=import-outside-toplevel

  cfg = model.cfg
  # Checked before the decomposition (a minute for a 150k vocabulary) and the
  # host copies of the tables.
  check_embedding_rows(model.embedder.embedding.shape[0], old)
  emb_in = np.asarray(model.embedder.embedding[...])
  emb_out = None if model.lm_head is None else np.asarray(model.lm_head.kernel[...]).T
  new_in, new_out = fvt_embeddings(emb_in, emb_out, old, new, decomposition=decomposition)
  new_cfg = cfg.replace(vocab_size=new.vocab_size, bos_token_id=new.bos_id,
                        eos_token_id=new.eos_id, pad_token_id=getattr(new, "pad_id", None))
  student = tfm.abstract_transformer(new_cfg, dtype=model.dtype, param_dtype=model.param_dtype)
  pdt = model.param_dtype
  student.embedder.embedding.set_value(jnp.asarray(new_in, pdt))
  if student.lm_head is not None:
    student.lm_head.kernel.set_value(jnp.asarray(new_out.T, pdt))
  # Share the body: same Variable objects, not copies.
  student.layers = model.layers
  student.final_norm = model.final_norm
  return student
