"""The offline default corpus: natural-ish English text available on every machine.

No dataset hub is reachable here, so the default training and held-out text is
built at set-up (or on first use) from text every Python installation carries:

- `stdlib`: the docstrings (module, class, function) and multi-line comment
  blocks of the Python standard library's own sources, and the language
  reference topics of `pydoc_data.topics`. Prose-like English, not raw code:
  code is a poor stand-in for "natural text" and makes bits-per-byte numbers
  hard to compare with the paper's.
- `python-doc` (optional): the reStructuredText sources of the Python manual
  (tutorial, how-tos, FAQ, reference, library) from Debian's `python3.11-doc`.
- `fortunes` (optional): Debian's `fortunes` quotes and jokes.

The two Debian sources are fetched with `apt-get download` + `dpkg -x` into the
cache (`fetch_debian`); they need apt and the Debian mirror, so they are opt-in
and the stdlib-only corpus works on its own.

Documents are split at blank lines into pieces of at most `max_doc_bytes`,
deduplicated, and assigned to `train` or `heldout` by a hash of their text, so
the split is deterministic, independent of file order, and no held-out text is
ever in the training shards. Shards are JSONL files (`{"text": ...}` per line)
under `alm.assets.cache_dir()/corpus/<key>/`, written atomically.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tokenize
from pathlib import Path
from typing import Iterable, Iterator, Literal

from alm import assets

Split = Literal["train", "heldout"]
Source = Literal["stdlib", "python-doc", "fortunes"]
SPLITS: tuple[str, ...] = ("train", "heldout")
SOURCES: tuple[str, ...] = ("stdlib", "python-doc", "fortunes")
DEBIAN_PACKAGES: dict[str, str] = {"python-doc": "python3.11-doc", "fortunes": "fortunes"}

# Bump when the extraction changes, so stale caches are not reused.
CORPUS_VERSION = 1

# Parts of the stdlib that are tests, vendored code or generated tables.
_SKIP_PARTS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip",
                         "turtledemo", "__pycache__", "encodings"})


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """What goes into the default corpus.

  Attributes:
    sources: which text sources to include (see the module docstring).
    heldout_percent: share of documents (by text hash) kept out of training.
    min_doc_bytes: documents shorter than this are dropped (one-line docstrings
      say little and mostly repeat the function name).
    max_doc_bytes: longer documents are split at blank lines into pieces of at
      most this size (a training row is a few hundred tokens; longer documents
      would be cut anyway).
    shard_bytes: approximate size of one JSONL shard.
  """

  sources: tuple[str, ...] = ("stdlib",)
  heldout_percent: float = 5.0
  min_doc_bytes: int = 200
  max_doc_bytes: int = 4000
  shard_bytes: int = 1 << 20

  def __post_init__(self):
    bad = [s for s in self.sources if s not in SOURCES]
    if bad or not self.sources:
      raise ValueError(f"Unknown corpus source(s) {bad or self.sources!r}; valid sources: "
                       f"{', '.join(SOURCES)}.")
    if not 0.0 < self.heldout_percent < 100.0:
      raise ValueError(f"heldout_percent must be in (0, 100), got {self.heldout_percent}.")
    if not 0 < self.min_doc_bytes <= self.max_doc_bytes:
      raise ValueError("Need 0 < min_doc_bytes <= max_doc_bytes, got "
                       f"{self.min_doc_bytes}, {self.max_doc_bytes}.")

  def key(self) -> str:
    """A cache key naming everything that changes the corpus contents."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}{sys.version_info.micro}"
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + py + str(CORPUS_VERSION)
    h = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{'+'.join(self.sources)}-{py}-v{CORPUS_VERSION}-{h}"


def heldout_of(text: str, heldout_percent: float) -> bool:
  """Whether a document belongs to the held-out split (a pure function of its text).

  Args:
    text: the document.
    heldout_percent: share of documents held out, in percent.

  Returns:
    True for held-out documents.
  """
  h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
  return (h % 10_000) < heldout_percent * 100


# ---------------------------------------------------------------------------
# Extraction.


def _split_long(text: str, max_bytes: int) -> Iterator[str]:
  """Splits `text` at blank lines into pieces of at most `max_bytes` (bytes)."""
  if len(text.encode("utf-8")) <= max_bytes:
    yield text
    return
  piece: list[str] = []
  size = 0
  for para in text.split("\n\n"):
    n = len(para.encode("utf-8")) + 2
    if piece and size + n > max_bytes:
      yield "\n\n".join(piece)
      piece, size = [], 0
    if n > max_bytes:
      # One paragraph alone is too long (a big table): cut it at line ends.
      lines, lsize = [], 0
      for line in para.split("\n"):
        ln = len(line.encode("utf-8")) + 1
        if lines and lsize + ln > max_bytes:
          yield "\n".join(lines)
          lines, lsize = [], 0
        lines.append(line)
        lsize += ln
      if lines:
        piece, size = ["\n".join(lines)], lsize
      continue
    piece.append(para)
    size += n
  if piece:
    yield "\n\n".join(piece)


def _comment_blocks(source: str) -> Iterator[str]:
  """Yields runs of consecutive full-line `#` comments, joined as prose."""
  block: list[str] = []
  last_row = -2
  try:
    toks = list(tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__))
  except (tokenize.TokenError, SyntaxError, IndentationError):
    return
  for tok in toks:
    if tok.type != tokenize.COMMENT:
      continue
    line = tok.line.lstrip()
    if not line.startswith("#") or line.startswith("#!"):
      continue  # a trailing comment after code, or a shebang
    body = tok.string.lstrip("#").strip()
    if tok.start[0] != last_row + 1 and block:
      yield " ".join(block)
      block = []
    if body:
      block.append(body)
    last_row = tok.start[0]
  if block:
    yield " ".join(block)


def _stdlib_documents() -> Iterator[tuple[str, str]]:
  """Yields (origin, text) for the stdlib's docstrings, comments and doc topics."""
  root = Path(sysconfig.get_paths()["stdlib"])
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if _SKIP_PARTS.intersection(rel.parts) or rel.name.startswith("test_"):
      continue
    try:
      source = path.read_text(encoding="utf-8")
      tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
      continue  # a few stdlib files are deliberately odd; not worth the noise
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
          yield f"{rel}:{getattr(node, 'lineno', 1)}", doc
    for i, block in enumerate(_comment_blocks(source)):
      yield f"{rel}#comment{i}", block
  try:
    from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  except ImportError:  # some distributions strip pydoc_data
    topics = {}
  for name in sorted(topics):
    yield f"pydoc_data.topics[{name}]", topics[name]


def _python_doc_documents(root: Path) -> Iterator[tuple[str, str]]:
  src = root / "usr/share/doc/python3.11/html/_sources"
  for path in sorted(src.rglob("*.rst.txt")):
    # The C API and distutils pages are mostly signatures; skip them.
    if path.relative_to(src).parts[0] in ("c-api", "distutils"):
      continue
    try:
      yield str(path.relative_to(src)), path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      continue


def _fortunes_documents(root: Path) -> Iterator[tuple[str, str]]:
  d = root / "usr/share/games/fortunes"
  for path in sorted(d.iterdir()):
    if path.suffix in (".dat", ".u8") or not path.is_file():
      continue
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      continue
    for i, quote in enumerate(text.split("\n%\n")):
      yield f"fortunes/{path.name}:{i}", quote.strip("%\n")


def debian_root() -> Path:
  """Where `fetch_debian` extracts Debian packages (`cache_dir()/debian/root`)."""
  return assets.cache_dir() / "debian" / "root"


def fetch_debian(sources: Iterable[str] = ("python-doc", "fortunes")) -> Path:
  """Downloads and extracts the Debian text packages of `sources` into the cache.

  Uses `apt-get download` (no root needed, nothing is installed system-wide) and
  `dpkg -x`. Already-extracted packages are not fetched again.

  Args:
    sources: corpus source names among `DEBIAN_PACKAGES`.

  Returns:
    The extraction root.

  Raises:
    RuntimeError: apt-get or dpkg is missing or failed; the message says how to
      build the corpus without Debian sources.
  """
  root = debian_root()
  dl = root.parent / "downloads"
  dl.mkdir(parents=True, exist_ok=True)
  for s in sources:
    pkg = DEBIAN_PACKAGES[s]
    stamp = root.parent / f"{pkg}.extracted"
    if stamp.exists():
      continue
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
      raise RuntimeError(f"Corpus source {s!r} needs apt-get and dpkg (Debian/Ubuntu); use "
                         "CorpusConfig(sources=('stdlib',)) on this machine.")
    for old in dl.glob(f"{pkg}_*.deb"):
      old.unlink()
    r = subprocess.run(["apt-get", "download", pkg], cwd=dl, capture_output=True, text=True)
    debs = sorted(dl.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not debs:
      raise RuntimeError(f"`apt-get download {pkg}` failed (corpus source {s!r}):\n"
                         f"{r.stderr.strip()}\nUse CorpusConfig(sources=('stdlib',)) offline.")
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
    stamp.touch()
  return root


def iter_documents(cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
  """Yields (origin, text) for every document of the corpus, before the split.

  Documents are whitespace-stripped, split to at most `cfg.max_doc_bytes`,
  filtered to at least `cfg.min_doc_bytes`, and deduplicated (first wins) so
  that the same text can never land in both splits.

  Args:
    cfg: the corpus configuration.

  Yields:
    (origin, text): `origin` names the file and place the text came from.
  """
  seen: set[bytes] = set()
  for source in cfg.sources:
    if source == "stdlib":
      docs = _stdlib_documents()
    elif source == "python-doc":
      docs = _python_doc_documents(fetch_debian(["python-doc"]))
    else:
      docs = _fortunes_documents(fetch_debian(["fortunes"]))
    for origin, text in docs:
      for piece in _split_long(text.strip(), cfg.max_doc_bytes):
        piece = piece.strip()
        if len(piece.encode("utf-8")) < cfg.min_doc_bytes:
          continue
        h = hashlib.sha256(piece.encode("utf-8")).digest()
        if h in seen:
          continue
        seen.add(h)
        yield origin, piece


# ---------------------------------------------------------------------------
# Building and locating the shards.


def corpus_dir(cfg: CorpusConfig | None = None) -> Path:
  """The directory the corpus of `cfg` is (or will be) built in."""
  cfg = cfg or CorpusConfig()
  return assets.cache_dir() / "corpus" / cfg.key()


def build_corpus(cfg: CorpusConfig | None = None, *, force: bool = False) -> Path:
  """Builds the JSONL shards of both splits (once; later calls reuse them).

  The build writes into a temporary sibling directory and renames it into place,
  so an interrupted build never leaves a half-written corpus behind.

  Args:
    cfg: the corpus configuration (default: stdlib only, 5% held out).
    force: rebuild even if the corpus exists.

  Returns:
    The corpus directory, holding `train-NNNNN.jsonl`, `heldout-NNNNN.jsonl`
    and `manifest.json` (counts, bytes, config).
  """
  cfg = cfg or CorpusConfig()
  out = corpus_dir(cfg)
  if (out / "manifest.json").exists() and not force:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
  try:
    stats = {s: {"documents": 0, "bytes": 0, "shards": 0} for s in SPLITS}
    files: dict[str, tuple] = {}  # split -> (file object, bytes in shard)

    def _writer(split: str):
      f, size = files.get(split, (None, 0))
      if f is None or size >= cfg.shard_bytes:
        if f is not None:
          f.close()
        f = open(tmp / f"{split}-{stats[split]['shards']:05d}.jsonl", "w", encoding="utf-8")
        stats[split]["shards"] += 1
        size = 0
      return f, size

    for origin, text in iter_documents(cfg):
      split = "heldout" if heldout_of(text, cfg.heldout_percent) else "train"
      f, size = _writer(split)
      line = json.dumps({"text": text, "origin": origin}, ensure_ascii=False) + "\n"
      f.write(line)
      n = len(text.encode("utf-8"))
      files[split] = (f, size + len(line))
      stats[split]["documents"] += 1
      stats[split]["bytes"] += n
    for f, _ in files.values():
      f.close()
    for s in SPLITS:
      if stats[s]["documents"] == 0:
        raise RuntimeError(f"The corpus {cfg} has no {s} documents; lower min_doc_bytes or "
                           "add sources.")
    manifest = {"config": dataclasses.asdict(cfg), "python": sys.version, "splits": stats,
                "version": CORPUS_VERSION}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Built corpus %s: %s", out, manifest["splits"])
  return out


def default_corpus(split: Split = "train", cfg: CorpusConfig | None = None) -> list[Path]:
  """The JSONL shard paths of one split of the default corpus (built on first use).

  Args:
    split: "train" or "heldout"; held-out documents never appear in training.
    cfg: the corpus configuration (default: stdlib only).

  Returns:
    Sorted shard paths; each line is `{"text": ..., "origin": ...}`.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
  d = build_corpus(cfg)
  return sorted(d.glob(f"{split}-*.jsonl"))


def manifest(cfg: CorpusConfig | None = None) -> dict:
  """The manifest (config, per-split document and byte counts) of a built corpus."""
  return json.loads((build_corpus(cfg) / "manifest.json").read_text())


if __name__ == "__main__":
  # `python -m alm.data.corpus [stdlib python-doc fortunes]` builds and describes.
  logging.basicConfig(level=logging.INFO)
  srcs = tuple(sys.argv[1:]) or ("stdlib",)
  print(json.dumps(manifest(CorpusConfig(sources=srcs)), indent=1))
