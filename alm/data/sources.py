"""Random-access document sources for the input pipeline.

Every source is a grain random-access data source (`__len__`, `__getitem__`)
whose records are dicts: `{"text": str, "origin": "file:line"}` for plain
documents or `{"messages": [{"role", "content"}, ...], "origin": ...}` for
chat-formatted ones. Random access is what makes grain's shuffled, sharded,
checkpointable order possible.

Formats:
- JSONL (`.jsonl`, `.json`): one JSON object per line; the text is in
  `text_field` (default "text"), or a chat in `messages_field` (default
  "messages") when that key holds a list.
- Plain text (`.txt`, `.md`, `.rst`, anything else): `text_unit="paragraph"`
  (default) makes one document of every run of non-blank lines (documents are
  separated by one or more blank lines); "file" makes the whole file one
  document; "line" makes every non-empty line one.
- Parquet (`.parquet`, needs pyarrow): one document per row of `text_field`
  (or `messages_field`).
- Hugging Face `datasets` (only when installed): a `datasets.Dataset` object,
  or the spec `"hf:NAME[:SPLIT]"` (which resolves through the local HF cache).

Files are indexed once when the source is built: every line is checked to be
valid UTF-8 (and valid JSON with the right field, for JSONL), and a bad line
is an error naming the file and line. Empty lines are skipped and counted
(`num_skipped`), and logged. Only byte offsets are kept in memory; texts are
read back on access.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

TextUnit = Literal["paragraph", "file", "line"]
TEXT_UNITS: tuple[str, ...] = ("paragraph", "file", "line")
FORMATS: tuple[str, ...] = ("auto", "jsonl", "text", "parquet", "hf")


class DataError(ValueError):
  """A data file cannot be used; the message names the file, the line and the fix."""


def _utf8(raw: bytes, path: Path, lineno: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
        "Data files must be UTF-8; convert the file (e.g. `iconv -f latin1 -t utf-8`) or "
        "remove the line.") from None


def _check_messages(msgs: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(msgs, list) or not msgs:
    raise DataError(f"{where}: the messages field must be a non-empty list of "
                    "{'role': ..., 'content': ...} objects.")
  for m in msgs:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      raise DataError(f"{where}: every message needs string 'role' and 'content' keys; "
                      f"got {m!r:.120}.")
  return msgs


class _Indexed:
  """Shared random access over (file, byte offset, length, line) records."""

  def __init__(self):
    self.paths: list[Path] = []
    self._file: list[int] = []
    self._start: list[int] = []
    self._len: list[int] = []
    self._line: list[int] = []
    self.num_skipped = 0

  def _freeze(self):
    self._file_a = np.asarray(self._file, np.int32)
    self._start_a = np.asarray(self._start, np.int64)
    self._len_a = np.asarray(self._len, np.int64)
    self._line_a = np.asarray(self._line, np.int64)
    del self._file, self._start, self._len, self._line
    if self.num_skipped:
      logging.warning("%s: skipped %d empty line(s)/document(s).", self, self.num_skipped)
    if len(self) == 0:
      raise DataError(f"{self}: no documents found in {[str(p) for p in self.paths]}.")

  def __len__(self) -> int:
    return int(self._file_a.shape[0])

  @property
  def num_bytes(self) -> int:
    """Bytes of all the documents' records in the files (JSON syntax included), unread."""
    return int(self._len_a.sum())

  def _raw(self, i: int) -> tuple[bytes, str]:
    f = int(self._file_a[i])
    with open(self.paths[f], "rb") as fh:  # opened per access: safe in worker processes
      fh.seek(int(self._start_a[i]))
      raw = fh.read(int(self._len_a[i]))
    return raw, f"{self.paths[f]}:{int(self._line_a[i])}"


class JsonlSource(_Indexed):
  """Documents from JSONL files (one JSON object per line).

  Args:
    paths: the files.
    text_field: the key holding a plain document's text.
    messages_field: the key holding a chat (a list of role/content messages);
      when present on a line it wins over `text_field`.

  Raises:
    DataError: a line is not UTF-8, not a JSON object, or lacks both fields.
  """

  def __init__(self, paths: Sequence[str | Path], *, text_field: str = "text",
               messages_field: str = "messages"):
    super().__init__()
    self.text_field, self.messages_field = text_field, messages_field
    for path in map(Path, paths):
      self.paths.append(path)
      offset = 0
      with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
          n = len(raw)
          body = raw.strip()
          if not body:
            self.num_skipped += 1
          else:
            self._validate(_utf8(body, path, lineno), f"{path}:{lineno}")
            self._file.append(len(self.paths) - 1)
            self._start.append(offset)
            self._len.append(n)
            self._line.append(lineno)
          offset += n
    self._freeze()

  def _validate(self, line: str, where: str) -> dict:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}.")
    if isinstance(obj.get(self.messages_field), list):
      _check_messages(obj[self.messages_field], where)
    elif not isinstance(obj.get(self.text_field), str):
      strings = [k for k, v in sorted(obj.items()) if isinstance(v, str)]
      name = strings[0] if len(strings) == 1 else "..."  # the one candidate, when there is one
      raise DataError(
          f"{where}: no string field {self.text_field!r} (nor a list {self.messages_field!r}); "
          f"the line has keys {sorted(obj)}. Name the text field with --text_field={name} "
          f"(open_source(..., text_field={name!r}), TransferJob(text_field=...)).")
    return obj

  def __getitem__(self, i: int) -> dict:
    raw, where = self._raw(i)
    obj = json.loads(raw.decode("utf-8"))
    if isinstance(obj.get(self.messages_field), list):
      return {"messages": obj[self.messages_field], "origin": where}
    return {"text": obj[self.text_field], "origin": where}

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.paths)} file(s))"


class TextSource(_Indexed):
  """Documents from plain UTF-8 text files.

  Args:
    paths: the files.
    unit: "paragraph" (runs of non-blank lines, separated by blank lines),
      "file" (one document per file) or "line" (one per non-empty line).

  Raises:
    DataError: a line is not valid UTF-8 (the message names file and line).
  """

  def __init__(self, paths: Sequence[str | Path], *, unit: TextUnit = "paragraph"):
    super().__init__()
    if unit not in TEXT_UNITS:
      raise ValueError(f"Unknown text unit {unit!r}; valid units: {', '.join(TEXT_UNITS)}.")
    self.unit = unit
    for path in map(Path, paths):
      self.paths.append(path)
      fid = len(self.paths) - 1
      offset, start, first_line, end = 0, None, 0, 0
      with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
          _utf8(raw, path, lineno)
          blank = not raw.strip()
          if unit == "line":
            if blank:
              self.num_skipped += 1
            else:
              self._add(fid, offset, len(raw), lineno)
          elif unit == "paragraph" or unit == "file":
            if not blank:
              if start is None:
                start, first_line = offset, lineno
              end = offset + len(raw)
            elif unit == "paragraph" and start is not None:
              self._add(fid, start, end - start, first_line)
              start = None
          offset += len(raw)
      if unit != "line":
        if start is not None:
          self._add(fid, start, end - start, first_line)
        elif unit == "file":
          self.num_skipped += 1  # an all-blank file
    self._freeze()

  def _add(self, fid: int, start: int, length: int, line: int):
    self._file.append(fid)
    self._start.append(start)
    self._len.append(length)
    self._line.append(line)

  def __getitem__(self, i: int) -> dict:
    raw, where = self._raw(i)
    return {"text": raw.decode("utf-8").strip("\r\n"), "origin": where}

  def __repr__(self) -> str:
    return f"TextSource({len(self.paths)} file(s), unit={self.unit!r})"


class ParquetSource:
  """Documents from the rows of parquet files (read with pyarrow, column only).

  Args:
    paths: the files.
    text_field: the string column holding the text.
    messages_field: a list-of-struct column holding chats; used when present.
  """

  def __init__(self, paths: Sequence[str | Path], *, text_field: str = "text",
               messages_field: str = "messages"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    self.paths = [Path(p) for p in paths]
    self._rows: list[Any] = []
    self._where: list[str] = []
    self._chat = False
    self.num_skipped = 0
    for path in self.paths:
      names = pq.read_schema(path).names
      field = messages_field if messages_field in names else text_field
      if field not in names:
        raise DataError(f"{path}: no column {text_field!r} (nor {messages_field!r}); columns: "
                        f"{names}. Name the text column with --text_field=... "
                        "(open_source(..., text_field=...), TransferJob(text_field=...)).")
      self._chat = field == messages_field
      col = pq.read_table(path, columns=[field]).column(field).to_pylist()
      for r, v in enumerate(col):
        where = f"{path}:row {r}"
        if self._chat:
          _check_messages(v, where)
        elif not isinstance(v, str):
          raise DataError(f"{where}: column {field!r} holds {type(v).__name__}, not text.")
        elif not v.strip():
          self.num_skipped += 1
          continue
        self._rows.append(v)
        self._where.append(where)
    if self.num_skipped:
      logging.warning("%s: skipped %d empty row(s).", self, self.num_skipped)
    if not self._rows:
      raise DataError(f"{self}: no documents.")

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict:
    key = "messages" if self._chat else "text"
    return {key: self._rows[i], "origin": self._where[i]}

  def __repr__(self) -> str:
    return f"ParquetSource({len(self.paths)} file(s))"


class HFSource:
  """Documents from a Hugging Face `datasets.Dataset` (optional dependency).

  Args:
    dataset: a `datasets.Dataset`, or a name resolved with
      `datasets.load_dataset(name, split=split)` (the local cache works offline).
    split: the split to load when `dataset` is a name.
    text_field: the text column.
    messages_field: the chat column, used when present.
  """

  def __init__(self, dataset: Any, *, split: str = "train", text_field: str = "text",
               messages_field: str = "messages"):
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise DataError("Reading a Hugging Face dataset needs the `datasets` package "
                      "(`pip install datasets`); or export it to JSONL/parquet.") from e
    if isinstance(dataset, str):
      dataset = datasets.load_dataset(dataset, split=split)
    self.ds = dataset
    cols = list(dataset.column_names)
    self.field = messages_field if messages_field in cols else text_field
    if self.field not in cols:
      raise DataError(f"Hugging Face dataset has no column {text_field!r} (nor "
                      f"{messages_field!r}); columns: {cols}. Name the text column with "
                      "--text_field=... (open_source(..., text_field=...)).")
    self.num_skipped = 0

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    v = self.ds[int(i)][self.field]
    key = "text" if self.field != "messages" and isinstance(v, str) else "messages"
    return {key: v, "origin": f"hf[{i}]"}


def _expand(paths: str | Path | Sequence[str | Path]) -> list[Path]:
  if isinstance(paths, (str, Path)):
    paths = [paths]
  out: list[Path] = []
  for p in map(Path, paths):
    if p.is_dir():
      out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
    elif any(c in str(p) for c in "*?["):
      out.extend(sorted(Path(q) for q in glob.glob(str(p), recursive=True)))
    elif p.exists():
      out.append(p)
    else:
      raise DataError(f"Data file {p} does not exist.")
  if not out:
    raise DataError(f"No data files match {paths!r}.")
  return out


def open_source(spec: str | Path | Sequence[str | Path], *, format: str = "auto",
                text_field: str = "text", messages_field: str = "messages",
                text_unit: TextUnit = "paragraph"):
  """Opens the documents named by `spec` as a random-access source.

  Args:
    spec: a file, a directory, a glob, a list of files; `"default"` or
      `"default:heldout"` for the offline default corpus (`alm.data.corpus`);
      `"hf:NAME[:SPLIT]"` for a Hugging Face dataset.
    format: "auto" (by file suffix), "jsonl", "text", "parquet" or "hf".
    text_field: JSONL key / parquet column of the text.
    messages_field: JSONL key / parquet column of a chat.
    text_unit: how plain-text files split into documents (see `TextSource`).

  Returns:
    A source with `__len__` and `__getitem__` returning document dicts.
  """
  if format not in FORMATS:
    raise ValueError(f"Unknown data format {format!r}; valid formats: {', '.join(FORMATS)}.")
  if isinstance(spec, str) and spec.split(":")[0] == "default":
    from alm.data import corpus  # pylint: disable=import-outside-toplevel
    split = spec.split(":", 1)[1] if ":" in spec else "train"
    return JsonlSource(corpus.default_corpus(split))  # type: ignore[arg-type]
  if format == "hf" or (isinstance(spec, str) and spec.startswith("hf:")):
    name, _, split = str(spec).removeprefix("hf:").partition(":")
    return HFSource(name, split=split or "train", text_field=text_field,
                    messages_field=messages_field)
  paths = _expand(spec)
  if format == "auto":
    kinds = {("jsonl" if p.suffix in (".jsonl", ".json") else
              "parquet" if p.suffix == ".parquet" else "text") for p in paths}
    if len(kinds) > 1:
      raise DataError(f"Mixed data formats {sorted(kinds)} in {spec!r}; pass one kind of "
                      "file, or set format=.")
    format = kinds.pop()
  if format == "jsonl":
    return JsonlSource(paths, text_field=text_field, messages_field=messages_field)
  if format == "parquet":
    return ParquetSource(paths, text_field=text_field, messages_field=messages_field)
  return TextSource(paths, unit=text_unit)
