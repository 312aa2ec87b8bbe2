"""tiktoken-style rank files (Mistral Tekken) at the byte level.

A Tekken json lists byte strings by rank plus a split regex; ids are
`rank + num_special` where the first `default_num_special_tokens` ids (1,000
for Tekken) are specials: <unk>, <s>, </s>, [INST], ... then <SPECIAL_n>
fillers (the names mistral-common uses when the file lists none). Specials are
never parsed from text.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from alm.tokenization.base import Encoding, TokenizerError
from alm.tokenization.vocab import VocabTokenizer, to_text

# mistral-common's default specials for Tekken files without a "special_tokens" list.
_DEFAULT_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]",
                     "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                     "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


class TiktokenTokenizer(VocabTokenizer):
  """A tiktoken BPE (Tekken rank json) with exact byte spans.

  Args:
    path: the rank json.
    name: a name for messages.
    add_bos: prepend <s> (default True, as Mistral does).
    vocab_size: total ids incl. specials (default: the file's `default_vocab_size`).
  """

  def __init__(self, path: str | os.PathLike, *, name: str | None = None,
               add_bos: bool = True, vocab_size: int | None = None):
    self.path = Path(path)
    self.name = name or str(path)
    with open(self.path, encoding="utf-8") as f:
      data = json.load(f)
    try:
      cfg = data["config"]
      n_special = int(cfg["default_num_special_tokens"])
      size = int(vocab_size or cfg.get("default_vocab_size") or (len(data["vocab"]) + n_special))
      pattern = cfg["pattern"]
    except KeyError as e:
      raise TokenizerError(f"{path} is not a Tekken rank file: missing config field {e}.") from e
    n_inner = size - n_special
    if n_inner > len(data["vocab"]):
      raise TokenizerError(f"{path}: vocab_size {size} exceeds the {len(data['vocab'])} ranks "
                           f"+ {n_special} specials in the file.")
    ranks = {}
    for entry in data["vocab"][:n_inner]:
      ranks[base64.b64decode(entry["token_bytes"])] = int(entry["rank"])
    if sorted(ranks.values()) != list(range(n_inner)):
      raise TokenizerError(f"{path}: ranks are not 0..{n_inner - 1} without gaps.")
    self._enc = tiktoken.Encoding(name=self.name, pat_str=pattern, mergeable_ranks=ranks,
                                  special_tokens={})
    listed = data.get("special_tokens")
    names = [t["token_str"] for t in listed] if listed else list(_DEFAULT_SPECIALS)
    names += [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]
    self.special_names = tuple(names[:n_special])
    self._n_special = n_special
    tb = [b""] * size
    for b, r in ranks.items():
      tb[r + n_special] = b
    self._token_bytes = tb
    self._special_ids = frozenset(range(n_special))
    ids = {s: i for i, s in enumerate(self.special_names)}
    self._bos_id, self._eos_id, self._unk_id = ids.get("<s>"), ids.get("</s>"), ids.get("<unk>")
    self._add_bos = bool(add_bos) and self._bos_id is not None

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> "TiktokenTokenizer":
    """Loads a Tekken-style rank json."""
    return cls(path, **kwargs)

  def token_to_id(self, token: str) -> int:
    """Id of a special token name such as "[INST]"."""
    try:
      return self.special_names.index(token)
    except ValueError:
      raise KeyError(f"{token!r} is not a special token of {self.name!r}.") from None

  def _encode_ids(self, text: str) -> list[int]:
    n = self._n_special
    return [i + n for i in self._enc.encode_ordinary(text)]

  def encode_batch(self, texts: Sequence[str | bytes], *,
                   add_special_tokens: bool = True) -> list[Encoding]:
    """Encodes many texts with tiktoken's threaded batch encoder."""
    pairs = [to_text(t) for t in texts]
    n = self._n_special
    out = self._enc.encode_ordinary_batch([s for s, _ in pairs])
    return [self.finish_encoding([i + n for i in ids], s, d, add_special_tokens=add_special_tokens)
            for ids, (s, d) in zip(out, pairs)]

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Copies the rank file as tekken.json (+ tokenizer_config.json) into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(self.path, d / "tekken.json")
    with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump({"alm_tokenizer": "tiktoken", "tokenizer_file": "tekken.json",
                 "add_bos_token": self._add_bos, "bos_token": "<s>", "eos_token": "</s>",
                 "vocab_size": self.vocab_size}, f, indent=2)
