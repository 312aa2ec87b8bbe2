"""The grain input pipeline: documents -> teacher/student token batches with chunk ids.

    source --(shard, shuffle(seed), repeat)--> per-document work in the workers:
      both tokenizations, the alignment (docs/method.md §2), loss masks, the cut
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

Documents a tokenizer cannot spell exactly: when either tokenizer NFC-normalizes
its input (Qwen3's does), a text that is not in NFC cannot be spelled by its
tokens, so the text is normalized once, before both tokenizations
(`text_normalization="auto"`): one text, both tokenizations of it. What is
left (a lone surrogate, a byte a vocabulary lacks) follows `bad_documents`:
"skip" (default: a long run must not die at the one bad document it reaches,
again at the same place on every resume) drops the document, counts it
(`Pipeline.num_skipped`, part of the checkpointable state) and logs the first
`LOGGED_BAD_DOCUMENTS` reasons; "error" raises `BadDocumentError` naming the
document, the tokenizer's reason and the fix. `check_documents` finds such a
document in one pass before training when the data is small enough
(`SCAN_MAX_DOCUMENTS`, `SCAN_MAX_BYTES`).

Batches are dicts of numpy arrays, `B = batch_size`, `Tt = teacher_len`,
`Ts = student_len`:
  teacher_ids / student_ids               int32 [B, Tt] / [B, Ts] (pad: pad_id)
  teacher_chunk_ids / student_chunk_ids   int32, -1 outside any chunk
  teacher_loss_mask / student_loss_mask   bool, True on training targets
  teacher_segment_ids / student_segment_ids  int32, 0 on padding
  teacher_positions / student_positions   int32
  teacher_num_bytes / student_num_bytes   int32, text bytes of each token (for
                                          bits per byte; 0 for specials/padding)
  teacher_text_continues / student_text_continues
                                          bool, True on every token of a piece
                                          cut from a longer document (its text
                                          continues past the piece's end)
"""

from __future__ import annotations

import dataclasses
import logging
import unicodedata
from typing import Any, Callable, Literal, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from alm._validation import check_choice
from alm.data.sources import DataError
from alm.tokenization import chat
from alm.tokenization.alignment import align
from alm.tokenization.base import ByteTokenizer, Encoding

Mode = Literal["pad", "pack"]
LongDocuments = Literal["truncate", "split"]
BadDocuments = Literal["skip", "error"]
TextNormalization = Literal["auto", "nfc", "none"]
MODES: tuple[str, ...] = ("pad", "pack")
LONG_DOCUMENTS: tuple[str, ...] = ("truncate", "split")
BAD_DOCUMENTS: tuple[str, ...] = ("skip", "error")
TEXT_NORMALIZATIONS: tuple[str, ...] = ("auto", "nfc", "none")
# Skipped documents whose reason is logged (the rest are only counted: a corpus
# with a million bad lines must not flood the log).
LOGGED_BAD_DOCUMENTS = 5
# This many skipped documents in a row means the data or the tokenizer pair is
# wrong (or every document is bad): an error instead of an endless search.
MAX_SKIPPED_IN_A_ROW = 1000
# `check_documents` scans data up to this size before training (two
# tokenizations at ~0.4 MB/s on a shared 2-core CPU for Qwen3 + SmolLM2: ~10 s).
SCAN_MAX_DOCUMENTS = 20_000
SCAN_MAX_BYTES = 4 << 20


class BadDocumentError(DataError):
  """One document cannot be tokenized exactly; the message names it and the fix.

  Attributes:
    reason: the document and the tokenizer's message, without the fix.
  """

  def __init__(self, message: str, *, reason: str | None = None):
    super().__init__(message)
    self.reason = reason or message


@dataclasses.dataclass(frozen=True)
class _Skipped:
  """What the per-document work returns for a bad document under "skip"."""

  reason: str
SIDES = ("teacher", "student")
_SEQ_FEATURES = ("ids", "chunk_ids", "loss_mask", "num_bytes", "text_continues")


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
    bad_documents: a document a tokenizer cannot spell exactly: "skip" it
      (counted, the first reasons logged) or raise an "error" naming it.
    text_normalization: "auto" (NFC when either tokenizer NFC-normalizes its
      input, else none), "nfc" or "none"; applied to the text once, before
      both tokenizations, so both sides spell the same bytes.
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
  bad_documents: BadDocuments = "skip"
  text_normalization: TextNormalization = "auto"

  def __post_init__(self):
    check_choice("mode", self.mode, MODES)
    check_choice("long_documents", self.long_documents, LONG_DOCUMENTS)
    for name in ("batch_size", "teacher_len", "student_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.teacher_len < 2 or self.student_len < 2:
      raise ValueError("teacher_len and student_len must be >= 2 (a row needs a target).")
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f"Need 0 <= shard_index < shard_count, got {self.shard_index}, "
                       f"{self.shard_count}.")
    check_choice("chat_family", self.chat_family, chat.FAMILIES + ("auto",))
    if self.num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {self.num_workers}.")
    check_choice("bad_documents", self.bad_documents, BAD_DOCUMENTS)
    check_choice("text_normalization", self.text_normalization, TEXT_NORMALIZATIONS)


def _normalizes_nfc(tok: ByteTokenizer) -> bool:
  # `VocabTokenizer.normalize` gives the form a tokenizer encodes exactly; NFC is the
  # only normalization a lossless tokenizer may apply (lossy ones are refused at load).
  normalize = getattr(tok, "normalize", None)
  return normalize is not None and normalize("e\u0301") != "e\u0301"


def resolve_text_normalization(option: str, teacher: ByteTokenizer,
                               student: ByteTokenizer) -> str:
  """The normalization a pipeline applies: "nfc" or "none" (resolves "auto").

  Args:
    option: `PipelineConfig.text_normalization`.
    teacher: the teacher tokenizer.
    student: the student tokenizer.

  Returns:
    "nfc" when `option` is "nfc", or is "auto" and either tokenizer
    NFC-normalizes (it cannot spell the bytes of non-NFC text); else "none".
  """
  if option == "auto":
    return "nfc" if _normalizes_nfc(teacher) or _normalizes_nfc(student) else "none"
  return option


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
    self.normalization = resolve_text_normalization(cfg.text_normalization, teacher, student)
    self._chat_family: str | None = None  # checked on the first chat document

  def _family(self, origin: str) -> str:
    """The chat family, checked once against both tokenizers with a probe chat.

    A family whose markers a tokenizer lacks fails every chat document: that is
    a configuration error, raised whatever `bad_documents` says.
    """
    if self._chat_family is None:
      family = self.cfg.chat_family
      probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
      try:
        if family == "auto":
          family = chat.detect_family(self.teacher)
        for tok in (self.teacher, self.student):
          chat.render_chat(tok, probe, family=family)
      except ValueError as e:
        raise DataError(f"{origin}: cannot render chats with chat_family="
                        f"{self.cfg.chat_family!r}: {e}") from e
      self._chat_family = family
    return self._chat_family

  def _normalized(self, doc: dict[str, Any]) -> dict[str, Any]:
    if self.normalization != "nfc":
      return doc
    nfc = lambda x: unicodedata.normalize("NFC", x) if isinstance(x, str) else x
    if "messages" in doc:
      return {**doc, "messages": [{**m, "content": nfc(m["content"])} for m in doc["messages"]]}
    return {**doc, "text": nfc(doc["text"])}

  def _fix_hint(self, message: str) -> str:
    hint = (" Skip such documents (counted and logged) with --bad_documents=skip "
            "(PipelineConfig(bad_documents='skip')).")
    if self.normalization == "none" and "NFC" in message:
      hint += (" Or normalize the text before both tokenizations with "
               "--text_normalization=auto (PipelineConfig(text_normalization='auto')).")
    return hint

  def encode(self, doc: dict[str, Any]) -> tuple[Encoding, Encoding]:
    """Both encodings of a document, with loss masks (chat: assistant turns only).

    Plain documents keep `loss_mask=None` (every token a target) so that the
    alignment keeps chunks of special tokens matched on both sides. The text is
    normalized first when `self.normalization` is "nfc".

    Raises:
      BadDocumentError: a tokenizer cannot spell this document exactly.
      alm.data.sources.DataError: the chat family does not fit the tokenizers.
    """
    origin = doc.get("origin", "?")
    family = self._family(origin) if "messages" in doc else None
    doc = self._normalized(doc)
    encs = []
    for tok in (self.teacher, self.student):
      try:
        if family is not None:
          enc = chat.render_chat(tok, doc["messages"], family=family)
        else:
          enc = tok.encode(doc["text"])
          if self.cfg.add_eos:
            enc = _with_eos(enc, tok)
      except ValueError as e:  # TokenizerError: name the document that caused it
        reason = f"{origin}: cannot tokenize with {getattr(tok, 'name', tok)!r}: {e}"
        raise BadDocumentError(reason + self._fix_hint(str(e)), reason=reason) from e
      encs.append(enc)
    if encs[0].text != encs[1].text:
      raise DataError(
          f"{doc.get('origin', '?')}: the chat template {self.cfg.chat_family!r} renders "
          "different texts for the teacher and the student tokenizers, which cannot be "
          "aligned; use chat_family='plain' or a family whose markers both tokenizers have.")
    return encs[0], encs[1]

  def __call__(self, doc: dict[str, Any]) -> list[dict[str, np.ndarray]] | _Skipped:
    """The document's row-sized examples (a `_Skipped` marker for a bad one under "skip")."""
    cfg = self.cfg
    try:
      t, s = self.encode(doc)
    except BadDocumentError as e:
      if cfg.bad_documents == "error":
        raise
      # Dropped downstream (`_SkipBadDocuments`), in the calling process: the count
      # then lives in the iterator's state even when workers do this work.
      return _Skipped(e.reason)
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
      continues = bool(t_hi < len(t) or s_hi < len(s))
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
        # The piece ends at a cut, not at the document's end: the loss must not
        # treat the boundary after its last chunk as the end of the text.
        ex[f"{side}_text_continues"] = np.full(len(ids), continues, bool)
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


class _SkipCount:
  """The number of skipped documents, shared by a `Pipeline` and its iterator."""

  def __init__(self):
    self.n = 0


class _SkipBadDocuments(grain.IterDataset):
  """Drops `_Skipped` markers, counting them; the count is part of the iterator state.

  Keeping the count in the state of this stage (not in a side counter) keeps it
  exact under grain's checkpointing: a stage downstream that restores and re-reads
  it (the packer re-reads its open bins) re-counts the same documents.
  """

  def __init__(self, parent: grain.IterDataset, count: _SkipCount):
    super().__init__(parent)
    self._count = count

  def __iter__(self):
    return _SkipBadDocumentsIterator(self._parent.__iter__(), self._count)


class _SkipBadDocumentsIterator(grain.DatasetIterator):
  """Iterator of `_SkipBadDocuments`."""

  def __init__(self, parent, count: _SkipCount):
    super().__init__(parent)
    self._count = count
    self._skipped = 0
    self._run = 0  # skipped in a row

  def __next__(self):
    while True:
      element = next(self._parent)
      if not isinstance(element, _Skipped):
        self._run = 0
        return element
      self._skipped += 1
      self._run += 1
      self._count.n = self._skipped
      if self._skipped <= LOGGED_BAD_DOCUMENTS:
        logging.warning("Skipped document %s%s", element.reason,
                        "" if self._skipped < LOGGED_BAD_DOCUMENTS else
                        " (further skipped documents are counted, not logged)")
      if self._run >= MAX_SKIPPED_IN_A_ROW:
        raise DataError(
            f"{self._run} documents in a row could not be tokenized (the last: "
            f"{element.reason}); the data or the tokenizer pair is wrong, or no document is "
            "usable. Pass bad_documents='error' (--bad_documents=error) to stop at the first.")

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped_documents": self._skipped,
            "skipped_in_a_row": self._run}

  def set_state(self, state: dict[str, Any]) -> None:
    if "skipped_documents" not in state:  # a state saved before this stage existed
      state = {"parent": state, "skipped_documents": 0, "skipped_in_a_row": 0}
    self._parent.set_state(state["parent"])
    self._skipped, self._run = int(state["skipped_documents"]), int(state["skipped_in_a_row"])
    self._count.n = self._skipped


def pad_example(ex: dict[str, np.ndarray], cfg: PipelineConfig, pad_ids=(0, 0)) -> dict:
  """One document as a fixed-length row (segment 1, positions from 0, padding after)."""
  row = {}
  for side, length, pad in (("teacher", cfg.teacher_len, pad_ids[0]),
                            ("student", cfg.student_len, pad_ids[1])):
    n = len(ex[f"{side}_ids"])
    fill = {"ids": pad, "chunk_ids": -1, "loss_mask": False, "num_bytes": 0,
            "text_continues": False}
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
    row[f"{side}_text_continues"] = (row[f"{side}_text_continues"].astype(bool) & (sg > 0))
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
                  cfg: PipelineConfig, *, align_fn: Callable | None = None,
                  skip_count: _SkipCount | None = None) -> grain.IterDataset:
  """The grain dataset of batches (see the module docstring for the stages).

  Args:
    source: a random-access source of documents (`alm.data.sources.open_source`).
    teacher: the teacher tokenizer.
    student: the student tokenizer.
    cfg: the pipeline options.
    align_fn: alignment function (default: `alm.align`).
    skip_count: receives the number of skipped bad documents (`Pipeline`
      passes its own).

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
  it = _SkipBadDocuments(it, skip_count or _SkipCount())
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
    self.normalization = resolve_text_normalization(self.cfg.text_normalization, teacher,
                                                    student)
    self._skips = _SkipCount()
    self.dataset = build_dataset(source, teacher, student, self.cfg, align_fn=align_fn,
                                 skip_count=self._skips)
    self._it = iter(self.dataset)

  @property
  def num_skipped(self) -> int:
    """Bad documents skipped so far (read ahead of the batches by at most the packer's
    open bins; restored with `restore`, so cumulative over a resumed run)."""
    return self._skips.n

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


def _text_bytes(doc: dict[str, Any]) -> int:
  if "messages" in doc:
    return sum(len(m.get("content", "")) for m in doc["messages"])
  return len(doc.get("text", ""))


def check_documents(source, teacher: ByteTokenizer, student: ByteTokenizer,
                    cfg: PipelineConfig | None = None, *, max_documents: int = SCAN_MAX_DOCUMENTS,
                    max_bytes: int = SCAN_MAX_BYTES) -> int | None:
  """Tokenizes every document once, to find a bad one before training starts.

  For `bad_documents="error"` on data small enough to scan in seconds: the
  error then comes before the model loads, not when the document is reached.

  Args:
    source: documents (`open_source(...)` or a list of document dicts).
    teacher: the teacher tokenizer.
    student: the student tokenizer.
    cfg: the pipeline options (normalization, chat family, EOS).
    max_documents: scan only sources with at most this many documents.
    max_bytes: ... and at most about this many bytes of text (characters are
      counted, which is exact for ASCII).

  Returns:
    The number of documents checked, or None when the source is too large to
    check (it is then checked as it is read).

  Raises:
    BadDocumentError: the first document a tokenizer cannot spell exactly
      (names the document, the reason and the fix).
  """
  cfg = cfg or PipelineConfig()
  n = len(source)
  if n > max_documents:
    return None
  size = getattr(source, "num_bytes", None)  # indexed files know it without reading
  if size is not None:
    if size > max_bytes:
      return None
  elif sum(_text_bytes(source[i]) for i in range(n)) > max_bytes:
    return None
  proc = DocumentProcessor(teacher, student, dataclasses.replace(cfg, bad_documents="error"))
  for i in range(n):
    proc.encode(source[i])
  return n
