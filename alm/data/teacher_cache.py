"""The teacher cache (SPEC §15, docs/method.md §13): aligned rows + the teacher's outputs.

Everything the ALM terms read from a frozen teacher is two floats per teacher
token, the path log-prob and the boundary log-prob (`alm.losses.chunks.
token_logprobs`). A cache stores, for each row of a run's data pipeline in the
pipeline's order, the row itself (the batch arrays of `alm.data.pipeline`:
both tokenizations, chunk ids, masks, ...) and those two float32 arrays
(`teacher_path_logprobs`, `teacher_boundary_logprobs`, [teacher_len]). A run
reading it gets batch k of the cache where the live run gets batch k of the
pipeline, with the teacher's part already computed, so the step never runs the
teacher (`alm.training.step`).

Layout of a cache directory:

  cache.json              manifest: format, fingerprint (+ its digest), shards
                          (file, rows, bytes, sha256), rows, complete, the
                          command that builds it
  rows-p0-00000.array_record ...   shards of `rows_per_shard` rows (process 0)

Why ArrayRecord: grain reads it by index without loading it whole
(`grain.sources.ArrayRecordDataSource`), a run resumes at any batch by index,
and a row is one record (the row's arrays with `np.save`'s self-describing
header: dtype and shape travel with the data; no schema to keep in step with
the pipeline, as Parquet would need). Shards are written aside and renamed
into place, and the manifest is rewritten after each one (atomically), so an
interrupted build resumes after its last complete shard and a reader never
sees half a shard.

Checks: the manifest's fingerprint must equal the run's (the teacher's files,
both vocabularies, data, lengths, chunk constraint, dtype, seed, batch size,
...; the differing fields are named with the command that builds the right
cache); every shard must be present with its recorded size and sha256
(`verify=True`, read once before training); a run needing more rows than the
cache holds is refused before it starts. Nothing is recomputed silently.

Held-out sets: `heldout/main/` (the run's held-out data) and `heldout/set-<label>/`
(each extra set, the teacher's samples) are caches of the same layout whose
rows are the held-out pipeline's rows with the teacher's bits, bytes and
tokens of each row (`HELDOUT_BITS_KEY`), so a run's held-out evaluation reads
the teacher side instead of running it. Each has its own fingerprint (the
set's data, the evaluation shapes, the teacher and both vocabularies); the
same build command adds a set that a run needs and the cache lacks.

Multi-host: each process writes and reads its own shards and manifest
(`cache-p{i}.json`; process 0's is `cache.json`), built from its own data
shard (the held-out sets are the same on every process; each keeps a copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from alm.data.sources import DataError

FORMAT = "alm-teacher-cache"
FORMAT_VERSION = 2
# What a cache row adds to a pipeline row.
CACHE_KEYS = ("teacher_path_logprobs", "teacher_boundary_logprobs")
HIDDEN_KEY = "teacher_hidden@{layer}"  # [teacher_len, D] of one teacher layer, when cached
# A held-out row's teacher side: [3] float32 (bits, predicted bytes, predicted tokens) of
# the teacher's path (`alm.training.step.path_bits(..., per_row=True)`).
HELDOUT_BITS_KEY = "teacher_row_bits"
HELDOUT_DIR = "heldout"


class TeacherCacheError(DataError):
  """A teacher cache that cannot be used (missing, incomplete, corrupt, or another run's)."""


def manifest_name(process_index: int = 0) -> str:
  return "cache.json" if process_index == 0 else f"cache-p{process_index}.json"


def heldout_dir(directory, label: str) -> Path:
  """Where a cache keeps the held-out set `label` ("" is the run's main set)."""
  if not label:
    return Path(directory) / HELDOUT_DIR / "main"
  safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in label)
  if safe != label:  # two labels never share a directory
    safe += "-" + hashlib.sha256(label.encode()).hexdigest()[:8]
  return Path(directory) / HELDOUT_DIR / f"set-{safe}"


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
  """A short hash of a JSON-serialisable fingerprint (keys sorted)."""
  text = json.dumps(fingerprint, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def encode_row(row: dict[str, np.ndarray]) -> bytes:
  """One row (a dict of arrays) as bytes: a JSON header [[key, dtype], ...], then each
  array's `np.save` (bfloat16 travels as its uint16 bits)."""
  buf = io.BytesIO()
  keys = sorted(row)
  arrays = [np.asarray(row[k]) for k in keys]
  header = json.dumps([[k, a.dtype.name] for k, a in zip(keys, arrays)]).encode()
  buf.write(len(header).to_bytes(4, "little") + header)
  for a in arrays:
    np.save(buf, a.view(np.uint16) if a.dtype.name == "bfloat16" else a, allow_pickle=False)
  return buf.getvalue()


def decode_row(data: bytes) -> dict[str, np.ndarray]:
  """The inverse of `encode_row`."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO(data)
  n = int.from_bytes(buf.read(4), "little")
  out = {}
  for k, dtype in json.loads(buf.read(n)):
    a = np.load(buf, allow_pickle=False)
    out[k] = a.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else a
  return out


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
  os.replace(tmp, path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted names of the fields where two JSON values differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b), key=str):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1] or '(all)'}: cache {a!r} vs run {b!r}"]


class CacheWriter:
  """Writes rows into a cache directory in shards, resumably.

  Args:
    directory: the cache directory (created).
    fingerprint: what the cache depends on (JSON-serialisable).
    rows_per_shard: rows per shard file.
    command: the command that builds this cache (recorded; quoted in errors).
    process_index: this process's index (multi-host: one manifest each).

  Raises:
    TeacherCacheError: the directory holds a cache with another fingerprint.
  """

  def __init__(self, directory, fingerprint: dict[str, Any], *, rows_per_shard: int = 1024,
               command: str = "", process_index: int = 0):
    if rows_per_shard < 1:
      raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
    self.dir = Path(directory)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.path = self.dir / manifest_name(process_index)
    self.process_index = process_index
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    digest = fingerprint_digest(fingerprint)
    if self.path.exists():
      old = json.loads(self.path.read_text())
      if old.get("digest") != digest:
        diffs = _diff(old.get("fingerprint", {}), fingerprint)
        raise TeacherCacheError(
            f"{self.dir} already holds a teacher cache of another run ({'; '.join(diffs[:6])}). "
            "Build into a new --out_dir, or delete that directory first.")
      self.manifest = old
      # Shards listed in the manifest are complete; anything else is a leftover.
      for shard in self.manifest["shards"]:
        if not (self.dir / shard["file"]).exists():
          raise TeacherCacheError(f"{self.dir / shard['file']} is listed in {self.path} but "
                                  "missing; delete the directory and build the cache again.")
    else:
      self.manifest = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
                       "digest": digest, "rows_per_shard": int(rows_per_shard), "shards": [],
                       "rows": 0, "complete": False, "command": command, "stats": {}}
      _write_json_atomic(self.path, self.manifest)
    self.rows_per_shard = int(self.manifest["rows_per_shard"])
    self._pending: list[bytes] = []

  @property
  def rows_done(self) -> int:
    """Rows already in complete shards (a resumed build skips them)."""
    return int(self.manifest["rows"])

  @property
  def complete(self) -> bool:
    return bool(self.manifest["complete"])

  def add(self, rows: Iterable[dict[str, np.ndarray]]) -> None:
    """Queues rows; writes a shard whenever `rows_per_shard` are queued."""
    for row in rows:
      self._pending.append(encode_row(row))
      if len(self._pending) == self.rows_per_shard:
        self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    name = f"rows-p{self.process_index}-{len(self.manifest['shards']):05d}.array_record"
    final = self.dir / name
    tmp = self.dir / (name + ".tmp")
    w = ArrayRecordWriter(str(tmp), "group_size:1")
    for rec in self._pending:
      w.write(rec)
    w.close()
    os.replace(tmp, final)
    self.manifest["shards"].append({"file": name, "rows": len(self._pending),
                                    "bytes": final.stat().st_size, "sha256": _sha256(final)})
    self.manifest["rows"] += len(self._pending)
    self._pending = []
    _write_json_atomic(self.path, self.manifest)

  def finish(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes the last (partial) shard and marks the cache complete; returns the manifest."""
    self._flush()
    self.manifest["complete"] = True
    self.manifest["stats"].update(stats or {})
    _write_json_atomic(self.path, self.manifest)
    return self.manifest


class TeacherCache:
  """A complete, verified teacher cache, read by row index (grain's ArrayRecord source).

  Args:
    directory: the cache directory.
    fingerprint: the run's fingerprint; a cache with another is refused
      (None: not checked, e.g. to inspect a cache). Its "hidden" entry
      (the cached hidden layers) is not compared here: a run checks that the
      cache has the layers it reads (`hidden_layers`).
    build_command: the command that builds the right cache (quoted in errors).
    verify: check every shard's sha256 now (reads the whole cache once).
    process_index: this process's index.

  Raises:
    TeacherCacheError: no cache there, an unfinished build, another run's
      cache, a missing / truncated / corrupt shard.
  """

  def __init__(self, directory, fingerprint: dict[str, Any] | None = None, *,
               build_command: str = "", verify: bool = True, process_index: int = 0):
    self.dir = Path(directory)
    fix = f" Build it with: {build_command}" if build_command else ""
    path = self.dir / manifest_name(process_index)
    if not path.exists():
      raise TeacherCacheError(f"No teacher cache at {self.dir} (no {path.name}).{fix}")
    try:
      self.manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise TeacherCacheError(f"{path} is not a valid cache manifest ({e}).{fix}") from None
    m = self.manifest
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
      raise TeacherCacheError(f"{path} is not an alm teacher cache of version {FORMAT_VERSION} "
                              f"(format {m.get('format')!r}, version {m.get('version')!r}).{fix}")
    if not m.get("complete"):
      raise TeacherCacheError(
          f"The teacher cache at {self.dir} is unfinished ({m.get('rows', 0)} rows so far): its "
          f"build was interrupted. Run its command again to finish it: {m.get('command') or '?'}")
    if fingerprint is not None:
      want = json.loads(json.dumps(fingerprint, default=str))
      have = m.get("fingerprint", {})
      drop = lambda fp: {k: v for k, v in fp.items() if k != "hidden"}
      if drop(have) != drop(want):
        diffs = _diff(drop(have), drop(want))
        raise TeacherCacheError(
            f"The teacher cache at {self.dir} was built for another run: "
            f"{'; '.join(diffs[:8]) or 'fingerprints differ'}. Nothing is recomputed silently; "
            f"build a cache for this run.{fix}")
    for shard in m["shards"]:
      f = self.dir / shard["file"]
      if not f.exists():
        raise TeacherCacheError(f"Shard {f} of the teacher cache is missing.{fix}")
      size = f.stat().st_size
      if size != shard["bytes"]:
        raise TeacherCacheError(f"Shard {f} has {size} bytes, the manifest says "
                                f"{shard['bytes']}: it is truncated or was replaced.{fix}")
      if verify and _sha256(f) != shard["sha256"]:
        raise TeacherCacheError(f"Shard {f} is corrupt (its sha256 differs from the "
                                f"manifest's).{fix}")
    self.build_command = build_command
    self.num_rows = int(m["rows"])
    import grain  # pylint: disable=import-outside-toplevel
    paths = [str(self.dir / s["file"]) for s in m["shards"]]
    self.source = grain.sources.ArrayRecordDataSource(paths) if paths else []
    if len(self.source) != self.num_rows:
      raise TeacherCacheError(f"The shards of {self.dir} hold {len(self.source)} rows, the "
                              f"manifest says {self.num_rows}.{fix}")

  @property
  def hidden_layers(self) -> tuple[int, ...]:
    """The teacher layers whose hidden states the cache holds."""
    return tuple(self.manifest["fingerprint"].get("hidden", {}).get("layers", ()))

  @property
  def stats(self) -> dict[str, Any]:
    return dict(self.manifest.get("stats", {}))

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    try:
      return decode_row(self.source[int(i)])
    except (ValueError, OSError, EOFError, json.JSONDecodeError) as e:
      raise TeacherCacheError(f"Row {i} of the teacher cache at {self.dir} cannot be read "
                              f"({e}); the cache is corrupt: build it again.") from None

  def all_batches(self, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every row, in order, as batches of `batch_size` (a held-out set's batches)."""
    if len(self) % batch_size:
      raise TeacherCacheError(f"The teacher cache at {self.dir} holds {len(self)} rows, not "
                              f"whole batches of {batch_size}; build it again.")
    return [next(CacheBatches(self, batch_size, start=i)) for i in range(0, len(self),
                                                                         batch_size)]

  def batches(self, batch_size: int, *, steps: int | None = None) -> "CacheBatches":
    """The cache's rows as batches in order (step k reads rows k*B .. k*B + B - 1)."""
    return CacheBatches(self, batch_size, steps=steps)


class CacheBatches:
  """Batches of a `TeacherCache` with the `Pipeline` interface (state, restore, close).

  Raises:
    TeacherCacheError: `steps` batches need more rows than the cache holds
      (at construction), or the cache runs out.
  """

  teacher_cache = True  # the trainer's step reads the teacher's outputs from the batches

  def __init__(self, cache: TeacherCache, batch_size: int, *, steps: int | None = None,
               start: int = 0):
    self.cache, self.batch_size, self.pos = cache, int(batch_size), int(start)
    if steps is not None and steps * self.batch_size > len(cache):
      raise TeacherCacheError(
          f"The teacher cache at {cache.dir} holds {len(cache)} rows = "
          f"{len(cache) // self.batch_size} steps of batch {self.batch_size}; this run needs "
          f"{steps}. Build a larger cache (--steps={steps})"
          + (f": {cache.build_command}" if cache.build_command else "."))

  @property
  def num_skipped(self) -> int:
    """Bad documents the cache's build skipped (all of them, whatever the position)."""
    return int(self.cache.stats.get("skipped_documents", 0))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.pos + self.batch_size > len(self.cache):
      raise TeacherCacheError(f"The teacher cache at {self.cache.dir} ran out after "
                              f"{self.pos} rows; build a larger one.")
    rows = [self.cache[i] for i in range(self.pos, self.pos + self.batch_size)]
    self.pos += self.batch_size
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def state(self) -> dict[str, Any]:
    return {"cache_row": self.pos, "cache_digest": self.cache.manifest["digest"]}

  def restore(self, state: dict[str, Any]) -> None:
    if state.get("cache_digest") != self.cache.manifest["digest"]:
      raise TeacherCacheError("The checkpoint's data position is not one of this teacher "
                              f"cache ({self.cache.dir}); resume with the cache it was "
                              "trained on.")
    self.pos = int(state["cache_row"])

  def close(self) -> None:
    pass


def split_rows(batch: dict[str, np.ndarray], keys: Sequence[str] | None = None
               ) -> list[dict[str, np.ndarray]]:
  """A batch dict of [B, ...] arrays -> B row dicts (only `keys`, default all)."""
  keys = list(keys or batch)
  n = len(batch[keys[0]])
  return [{k: np.asarray(batch[k][i]) for k in keys} for i in range(n)]


def log_manifest(m: dict[str, Any]) -> None:
  logging.info("Teacher cache: %d rows in %d shards, %.1f MB", m["rows"], len(m["shards"]),
               sum(s["bytes"] for s in m["shards"]) / 1e6)
