"""Chat templates: ids equal the library tokenizing the fully rendered string."""

import numpy as np
import pytest

from alm import assets
from alm.tokenization.base import TokenizerError
from alm.tokenization.chat import Message, render_chat
from alm.tokenization.loading import load_tokenizer

MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there,  how are you?\n"},
        {"role": "assistant", "content": "Fine 🙂 thanks!"},
        {"role": "user", "content": "And you?"},
        {"role": "assistant", "content": "  Indeed."}]


def _rendered(family):
  """The template written out by hand, as a string with markers (the reference)."""
  out = ""
  if family == "chatml":
    for m in MSGS:
      out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
  elif family == "llama3":
    out = "<|begin_of_text|>"
    for m in MSGS:
      out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
  elif family == "gemma":
    out = "<bos>"
    msgs = [{"role": "user", "content": MSGS[0]["content"] + "\n\n" + MSGS[1]["content"]}]
    for m in msgs + MSGS[2:]:
      role = "model" if m["role"] == "assistant" else m["role"]
      out += f"<start_of_turn>{role}\n{m['content']}<end_of_turn>\n"
  return out


CASES = [("qwen3", "chatml"), ("llama3", "llama3"), ("gemma3-270m", "gemma"),
         ("smollm2-135m-instruct", "chatml")]


@pytest.mark.parametrize("name,family", [
    pytest.param(n, f, marks=pytest.mark.skipif(not assets.is_installed(n), reason="missing"))
    for n, f in CASES])
def test_chat_matches_rendered_string(name, family):
  tok = load_tokenizer(name)
  enc = render_chat(tok, MSGS)
  hf = tok.hf_tokenizer
  hf.encode_special_tokens = False  # the reference parses the markers in the string
  try:
    ref = hf.encode(_rendered(family), add_special_tokens=False).ids
  finally:
    hf.encode_special_tokens = True
  assert enc.ids.tolist() == ref
  # Loss mask: exactly the assistant contents + their end-of-turn markers.
  tb = tok.token_bytes
  masked = b"".join(tb[i] for i, m in zip(enc.ids, enc.loss_mask) if m)
  # A token straddling the start of a content counts (SmolLM2 merges "\n " + " ").
  assert masked.endswith("  Indeed.".encode()) and "Fine 🙂 thanks!".encode() in masked
  assert len(masked) <= len("Fine 🙂 thanks!  Indeed.".encode()) + 2
  eot = [i for i, m, s in zip(enc.ids, enc.loss_mask, enc.special) if m and s]
  assert len(eot) == 2
  # Spans tile the concatenated text.
  ns = ~enc.special
  np.testing.assert_array_equal(enc.starts[ns][1:], enc.ends[ns][:-1])
  assert b"".join(tb[i] for i in enc.ids) == enc.text


@pytest.mark.skipif(not assets.is_installed("qwen3"), reason="missing")
def test_marker_in_content_stays_text():
  tok = load_tokenizer("qwen3")
  enc = render_chat(tok, [Message("user", "<|im_end|>"), Message("assistant", "ok")])
  assert enc.special.sum() == 4 and b"<|im_end|>" in enc.text


def test_bytes_chat_and_errors():
  tok = load_tokenizer("bytes")
  enc = render_chat(tok, [Message("user", "a"), Message("assistant", "bc")])
  assert enc.loss_mask.sum() == 3  # b, c, <|im_end|>
  with pytest.raises(TokenizerError, match="no special token"):
    render_chat(tok, [Message("user", "a")], family="llama3")
  with pytest.raises(ValueError, match="valid roles"):
    Message("bot", "x")
  with pytest.raises(ValueError, match="valid families"):
    render_chat(tok, [Message("user", "a")], family="chatgpt")
