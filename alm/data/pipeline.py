"""The grain input pipeline: documents -> teacher/student token batches with chunk ids.

    source --(shard, shuffle(seed), repeat)--> per-document work in the workers:
      both tokenizations, the alignment (SPEC section 2), loss masks, the cut
      into rows at byte offsets both sides agree on
    --> flatten --> pad OR pack (first-fit) --> batch --> finalize

Everything expensive happens per document inside grain's map, so with
`num_workers > 0` it runs in grain's worker processes (`mp_prefetch`).

Cutting long documents: a row holds at most `teacher_len` teacher tokens and
`student_len` student tokens. A document is cut at the largest chunk boundary
(a byte offset where a token ends on both sides) that fits both, so no chunk
straddles a cut; the tokens are those of the full text (what a model sees when
it reads a long document), not a re-encoding of the piece. `long_documents=
"truncate"` keeps the first piece; "split" keeps every piece (later pieces get
BOS again on the sides that add one). When no boundary fits (one chunk longer
than a row), the cut is forced and the chunks crossing it get id -1 (no loss).

Packing: several documents per row, with `segment_ids` (1, 2, ... per document,
0 for padding) and `positions` restarting at 0 per document; each document's
chunk ids are offset so that ids stay contiguous and increasing in a row and
never link two documents. The first token of every document has loss mask
False: it has no prediction inside its own document.

Batches are dicts of numpy arrays, `B = batch_size`, `Tt = teacher_len`,
`Ts = student_len`:
  teacher_ids / student_ids               int32 [B, Tt] / [B, Ts] (pad: pad_id)
  teacher_chunk_ids / student_chunk_ids   int32, -1 outside any chunk
  teacher_loss_mask / student_loss_mask   bool, True on training targets
  teacher_segment_ids / student_segment_ids  int32, 0 on padding
  teacher_positions / student_positions   int32
  teacher_num_bytes / student_num_bytes   int32, text bytes of each token (for
                                          bits per byte; 0 for specials/padding)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from alm.data.sources import DataError
from alm.tokenization import chat
from alm.tokenization.alignment import align
from alm.tokenization.base import ByteTokenizer, Encoding

Mode = Literal["pad", "pack"]
LongDocuments = Literal["truncate", "split"]
MODES: tuple[str, ...] = ("pad", "pack")
LONG_DOCUMENTS: tuple[str, ...] = ("truncate", "split")
SIDES = ("teacher", "student")
_SEQ_FEATURES = ("ids", "chunk_ids", "loss_mask", "num_bytes")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Options of the input pipeline.

  Attributes:
    batch_size: rows per batch (per process; see `shard_index`).
    teacher_len: teacher tokens per row (Tt).
    student_len: student tokens per row (Ts).
    mode: "pad" (one document per row) or "pack" (several per row).
    long_documents: "truncate" (keep the first row-sized piece) or "split"
      (keep every piece as its own document).
    seed: seeds the shuffle and the packing; same seed, same batches.
    shuffle: shuffle documents (each epoch reshuffled from the seed).
    num_epochs: passes over the data; None repeats forever.
    num_workers: grain worker processes for the per-document work (0: in
      the calling process).
    packing_bins: first-fit bins held open while packing (more: less padding).
    align_constraint: passed to `alm.align` as `constraint` ("unconstrained",
      "space"; "unbiased" needs bias tables: pass an `align_fn` that binds them).
    shard_index: this process's shard of the documents (multi-host).
    shard_count: number of shards.
    add_eos: append EOS (as text-less special) to plain documents on sides
      whose tokenizer has one, so the model learns where documents end.
    chat_family: chat template for `messages` documents, used for both sides
      (`alm.tokenization.chat`): "plain" (a shared "role: content" rendering,
      default: any two tokenizers), a family ("chatml", "llama3", "gemma",
      "mistral") whose markers both tokenizers have, or "auto" (the teacher's).
      Loss masks cover assistant contents and their end-of-turn markers.
  """

  batch_size: int = 8
  teacher_len: int = 128
  student_len: int = 128
  mode: Mode = "pad"
  long_documents: LongDocuments = "truncate"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  num_workers: int = 0
  packing_bins: int | None = None
  align_constraint: str = "unconstrained"
  shard_index: int = 0
  shard_count: int = 1
  add_eos: bool = False
  chat_family: str = "plain"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Unknown pipeline mode {self.mode!r}; valid modes: {', '.join(MODES)}.")
    if self.long_documents not in LONG_DOCUMENTS:
      raise ValueError(f"Unknown long_documents {self.long_documents!r}; valid values: "
                       f"{', '.join(LONG_DOCUMENTS)}.")
    for name in ("batch_size", "teacher_len", "student_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.teacher_len < 2 or self.student_len < 2:
      raise ValueError("teacher_len and student_len must be >= 2 (a row needs a target).")
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f"Need 0 <= shard_index < shard_count, got {self.shard_index}, "
                       f"{self.shard_count}.")
    if self.chat_family not in chat.FAMILIES + ("auto",):
      raise ValueError(f"Unknown chat_family {self.chat_family!r}; valid values: "
                       f"{', '.join(chat.FAMILIES + ('auto',))}.")
    if self.num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {self.num_workers}.")


# ---------------------------------------------------------------------------
# Per-document work (runs in the workers).


def _with_eos(enc: Encoding, tok: ByteTokenizer) -> Encoding:
  if tok.eos_id is None:
    return enc
  n = np.int32(len(enc.text))
  cat = lambda a, v: np.concatenate([a, np.asarray([v], a.dtype)])
  lm = None if enc.loss_mask is None else cat(enc.loss_mask, False)
  return Encoding(cat(enc.ids, tok.eos_id), cat(enc.starts, n), cat(enc.ends, n),
                  cat(enc.special, True), enc.text, lm)


def _pieces(t_ends, s_ends, bounds, cap_t, cap_s, n_t, n_s, first_caps, split):
  """Token index ranges [(t_lo, t_hi, s_lo, s_hi)] of the row-sized pieces."""
  ct = np.searchsorted(t_ends, bounds, "right")  # teacher tokens through boundary k
  cs = np.searchsorted(s_ends, bounds, "right")
  out = []
  lo_t = lo_s = 0
  caps = first_caps
  while lo_t < n_t or lo_s < n_s:
    ct_cap, cs_cap = caps
    if n_t - lo_t <= ct_cap and n_s - lo_s <= cs_cap:
      out.append((lo_t, n_t, lo_s, n_s))
      break
    k = min(np.searchsorted(ct, lo_t + ct_cap, "right"),
            np.searchsorted(cs, lo_s + cs_cap, "right")) - 1
    if k >= 0 and ct[k] > lo_t and cs[k] > lo_s:
      hi_t, hi_s = int(ct[k]), int(cs[k])
    else:  # no common boundary fits: force the cut (crossing chunks get -1)
      hi_t, hi_s = min(n_t, lo_t + ct_cap), min(n_s, lo_s + cs_cap)
    out.append((lo_t, hi_t, lo_s, hi_s))
    if not split:
      break
    lo_t, lo_s = hi_t, hi_s
    caps = (cap_t, cap_s)
  return out


def _compact(chunks: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Chunk ids of a piece renumbered 0..n-1 (order kept), -1 where not `keep`."""
  out = np.full(chunks.shape, -1, np.int32)
  if keep.any():
    _, inv = np.unique(chunks[keep], return_inverse=True)
    out[keep] = inv.astype(np.int32)
  return out


class DocumentProcessor:
  """Turns one document into a list of row-sized examples (picklable for workers).

  Args:
    teacher: the teacher tokenizer.
    student: the student tokenizer.
    cfg: the pipeline config.
    align_fn: the alignment function, called like `alm.align` (default: it).
  """

  def __init__(self, teacher: ByteTokenizer, student: ByteTokenizer, cfg: PipelineConfig,
               align_fn: Callable | None = None):
    self.teacher, self.student, self.cfg = teacher, student, cfg
    self.align_fn = align_fn or align

  def encode(self, doc: dict[str, Any]) -> tuple[Encoding, Encoding]:
    """Both encodings of a document, with loss masks (chat: assistant turns only).

    Plain documents keep `loss_mask=None` (every token a target) so that the
    alignment keeps chunks of special tokens matched on both sides.
    """
    encs = []
    for tok in (self.teacher, self.student):
      try:
        if "messages" in doc:
          family = self.cfg.chat_family
          if family == "auto":
            family = chat.detect_family(self.teacher)
          enc = chat.render_chat(tok, doc["messages"], family=family)
        else:
          enc = tok.encode(doc["text"])
          if self.cfg.add_eos:
            enc = _with_eos(enc, tok)
      except ValueError as e:  # TokenizerError: name the document that caused it
        raise DataError(f"{doc.get('origin', '?')}: cannot tokenize with "
                        f"{getattr(tok, 'name', tok)!r}: {e}") from e
      encs.append(enc)
    if encs[0].text != encs[1].text:
      raise DataError(
          f"{doc.get('origin', '?')}: the chat template {self.cfg.chat_family!r} renders "
          "different texts for the teacher and the student tokenizers, which cannot be "
          "aligned; use chat_family='plain' or a family whose markers both tokenizers have.")
    return encs[0], encs[1]

  def __call__(self, doc: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    cfg = self.cfg
    t, s = self.encode(doc)
    tc, sc = self.align_fn(t, s, constraint=cfg.align_constraint, teacher_tokenizer=self.teacher,
                           student_tokenizer=self.student)
    tc, sc = np.asarray(tc, np.int32), np.asarray(sc, np.int32)
    bounds = np.intersect1d(t.ends[~t.special], s.ends[~s.special])
    bos = [tok.bos_id if tok.add_bos and tok.bos_id is not None else None
           for tok in (self.teacher, self.student)]
    cap_t = cfg.teacher_len - (bos[0] is not None)
    cap_s = cfg.student_len - (bos[1] is not None)
    pieces = _pieces(t.ends, s.ends, bounds, cap_t, cap_s, len(t), len(s),
                     (cfg.teacher_len, cfg.student_len), cfg.long_documents == "split")
    n_chunks = int(max(tc.max(initial=-1), sc.max(initial=-1))) + 1
    tot_t = np.bincount(tc[tc >= 0], minlength=n_chunks)
    tot_s = np.bincount(sc[sc >= 0], minlength=n_chunks)
    out = []
    for i, (t_lo, t_hi, s_lo, s_hi) in enumerate(pieces):
      ptc, psc = tc[t_lo:t_hi], sc[s_lo:s_hi]
      # A chunk survives only if all its tokens on both sides are in the piece.
      whole = (np.bincount(ptc[ptc >= 0], minlength=n_chunks) == tot_t) & (
          np.bincount(psc[psc >= 0], minlength=n_chunks) == tot_s)
      whole = np.append(whole, False)  # slot n_chunks: "no chunk" (-1)
      keep_t = whole[np.where(ptc >= 0, ptc, n_chunks)]
      keep_s = whole[np.where(psc >= 0, psc, n_chunks)]
      # Renumber over both sides at once so the two sides keep the same ids.
      both = _compact(np.concatenate([ptc, psc]), np.concatenate([keep_t, keep_s]))
      ex = {}
      for side, enc, lo, hi, cid, b in (("teacher", t, t_lo, t_hi, both[:len(ptc)], bos[0]),
                                        ("student", s, s_lo, s_hi, both[len(ptc):], bos[1])):
        ids = enc.ids[lo:hi]
        mask = (~enc.special if enc.loss_mask is None else enc.loss_mask)[lo:hi]
        nbytes = (enc.ends[lo:hi] - enc.starts[lo:hi]).astype(np.int32)
        nbytes[enc.special[lo:hi]] = 0
        if i > 0 and b is not None:  # a continuation piece starts like a document
          ids = np.concatenate([[b], ids])
          cid = np.concatenate([[-1], cid])
          mask = np.concatenate([[False], mask])
          nbytes = np.concatenate([[0], nbytes])
        ex[f"{side}_ids"] = ids.astype(np.int32)
        ex[f"{side}_chunk_ids"] = cid.astype(np.int32)
        ex[f"{side}_loss_mask"] = mask.astype(bool)
        ex[f"{side}_num_bytes"] = nbytes.astype(np.int32)
      out.append(ex)
    return out


# ---------------------------------------------------------------------------
# Rows and batches.


class _Flatten(grain.transforms.FlatMap if hasattr(grain.transforms, "FlatMap")
               else grain_exp.FlatMapTransform):
  """Each document's list of pieces -> one element per piece."""

  def __init__(self, max_fan_out: int):
    self.max_fan_out = max_fan_out

  def flat_map(self, element):
    return element


def pad_example(ex: dict[str, np.ndarray], cfg: PipelineConfig, pad_ids=(0, 0)) -> dict:
  """One document as a fixed-length row (segment 1, positions from 0, padding after)."""
  row = {}
  for side, length, pad in (("teacher", cfg.teacher_len, pad_ids[0]),
                            ("student", cfg.student_len, pad_ids[1])):
    n = len(ex[f"{side}_ids"])
    fill = {"ids": pad, "chunk_ids": -1, "loss_mask": False, "num_bytes": 0}
    for f in _SEQ_FEATURES:
      a = ex[f"{side}_{f}"]
      row[f"{side}_{f}"] = np.concatenate([a, np.full(length - n, fill[f], a.dtype)])
    seg = np.zeros(length, np.int32)
    seg[:n] = 1
    pos = np.zeros(length, np.int32)
    pos[:n] = np.arange(n)
    row[f"{side}_segment_ids"], row[f"{side}_positions"] = seg, pos
  return finalize_row(row, pad_ids)


def finalize_row(row: dict[str, np.ndarray], pad_ids=(0, 0)) -> dict:
  """Fixes a packed/padded row: padding values, chunk ids unique across documents.

  Args:
    row: a row with `{side}_{ids,chunk_ids,loss_mask,num_bytes,segment_ids,positions}`.
    pad_ids: (teacher, student) pad id written on padding.

  Returns:
    The row with chunk ids renumbered `0..C-1` along the row (documents in
    order, so no id links two documents), -1 on padding; the chunk holding a
    document's first token on either side is dropped (-1: that token is never
    predicted, `alm.align`'s convention); loss mask False on padding and on each
    document's first token.
  """
  segs = (row["teacher_segment_ids"], row["student_segment_ids"])
  cids = (row["teacher_chunk_ids"].astype(np.int64), row["student_chunk_ids"].astype(np.int64))
  poss = (row["teacher_positions"], row["student_positions"])
  # Per-document ids 0..n-1 -> row-unique keys (segment, id).
  keys = [np.where((sg > 0) & (c >= 0), sg.astype(np.int64) * (1 << 32) + c, -1)
          for sg, c in zip(segs, cids)]
  dropped = np.concatenate([k[(p == 0) & (k >= 0)] for k, p in zip(keys, poss)])
  both = np.concatenate(keys)
  keep = (both >= 0) & ~np.isin(both, dropped)
  new = _compact(both, keep)
  n_t = len(keys[0])
  for side, sg, cid, pad in (("teacher", segs[0], new[:n_t], pad_ids[0]),
                             ("student", segs[1], new[n_t:], pad_ids[1])):
    row[f"{side}_chunk_ids"] = cid.astype(np.int32)
    row[f"{side}_loss_mask"] = row[f"{side}_loss_mask"] & (sg > 0) & (
        row[f"{side}_positions"] > 0)
    row[f"{side}_ids"] = np.where(sg > 0, row[f"{side}_ids"], pad).astype(np.int32)
    row[f"{side}_num_bytes"] = np.where(sg > 0, row[f"{side}_num_bytes"], 0).astype(np.int32)
  return row


def _rename_packed(row: dict[str, np.ndarray], pad_ids) -> dict:
  out = {}
  for side in SIDES:
    for f in _SEQ_FEATURES:
      out[f"{side}_{f}"] = row[f"{side}_{f}"]
    out[f"{side}_segment_ids"] = row[f"{side}_ids_segment_ids"].astype(np.int32)
    out[f"{side}_positions"] = row[f"{side}_ids_positions"].astype(np.int32)
  return finalize_row(out, pad_ids)


def _pad_id(tok: ByteTokenizer) -> int:
  pid = getattr(tok, "pad_id", None)
  if pid is None:
    pid = tok.eos_id if tok.eos_id is not None else 0
  return int(pid)


def build_dataset(source, teacher: ByteTokenizer, student: ByteTokenizer,
                  cfg: PipelineConfig, *, align_fn: Callable | None = None) -> grain.IterDataset:
  """The grain dataset of batches (see the module docstring for the stages).

  Args:
    source: a random-access source of documents (`alm.data.sources.open_source`).
    teacher: the teacher tokenizer.
    student: the student tokenizer.
    cfg: the pipeline options.
    align_fn: alignment function (default: `alm.align`).

  Returns:
    A `grain.IterDataset` yielding batch dicts of numpy arrays.
  """
  pad_ids = (_pad_id(teacher), _pad_id(student))
  ds = grain.MapDataset.source(source)
  if cfg.shard_count > 1:
    ds = ds[cfg.shard_index::cfg.shard_count]
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(DocumentProcessor(teacher, student, cfg, align_fn))
  it = ds.to_iter_dataset()
  if cfg.num_workers > 0:
    # grain's worker processes read absl flags; outside an absl app (a notebook,
    # pytest) they are unparsed and grain raises: use their defaults then.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  # Worst case a document splits into one piece per `len/1` tokens; bound generously.
  it = grain_exp.FlatMapIterDataset(it, _Flatten(max_fan_out=1 << 20))
  if cfg.mode == "pad":
    it = it.map(lambda ex: pad_example(ex, cfg, pad_ids))
  else:
    lengths = {f"{side}_{f}": (cfg.teacher_len if side == "teacher" else cfg.student_len)
               for side in SIDES for f in _SEQ_FEATURES}
    it = grain_exp.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=cfg.packing_bins or cfg.batch_size,
        seed=cfg.seed, shuffle_bins=False)
    it = it.map(lambda row: _rename_packed(row, pad_ids))
  return it.batch(cfg.batch_size, drop_remainder=True)


class Pipeline:
  """An iterator of batches with a checkpointable position.

  Example:
    >>> src = alm.data.sources.open_source("default")
    >>> pipe = Pipeline(src, teacher_tok, student_tok, PipelineConfig(batch_size=4))
    >>> batch = next(pipe); state = pipe.state()   # save `state` with the checkpoint
    >>> pipe2 = Pipeline(src, teacher_tok, student_tok, cfg); pipe2.restore(state)

  Args:
    source: documents (`open_source(...)`), or a spec string/path for it.
    teacher: the teacher tokenizer.
    student: the student tokenizer.
    cfg: the pipeline options.
    align_fn: alignment function (default: `alm.align`).
  """

  def __init__(self, source, teacher: ByteTokenizer, student: ByteTokenizer,
               cfg: PipelineConfig | None = None, *, align_fn: Callable | None = None):
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
      from alm.data.sources import open_source  # pylint: disable=import-outside-toplevel
      source = open_source(source)
    self.cfg = cfg or PipelineConfig()
    self.source = source
    self.dataset = build_dataset(source, teacher, student, self.cfg, align_fn=align_fn)
    self._it = iter(self.dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def state(self) -> dict[str, Any]:
    """The iterator position (a JSON-serialisable dict; save it with the checkpoint)."""
    return self._it.get_state()

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a position returned by `state()` (same source and config)."""
    self._it.set_state(state)

  def close(self) -> None:
    """Stops worker processes, if any."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
