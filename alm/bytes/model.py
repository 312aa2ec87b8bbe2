"""Byte-level students: a transformer over bytes with backtracked subword n-gram embeddings.

SPEC §10, docs/method.md §8. A `ByteTransformer` is a `Transformer` whose
vocabulary is the 256 byte values plus the base model's special tokens
(`byte_tokenizer_for`), with one change at the input:

    x_i = (E_byte[b_i] + E_sub[s_i]) * scale

where `s_i` is the id, in the base (teacher) vocabulary, of the longest base
token whose bytes end exactly at byte i (`alm.bytes.lookup`; a special token
maps to its own base id; -1, no term, where no token ends there), `E_sub` is
the base model's input embedding table (frozen unless trained explicitly) and
`scale` is Gemma's sqrt(D) where the base model has it. The output embeddings
are untied (a byte vocabulary makes them cheap).

The lookup runs inside the forward, so the student is an ordinary model of
byte ids: the training step, bits per byte, the lm-eval backend and
`alm.models.generate` call it like any `Transformer`. With a KV cache the
last `max_bytes - 1` ids ride in the cache (`ByteCache`), so generation looks
up each new byte without re-reading the prefix.

`byte_student(base, base_tok)` builds one from a base model: FVT byte
embeddings (a byte that is a base token takes its embedding; SPEC §8) for
both tables, the base body shared (LoRA) or copied (full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.hypernet.fvt import special_strings
from alm.bytes.lookup import TokenTable, ngram_ids, usable_run
from alm.models.transformer import (Embedder, InputError, KVCache, ModelOutput, Transformer,
                                    check_token_ids)
from alm.tokenization.base import ByteTokenizer, TokenizerError
from alm.tokenization.bytes_tok import BytesTokenizer

# Placeholder specials left out of a byte vocabulary (Gemma's <unusedN>, Llama 3's reserved).
_UNUSED = re.compile(r"^<unused\d+>$|^\[unused\d+\]$|^<\|reserved_special_token_\d+\|>$")


def byte_tokenizer_for(base_tok: ByteTokenizer) -> BytesTokenizer:
  """The byte tokenizer of a byte student of a model with tokenizer `base_tok`.

  Ids 0..255 are the bytes; then the base's special tokens in base-id order
  (same texts, BOS/EOS/padding roles kept), except placeholder `<unusedN>`
  slots (Gemma 3 has 6,000+ of them). A base without a BOS uses its EOS as
  the byte tokenizer's BOS, not prepended (`add_bos` follows the base).

  Raises:
    TokenizerError: the base has no EOS, or a special without a text.
  """
  if base_tok.eos_id is None:
    raise TokenizerError(f"{getattr(base_tok, 'name', 'The base tokenizer')!r} has no EOS "
                         "token; a byte student needs one to end generations.")
  strings = special_strings(base_tok)
  names = []
  for i in sorted(base_tok.special_ids):
    text = strings.get(i)
    if text is None:
      raise TokenizerError(f"Special id {i} of {getattr(base_tok, 'name', 'the base')!r} has "
                           "no text; cannot name it in the byte vocabulary.")
    if not _UNUSED.match(text) or i in (base_tok.bos_id, base_tok.eos_id):
      names.append((i, text))
  texts = [t for _, t in names]
  eos = strings[base_tok.eos_id]
  bos = strings[base_tok.bos_id] if base_tok.bos_id is not None else eos
  pad_id = getattr(base_tok, "pad_id", None)
  pad = strings.get(pad_id) if pad_id is not None else None
  return BytesTokenizer(texts, add_bos=bool(base_tok.add_bos and base_tok.bos_id is not None),
                        bos=bos, eos=eos, pad=pad if pad in texts else None)


def special_base_ids(byte_tok: BytesTokenizer, base_tok: ByteTokenizer) -> np.ndarray:
  """int32 [n specials]: the base id of each byte-tokenizer special (matched by text)."""
  by_text = {s: i for i, s in special_strings(base_tok).items()}
  out = []
  for s in byte_tok.specials:
    if s not in by_text:
      raise TokenizerError(f"The byte tokenizer's special {s!r} is not a special of "
                           f"{getattr(base_tok, 'name', 'the base tokenizer')!r}: this byte "
                           "student was made for another base model.")
    out.append(by_text[s])
  return np.asarray(out, np.int32)


class LookupTable(nnx.Variable):
  """A non-trainable array of the n-gram lookup (never in a trainable filter)."""


@dataclasses.dataclass(frozen=True)
class NgramSpec:
  """Static facts of the lookup (part of the module's static structure)."""

  bits: int
  probes: int
  max_bytes: int


@flax.struct.dataclass
class ByteCache:
  """A byte student's generation cache: the KV cache and the last max_bytes-1 ids.

  Attributes:
    kv: the body's KVCache.
    history: int32 [B, H]: the last H ids fed (H = max_bytes - 1).
    history_valid: bool [B, H]: which of them are real (not padding, not yet fed).
  """

  kv: KVCache
  history: jax.Array
  history_valid: jax.Array

  @property
  def max_length(self) -> int:
    return self.kv.max_length

  @property
  def index(self):
    return self.kv.index


class ByteTransformer(Transformer):
  """A Transformer over bytes whose inputs add the backtracked subword n-gram embedding.

  Args:
    body: a Transformer with the byte vocabulary (its embedder is E_byte, its
      untied lm_head the byte output embeddings; layers and final norm are
      used as they are, shared or not).
    subword: the base model's input `Embedder` (E_sub), or None for a byte
      student without n-gram embeddings.
    table: the lookup table of the base tokenizer (`TokenTable.build`); None
      exactly when `subword` is None.
    special_ids: int32 [n specials]: the base id of each byte special.
    base: the base model's name (recorded in exports).
    base_fingerprint: `vocab_fingerprint` of the base tokenizer (checked
      against the teacher a stored student is used with).
  """

  def __init__(self, body: Transformer, subword: Embedder | None, table: TokenTable | None,
               special_ids: np.ndarray, *, base: str = "", base_fingerprint: str = ""):
    # pylint: disable=super-init-not-called  (the body's Variables are taken, not re-made)
    if (subword is None) != (table is None):
      raise ValueError("Pass both the subword embeddings and the lookup table, or neither.")
    cfg = body.cfg
    if cfg.tie_embeddings:
      raise ValueError("A byte student has untied output embeddings; untie the body first.")
    n_special = cfg.vocab_size - 256
    if n_special < 1 or len(special_ids) != n_special:
      raise ValueError(f"The body's vocabulary ({cfg.vocab_size}) must be 256 bytes + the "
                       f"{len(special_ids)} specials.")
    self.cfg = nnx.static(cfg)
    self.dtype, self.param_dtype = body.dtype, body.param_dtype
    self.embedder, self.layers = body.embedder, body.layers
    self.final_norm, self.lm_head = body.final_norm, body.lm_head
    self.subword = subword
    self.base = nnx.static((base, base_fingerprint))
    self.special_ids = LookupTable(jnp.asarray(special_ids, jnp.int32))
    self.spec = nnx.static(None if table is None else
                           NgramSpec(table.bits, table.probes, table.max_bytes))
    if table is not None:
      sub_rows = subword.embedding.shape[0]
      if len(table.lengths) > sub_rows or int(np.max(special_ids)) >= sub_rows:
        raise ValueError(f"The lookup table covers {len(table.lengths)} base ids but the "
                         f"subword embeddings have {sub_rows} rows: pass the base model's "
                         "own tokenizer.")
      self.slots = LookupTable(jnp.asarray(table.slots))
      self.words = LookupTable(jnp.asarray(table.words))
      self.lengths = LookupTable(jnp.asarray(table.lengths))

  @property
  def max_bytes(self) -> int:
    return 0 if self.spec is None else self.spec.max_bytes

  def subword_ids(self, input_ids: jax.Array, valid: jax.Array,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """int32 [B, T]: s_i (the base id of the longest base token ending at i; -1: none).

    Specials map to their base ids; a match never covers padding or a special,
    nor crosses into another segment. `input_ids` may start with history
    (earlier ids of the same rows) marked in `valid`.
    """
    spec = self.spec
    special = input_ids >= 256
    run = usable_run(special | ~valid, segment_ids, spec.max_bytes)
    ids = ngram_ids({"slots": self.slots[...], "words": self.words[...],
                     "lengths": self.lengths[...]}, input_ids, run, bits=spec.bits,
                    probes=spec.probes, max_bytes=spec.max_bytes)
    base_special = self.special_ids[...][jnp.clip(input_ids - 256, 0, None)]
    return jnp.where(special, base_special, ids)

  def _embed(self, input_ids, valid, segment_ids=None, history=None, history_valid=None):
    x = jnp.take(self.embedder.embedding[...], input_ids, axis=0).astype(self.dtype)
    if self.spec is not None:
      if history is not None:
        h = history.shape[1]
        sub = self.subword_ids(jnp.concatenate([history, input_ids], axis=1),
                               jnp.concatenate([history_valid, valid], axis=1))[:, h:]
      else:
        sub = self.subword_ids(input_ids, valid, segment_ids)
      e = jnp.take(self.subword.embedding[...], jnp.maximum(sub, 0), axis=0).astype(self.dtype)
      x = x + jnp.where((sub >= 0)[..., None], e, jnp.zeros((), self.dtype))
    if self.cfg.embed_scale:
      x = x * jnp.asarray(np.sqrt(self.cfg.hidden_size), self.dtype)
    return x

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Input embeddings of whole rows of byte ids [B, T] (each row its own context)."""
    return self._embed(input_ids, jnp.ones(input_ids.shape, bool))

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> ByteCache:
    h = max(self.max_bytes - 1, 0)
    return ByteCache(kv=super().init_cache(batch_size, max_length, dtype),
                     history=jnp.zeros((batch_size, h), jnp.int32),
                     history_valid=jnp.zeros((batch_size, h), bool))

  def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, segment_ids=None,
               attention_mask=None, cache: ByteCache | None = None, hidden_layers=()):
    """Runs the model on byte ids (see `Transformer.__call__`; the cache is a `ByteCache`)."""
    if inputs_embeds is not None or input_ids is None:
      if cache is not None:
        raise InputError("A byte student's cache needs the byte ids (input_ids), not "
                         "inputs_embeds: the n-gram lookup reads them.")
      return super().__call__(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                              segment_ids=segment_ids, attention_mask=attention_mask,
                              hidden_layers=hidden_layers)
    check_token_ids(input_ids, self.cfg.vocab_size)
    if cache is not None and not isinstance(cache, ByteCache):
      raise InputError("A byte student takes the ByteCache of its own init_cache.")
    valid = (jnp.ones(input_ids.shape, bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    input_ids = jnp.asarray(input_ids).astype(jnp.int32)
    if cache is None:
      x = self._embed(input_ids, valid, segment_ids)
    else:
      x = self._embed(input_ids, valid, history=cache.history,
                      history_valid=cache.history_valid)
    out = super().__call__(inputs_embeds=x, positions=positions, segment_ids=segment_ids,
                           attention_mask=attention_mask,
                           cache=None if cache is None else cache.kv, hidden_layers=hidden_layers)
    if cache is None:
      return out
    h = cache.history.shape[1]
    ids = jnp.concatenate([cache.history, input_ids], axis=1)[:, ids_tail(h)]
    ok = jnp.concatenate([cache.history_valid, valid], axis=1)[:, ids_tail(h)]
    return ModelOutput(logits=out.logits, hidden_states=out.hidden_states,
                       cache=ByteCache(kv=out.cache, history=ids, history_valid=ok))


def ids_tail(h: int) -> slice:
  """The slice of the last h entries (an empty one for h = 0)."""
  return slice(-h, None) if h else slice(0, 0)


def _copy(module):
  """A deep copy of an NNX module, arrays included."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def byte_student(base: Transformer, base_tok: ByteTokenizer, *, ngram: bool = True,
                 max_bytes: int = 16, copy_body: bool = False,
                 byte_tok: BytesTokenizer | None = None) -> tuple[ByteTransformer, BytesTokenizer]:
  """A byte student of `base`: FVT byte tables, untied output, the n-gram term.

  Args:
    base: the base (teacher) model.
    base_tok: its tokenizer.
    ngram: add the backtracked subword n-gram embeddings (the base's input
      table, shared with `base`, not copied).
    max_bytes: the longest n-gram looked up (the reference's 16).
    copy_body: copy the blocks and final norm (full fine-tuning) instead of
      sharing them with `base` (LoRA).
    byte_tok: the byte tokenizer (default `byte_tokenizer_for(base_tok)`).

  Returns:
    (the student, its byte tokenizer).

  Raises:
    TokenizerError: the base vocabulary cannot spell every byte of ordinary
      text (no n-gram id and no FVT row for those bytes), or has no EOS.
  """
  # pylint: disable=import-outside-toplevel
  from alm.bytes.ngram import SuffixLookup
  from alm.hypernet import fvt
  from alm.models.transformer import abstract_transformer
  from alm.training.students import cached_decomposition

  SuffixLookup(base_tok, max_bytes=1).check_bytes()  # fails before the slow work
  byte_tok = byte_tok or byte_tokenizer_for(base_tok)
  fvt.check_embedding_rows(base.embedder.embedding.shape[0], base_tok)
  emb_in = np.asarray(base.embedder.embedding[...])
  emb_out = emb_in if base.lm_head is None else np.asarray(base.lm_head.kernel[...]).T
  new_in, new_out = fvt.fvt_embeddings(emb_in, emb_out, base_tok, byte_tok,
                                       decomposition=cached_decomposition(base_tok, byte_tok))
  cfg = base.cfg.replace(vocab_size=byte_tok.vocab_size, bos_token_id=byte_tok.bos_id,
                         eos_token_id=byte_tok.eos_id, pad_token_id=byte_tok.pad_id,
                         tie_embeddings=False)
  body = abstract_transformer(cfg, dtype=base.dtype, param_dtype=base.param_dtype)
  pdt = base.param_dtype
  body.embedder.embedding.set_value(jnp.asarray(new_in, pdt))
  body.lm_head.kernel.set_value(jnp.asarray(new_out.T, pdt))
  if copy_body:  # new buffers, not only new Variables: the step donates what trains
    body.layers, body.final_norm = _copy(base.layers), _copy(base.final_norm)
  else:
    body.layers, body.final_norm = base.layers, base.final_norm
  table = TokenTable.build(base_tok, max_bytes) if ngram else None
  student = ByteTransformer(body, base.embedder if ngram else None, table,
                            special_base_ids(byte_tok, base_tok),
                            base=getattr(base_tok, "name", ""),
                            base_fingerprint=vocab_fingerprint(base_tok))
  return student, byte_tok


# Storage -----------------------------------------------------------------------------
#
# A byte student is stored as an HF directory of its body (config.json,
# model.safetensors: byte embeddings, blocks, untied byte output; tokenizer.json
# of the byte vocabulary) plus two files alm reads:
#   alm_byte_student.json     format, max_bytes, the base's name and vocabulary
#                             fingerprint, each byte special's base id
#   alm_ngram/ngram.safetensors   the subword table E_sub and the lookup arrays
# Other HF tools load the body alone: a byte-level model WITHOUT the n-gram
# term, which is not the same model (its logits differ).

BYTE_STUDENT_FILE = "alm_byte_student.json"
NGRAM_FILE = "alm_ngram/ngram.safetensors"  # not beside the body: HF readers glob *.safetensors


def vocab_fingerprint(tok: ByteTokenizer) -> str:
  """A short hash of a vocabulary: token bytes, specials and their roles (names the base)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  from alm.training.students import hash_vocab  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  hash_vocab(h, tok)
  return h.hexdigest()[:16]


SUBWORD_STORAGE = ("copy", "reference")


def save_byte_student(model: ByteTransformer, directory, tokenizer: BytesTokenizer, *,
                      subword: str = "copy"):
  """Writes a byte student (see "Storage" above); returns the directory.

  Args:
    model: the byte student.
    directory: where to write.
    tokenizer: its byte tokenizer.
    subword: "copy" stores the frozen subword table with the student (self-
      contained); "reference" stores only the base model's name and
      vocabulary fingerprint, and `load_byte_student` reads the table from
      that base (saves the base's whole embedding table: 671 MB for Gemma 3).
  """
  from alm._validation import check_choice  # pylint: disable=import-outside-toplevel
  check_choice("subword", subword, SUBWORD_STORAGE)
  # pylint: disable=import-outside-toplevel
  import json
  from pathlib import Path
  from safetensors.numpy import save_file
  from alm.models.loading import save_model

  d = save_model(body_of(model), directory, tokenizer)
  spec = model.spec
  meta = {"format": 1, "ngram": spec is not None, "max_bytes": model.max_bytes,
          "base": model.base[0], "base_fingerprint": model.base[1],
          "special_base_ids": [int(i) for i in np.asarray(model.special_ids[...])]}
  if spec is not None:
    if subword == "reference" and not model.base[0]:
      raise ValueError("subword='reference' needs the base model's name; this student has "
                       "none recorded. Store the table (subword='copy').")
    meta.update(bits=spec.bits, probes=spec.probes, subword=subword)
    (Path(d) / NGRAM_FILE).parent.mkdir(exist_ok=True)
    arrays = {"slots": np.asarray(model.slots[...]), "words": np.asarray(model.words[...]),
              "lengths": np.asarray(model.lengths[...])}
    if subword == "copy":
      arrays["subword_embedding"] = np.asarray(model.subword.embedding[...])
    save_file(arrays, str(Path(d) / NGRAM_FILE))
  (Path(d) / BYTE_STUDENT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
  return d


def body_of(model: ByteTransformer) -> Transformer:
  """A plain `Transformer` of the byte student's body (the same Variables, no n-gram term)."""
  from alm.models.transformer import abstract_transformer  # pylint: disable=import-outside-toplevel
  body = abstract_transformer(model.cfg, dtype=model.dtype, param_dtype=model.param_dtype)
  body.embedder, body.layers = model.embedder, model.layers
  body.final_norm, body.lm_head = model.final_norm, model.lm_head
  return body


def is_byte_student_dir(path) -> bool:
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  return Path(path).is_dir() and (Path(path) / BYTE_STUDENT_FILE).is_file()


def load_byte_student(directory, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      base: str | None = None) -> ByteTransformer:
  """The byte student stored in `directory` by `save_byte_student`.

  Args:
    directory: the export.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    base: for a student stored by reference, the base model (asset name, .gguf
      or HF directory) to read the subword table from; default: the recorded one.

  Raises:
    FileNotFoundError: its n-gram file is missing, or (by reference) the base
      model cannot be found.
    ValueError: (by reference) the base is another model than the student's.
    alm.models.loading.CheckpointError: the files disagree with each other.
  """
  # pylint: disable=import-outside-toplevel
  import json
  from pathlib import Path
  from safetensors.numpy import load_file
  from alm.models.loading import CheckpointError, load_hf

  d = Path(directory)
  meta = json.loads((d / BYTE_STUDENT_FILE).read_text())
  if meta.get("format") != 1:
    raise CheckpointError(f"{d / BYTE_STUDENT_FILE}: unknown byte-student format "
                          f"{meta.get('format')!r}; this alm reads format 1.")
  body = load_hf(d, dtype=dtype, param_dtype=param_dtype)
  special = np.asarray(meta["special_base_ids"], np.int32)
  rec = {"base": meta.get("base", ""), "base_fingerprint": meta.get("base_fingerprint", "")}
  if not meta["ngram"]:
    return ByteTransformer(body, None, None, special, **rec)
  f = d / NGRAM_FILE
  if not f.is_file():
    raise FileNotFoundError(f"{d} is a byte student with n-gram embeddings but has no "
                            f"{NGRAM_FILE}; copy the whole export directory.")
  arrays = load_file(str(f))
  table = TokenTable(slots=arrays["slots"], words=arrays["words"], lengths=arrays["lengths"],
                     bits=int(meta["bits"]), probes=int(meta["probes"]),
                     max_bytes=int(meta["max_bytes"]))
  if meta.get("subword", "copy") == "reference":
    sub = _base_table(base or meta["base"], meta["base_fingerprint"], d, param_dtype)
  else:
    sub = arrays["subword_embedding"]
  if sub.shape[1] != body.cfg.hidden_size:
    raise CheckpointError(f"{f}: subword embeddings of width {sub.shape[1]}, the body's is "
                          f"{body.cfg.hidden_size}.")
  if sub.shape[0] < len(table.lengths):
    raise CheckpointError(f"{d}: the subword table has {sub.shape[0]} rows, the lookup "
                          f"{len(table.lengths)} base ids.")
  return ByteTransformer(body, _embedder(sub, param_dtype), table, special, **rec)


def _base_table(base: str, fingerprint: str, where, param_dtype) -> np.ndarray:
  """The input embedding table of `base`, checked to be the student's base."""
  # pylint: disable=import-outside-toplevel
  from alm.models.loading import load_weights
  from alm.tokenization.loading import load_tokenizer
  try:
    tok = load_tokenizer(base)
  except FileNotFoundError:
    raise FileNotFoundError(f"{where} stores its subword table by reference to the base model "
                            f"{base!r}, which is not found here. Install or copy that model "
                            "(or pass base=PATH to its new place), or export the student "
                            "with the table included (--export_subword=copy).") from None
  check_base(fingerprint, tok, str(where))
  return np.asarray(load_weights(base, param_dtype=param_dtype).embedder.embedding[...])


def _embedder(table: np.ndarray, param_dtype) -> Embedder:
  """An `Embedder` holding `table` (no random initialisation)."""
  from alm.models.transformer import _ABSTRACT_INIT  # pylint: disable=import-outside-toplevel
  token = _ABSTRACT_INIT.set(True)
  try:
    e = Embedder(table.shape[0], table.shape[1], rngs=nnx.Rngs(0), param_dtype=param_dtype)
  finally:
    _ABSTRACT_INIT.reset(token)
  e.embedding.set_value(jnp.asarray(table, param_dtype))
  return e


def check_base(meta_fingerprint: str, base_tok: ByteTokenizer, where: str) -> None:
  """Raises ValueError unless `base_tok` is the vocabulary the byte student was made from."""
  got = vocab_fingerprint(base_tok)
  if got != meta_fingerprint:
    raise ValueError(f"{where} is a byte student of another base model: its n-gram ids index "
                     f"a vocabulary with fingerprint {meta_fingerprint}, but "
                     f"{getattr(base_tok, 'name', 'the given base')!r} has {got}. Load it with "
                     "the base model it was made from.")
