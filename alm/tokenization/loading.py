"""`alm.load_tokenizer(spec)`: one entry point for every tokenizer format.

`spec` is an asset name (`alm.assets`), "bytes", or a path: an HF
`tokenizer.json` or HF-format directory, a SentencePiece `.model`, a
tiktoken-style rank json (Mistral Tekken), or a `.gguf` file (the tokenizer is
rebuilt from its metadata). Loaded tokenizers are cached per (file, options):
building the byte tables of a 262k vocabulary takes about a second, and
tokenizers are immutable.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from alm import assets
from alm.tokenization.base import TokenizerError
from alm.tokenization.vocab import VocabTokenizer

_FORMATS_HELP = (
    "Pass an asset name ({names}), 'bytes', or a path to a tokenizer.json, an HF-format "
    "directory, a SentencePiece .model, a tiktoken-style rank .json, or a .gguf file.")


def _help() -> str:
  return _FORMATS_HELP.format(names=", ".join(assets.ASSETS))


def load_tokenizer(spec: str | os.PathLike, **kwargs) -> VocabTokenizer:
  """Loads a tokenizer as a `ByteTokenizer` with exact byte spans.

  Args:
    spec: an asset name ("qwen3", "gemma3-270m", ...), "bytes", or a path.
    **kwargs: options of the concrete tokenizer, e.g. `add_bos=False`,
      `bos_token="<s>"` (HF json), `specials=(...)` (bytes).

  Returns:
    The tokenizer (cached: the same spec and options return the same object).

  Raises:
    FileNotFoundError: `spec` is neither a known name nor an existing path.
    alm.assets.AssetNotInstalledError: a known asset is not installed (the
      message names the install command).
    TokenizerError: the tokenizer is lossy (e.g. lowercases) or malformed.
  """
  key = str(spec)
  if key == "bytes" or key in assets.ASSETS:
    return _load_cached(key, None, tuple(sorted(kwargs.items())))
  path = Path(spec).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer {key!r}: not a known name and no such file. {_help()}")
  path = path.resolve()
  return _load_cached(str(path), path.stat().st_mtime_ns, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=32)
def _load_cached(key: str, mtime, items: tuple) -> VocabTokenizer:
  del mtime  # part of the cache key only: a rewritten file is loaded again
  kwargs = dict(items)
  if key == "bytes":
    from alm.tokenization.bytes_tok import BytesTokenizer  # pylint: disable=import-outside-toplevel
    return BytesTokenizer(**kwargs)
  if key in assets.ASSETS:
    a = assets.get(key)
    path = assets.locate(key)
    return _load_path(path, a.format, name=key, **kwargs)
  return _load_path(Path(key), None, name=key, **kwargs)


def _sniff_json(path: Path) -> str:
  with open(path, encoding="utf-8") as f:
    head = f.read(4096)
  if '"model"' in head or '"added_tokens"' in head or '"normalizer"' in head:
    return "hf_json"
  if '"rank"' in head or '"token_bytes"' in head or '"config"' in head:
    return "tiktoken"
  with open(path, encoding="utf-8") as f:
    j = json.load(f)
  if isinstance(j, dict) and "model" in j:
    return "hf_json"
  if isinstance(j, dict) and "vocab" in j and isinstance(j["vocab"], list):
    return "tiktoken"
  raise TokenizerError(f"{path} is JSON but neither an HF tokenizer.json (no 'model') nor "
                       f"a tiktoken-style rank file (no 'vocab' list). {_help()}")


def _load_path(path: Path, fmt: str | None, *, name: str, **kwargs) -> VocabTokenizer:
  # pylint: disable=import-outside-toplevel
  if path.is_dir():
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    if cfg.get("alm_tokenizer") == "bytes":
      from alm.tokenization.bytes_tok import BytesTokenizer
      kwargs.setdefault("specials", tuple(cfg.get("alm_specials", ())) or None)
      kwargs.setdefault("add_bos", cfg.get("add_bos_token", True))
      if kwargs["specials"] is None:
        del kwargs["specials"]
      else:  # the roles, as saved (older files: the default names)
        kwargs.setdefault("bos", cfg.get("bos_token", "<bos>"))
        kwargs.setdefault("eos", cfg.get("eos_token", "<eos>"))
        kwargs.setdefault("pad", cfg.get("alm_pad_token"))
      return BytesTokenizer(**kwargs)
    if cfg.get("alm_tokenizer") == "tiktoken":
      kwargs.setdefault("add_bos", cfg.get("add_bos_token", True))
      kwargs.setdefault("vocab_size", cfg.get("vocab_size"))
      return _load_path(path / cfg.get("tokenizer_file", "tekken.json"), "tiktoken", name=name,
                        **kwargs)
    if (path / "tokenizer.json").exists():
      return _load_path(path / "tokenizer.json", "hf_json", name=name, **kwargs)
    if (path / "tokenizer.model").exists():
      return _load_path(path / "tokenizer.model", "sentencepiece", name=name, **kwargs)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return _load_path(ggufs[0], "gguf", name=name, **kwargs)
    raise FileNotFoundError(
        f"Directory {path} has no tokenizer.json, tokenizer.model or single .gguf file. {_help()}")
  if fmt is None:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
      fmt = "gguf"
    elif suffix == ".json":
      fmt = _sniff_json(path)
    else:
      with open(path, "rb") as f:
        magic = f.read(4)
      fmt = "gguf" if magic == b"GGUF" else "sentencepiece"
  if fmt == "hf_json":
    from alm.tokenization.hf import HFTokenizer
    return HFTokenizer.from_file(path, name=name, **kwargs)
  if fmt == "sentencepiece":
    from alm.tokenization.sentencepiece_tok import SentencePieceTokenizer
    return SentencePieceTokenizer.from_file(path, name=name, **kwargs)
  if fmt == "tiktoken":
    from alm.tokenization.tiktoken_tok import TiktokenTokenizer
    return TiktokenTokenizer.from_file(path, name=name, **kwargs)
  if fmt == "gguf":
    from alm.tokenization.gguf import load_gguf_tokenizer
    return load_gguf_tokenizer(path, name=name, **kwargs)
  raise TokenizerError(f"Unknown tokenizer format {fmt!r} for {path}. {_help()}")
