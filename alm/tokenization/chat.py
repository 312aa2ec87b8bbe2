"""Chat data: messages rendered with a model family's template, with a loss mask.

A template is a sequence of segments: special markers (ids inserted
directly, never parsed from text) and text runs. Each text run between two
markers is encoded as one string, so its tokens are those the family's own
template-then-tokenize would give; markers and text never merge. The result
is one `Encoding` whose `text` is the concatenation of the text runs, spans
shifted accordingly, and `loss_mask` True on the tokens of assistant contents
(a token straddling the start of a content counts) and on the end-of-turn
marker that closes an assistant turn.

Families: "chatml" (Qwen, SmolLM2, the byte tokenizer), "llama3", "gemma"
(system text folded into the first user turn, role "model"), "mistral"
("[INST] ... [/INST]" with "</s>" after each answer; system text folded into
the first user turn). Template text such as "user\\n" is text: two tokenizers
of different families therefore encode different texts; align chat data of
two families on a shared plain rendering (family="plain") or give both the
same family's markers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from alm.tokenization.base import Encoding, TokenizerError
from alm.tokenization.vocab import VocabTokenizer, to_text

Role = Literal["system", "user", "assistant"]
ChatFamily = Literal["chatml", "llama3", "gemma", "mistral", "plain"]
FAMILIES = ("chatml", "llama3", "gemma", "mistral", "plain")
ROLES = ("system", "user", "assistant")

# A marker that identifies each family in a vocabulary (checked in this order).
_FAMILY_MARKERS = (("llama3", "<|start_header_id|>"), ("gemma", "<start_of_turn>"),
                   ("chatml", "<|im_start|>"), ("mistral", "[INST]"))


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat message."""

  role: Role
  content: str

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"Unknown role {self.role!r}; valid roles: {', '.join(ROLES)}.")


@dataclasses.dataclass(frozen=True)
class _Seg:
  special: str | None = None  # marker string (encoded as its id)
  text: str = ""
  target: bool = False  # loss-mask value for the tokens of this segment


def special_token_id(tok: VocabTokenizer, token: str) -> int | None:
  """Id of a special marker string in `tok`, or None when it has none."""
  for getter in ("token_to_id",):
    fn = getattr(tok, getter, None)
    if fn is not None:
      try:
        i = fn(token)
      except KeyError:
        i = None
      if i is not None:
        return int(i)
  hf = getattr(tok, "hf_tokenizer", None)
  if hf is not None:
    return hf.token_to_id(token)
  sp = getattr(tok, "sp", None)
  if sp is not None:
    i = sp.piece_to_id(token)
    return i if i != sp.unk_id() or token == sp.id_to_piece(i) else None
  return None


def detect_family(tok: VocabTokenizer) -> ChatFamily:
  """The chat family whose markers the tokenizer has."""
  for fam, marker in _FAMILY_MARKERS:
    i = special_token_id(tok, marker)
    if i is not None and i in tok.special_ids:
      return fam  # type: ignore[return-value]
  raise TokenizerError(
      f"Tokenizer {tok.name!r} has none of the chat markers of the supported families "
      f"({', '.join(m for _, m in _FAMILY_MARKERS)}); pass family='plain' or one of "
      f"{', '.join(FAMILIES)} explicitly.")


def _normalize_messages(messages) -> list[Message]:
  out = []
  for m in messages:
    if isinstance(m, Message):
      out.append(m)
    elif isinstance(m, Mapping):
      out.append(Message(m["role"], m["content"]))
    else:
      raise TypeError(f"A message must be a Message or a dict with role/content, got {m!r}.")
  return out


def _fold_system(msgs: list[Message]) -> list[Message]:
  if msgs and msgs[0].role == "system":
    sys_text = msgs[0].content
    rest = msgs[1:]
    if rest and rest[0].role == "user":
      return [Message("user", sys_text + "\n\n" + rest[0].content)] + rest[1:]
    return [Message("user", sys_text)] + rest
  return msgs


def _segments(family: ChatFamily, msgs: list[Message]) -> list[_Seg]:
  segs: list[_Seg] = []
  if family == "chatml":
    for m in msgs:
      a = m.role == "assistant"
      segs += [_Seg("<|im_start|>"), _Seg(text=f"{m.role}\n"), _Seg(text=m.content, target=a),
               _Seg("<|im_end|>", target=a), _Seg(text="\n")]
  elif family == "llama3":
    for m in msgs:
      a = m.role == "assistant"
      segs += [_Seg("<|start_header_id|>"), _Seg(text=m.role), _Seg("<|end_header_id|>"),
               _Seg(text="\n\n"), _Seg(text=m.content, target=a), _Seg("<|eot_id|>", target=a)]
  elif family == "gemma":
    for m in _fold_system(msgs):
      a = m.role == "assistant"
      role = "model" if a else m.role
      segs += [_Seg("<start_of_turn>"), _Seg(text=f"{role}\n"), _Seg(text=m.content, target=a),
               _Seg("<end_of_turn>", target=a), _Seg(text="\n")]
  elif family == "mistral":
    for m in _fold_system(msgs):
      if m.role == "user":
        segs += [_Seg("[INST]"), _Seg(text=m.content), _Seg("[/INST]")]
      else:
        segs += [_Seg(text=m.content, target=True), _Seg("</s>", target=True)]
  elif family == "plain":
    for m in msgs:
      a = m.role == "assistant"
      segs += [_Seg(text=f"{m.role}: "), _Seg(text=m.content, target=a), _Seg(text="\n")]
  else:
    raise ValueError(f"Unknown chat family {family!r}; valid families: {', '.join(FAMILIES)}.")
  return segs


def chat_text(family: ChatFamily, messages: Sequence[Message | Mapping[str, str]], *,
              add_generation_prompt: bool = False) -> tuple[str, tuple[str, ...]]:
  """A conversation rendered as one string, the family's markers written literally.

  For interfaces that pass prompts as strings (lm-eval's `apply_chat_template`):
  `encode_with_markers` turns the string back into the ids `render_chat` gives
  (markers as their ids, text runs encoded one by one).

  Args:
    family: the template.
    messages: `Message`s or dicts with "role" and "content".
    add_generation_prompt: end with the opening of an assistant turn (what a
      model continues to answer).

  Returns:
    (text, markers): the rendering and the marker strings it may contain.
  """
  if family not in FAMILIES:
    raise ValueError(f"Unknown chat family {family!r}; valid families: {', '.join(FAMILIES)}.")
  msgs = _normalize_messages(messages)
  segs = _segments(family, msgs + [Message("assistant", "")] if add_generation_prompt else msgs)
  if add_generation_prompt:
    # Cut at the (empty) content of the added assistant turn.
    cut = max(i for i, g in enumerate(segs) if g.target and g.special is None)
    segs = segs[:cut]
  probe = _segments(family, [Message("user", ""), Message("assistant", "")])
  markers = tuple(sorted({g.special for g in probe if g.special is not None}))
  return "".join(g.special if g.special is not None else g.text for g in segs), markers


def encode_with_markers(tok: VocabTokenizer, text: str, markers: Sequence[str], *,
                        add_special_tokens: bool = True) -> Encoding:
  """Encodes `text`, turning each literal marker string into its special id.

  Text between markers is encoded run by run (markers and text never merge);
  spans are byte offsets into the concatenated text runs, as in `render_chat`.

  Raises:
    TokenizerError: a marker is not a special token of `tok`.
  """
  ms = sorted(set(markers), key=len, reverse=True)
  if not ms or not any(m in text for m in ms):
    return tok.encode(text, add_special_tokens=add_special_tokens)
  pattern = re.compile("|".join(re.escape(m) for m in ms))
  ids, starts, ends, special, texts = [], [], [], [], []
  offset = 0
  if add_special_tokens and tok.add_bos and tok.bos_id is not None:
    ids.append([tok.bos_id])
    starts.append([0])
    ends.append([0])
    special.append([True])
  pos = 0
  for piece in [*pattern.finditer(text), None]:
    run = text[pos:piece.start()] if piece is not None else text[pos:]
    if run:
      enc = tok.encode(run, add_special_tokens=False)
      ids.append(enc.ids)
      starts.append(enc.starts + offset)
      ends.append(enc.ends + offset)
      special.append(enc.special)
      texts.append(enc.text)
      offset += len(enc.text)
    if piece is None:
      break
    i = special_token_id(tok, piece.group())
    if i is None or i not in tok.special_ids:
      raise TokenizerError(f"Tokenizer {tok.name!r} has no special token {piece.group()!r}.")
    ids.append([i])
    starts.append([offset])
    ends.append([offset])
    special.append([True])
    pos = piece.end()
  return Encoding(ids=np.concatenate(ids).astype(np.int32),
                  starts=np.concatenate(starts).astype(np.int32),
                  ends=np.concatenate(ends).astype(np.int32),
                  special=np.concatenate(special).astype(bool), text=b"".join(texts))


def render_chat(tok: VocabTokenizer, messages: Sequence[Message | Mapping[str, str]], *,
                family: ChatFamily | None = None, add_bos: bool | None = None) -> Encoding:
  """Tokenizes a conversation with a family's chat template and an assistant-only loss mask.

  Args:
    tok: the tokenizer.
    messages: `Message`s or dicts with "role" and "content".
    family: the template; default: detected from the tokenizer's markers.
    add_bos: prepend BOS (default: the tokenizer's `add_bos`).

  Returns:
    An `Encoding` with `loss_mask` set.

  Raises:
    TokenizerError: the tokenizer lacks a marker of the family, or a content
      cannot be represented exactly.
  """
  if family is not None and family not in FAMILIES:
    raise ValueError(f"Unknown chat family {family!r}; valid families: {', '.join(FAMILIES)}.")
  family = family or detect_family(tok)
  msgs = _normalize_messages(messages)
  # Merge consecutive text segments into runs; remember where target contents start.
  runs: list[tuple[str | None, str, list[tuple[int, int, bool]]]] = []
  for seg in _segments(family, msgs):
    if seg.special is not None:
      runs.append((seg.special, "", [(0, 0, seg.target)]))
    else:
      if not runs or runs[-1][0] is not None:
        runs.append((None, "", []))
      _, text, parts = runs[-1]
      n = len(to_text(text)[1])
      nb = len(to_text(seg.text)[1])
      runs[-1] = (None, text + seg.text, parts + [(n, n + nb, seg.target)])
  ids, starts, ends, special, mask = [], [], [], [], []
  texts: list[bytes] = []
  offset = 0
  use_bos = tok.add_bos if add_bos is None else add_bos
  if use_bos and tok.bos_id is not None:
    ids.append(np.array([tok.bos_id], np.int32))
    starts.append(np.zeros(1, np.int32))
    ends.append(np.zeros(1, np.int32))
    special.append(np.ones(1, bool))
    mask.append(np.zeros(1, bool))
  for marker, text, parts in runs:
    if marker is not None:
      i = special_token_id(tok, marker)
      if i is None or i not in tok.special_ids:
        raise TokenizerError(
            f"Tokenizer {tok.name!r} has no special token {marker!r} of the {family!r} chat "
            "template; choose the family of this tokenizer (family=...) or 'plain'.")
      ids.append(np.array([i], np.int32))
      starts.append(np.full(1, offset, np.int32))
      ends.append(np.full(1, offset, np.int32))
      special.append(np.ones(1, bool))
      mask.append(np.array([parts[0][2]]))
      continue
    if not text:
      continue
    enc = tok.encode(text, add_special_tokens=False)
    m = np.zeros(len(enc), bool)
    for a, b, target in parts:
      if target and b > a:
        # Tokens holding any byte of the content (a straddling token counts).
        m |= (enc.ends > a) & (enc.starts < b)
    ids.append(enc.ids)
    starts.append(enc.starts + offset)
    ends.append(enc.ends + offset)
    special.append(enc.special)
    mask.append(m)
    texts.append(enc.text)
    offset += len(enc.text)

  def cat(xs, dtype):
    return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)

  return Encoding(ids=cat(ids, np.int32), starts=cat(starts, np.int32),
                  ends=cat(ends, np.int32), special=cat(special, bool), text=b"".join(texts),
                  loss_mask=cat(mask, bool))
