"""Tokenizers as byte functions, chunk alignment, and tokenization-bias tables.

See docs/method.md §1 (tokenizers), §2 (alignment) and §5 (bias tables).
Names are imported lazily: `import alm.tokenization` imports no tokenizer
library (nor numpy) until one of them is used.

The byte-level interface (`alm.tokenization.base`, `.vocab`, `.loading`):
  load_tokenizer            -- a name, file or directory -> a tokenizer
  ByteTokenizer, VocabTokenizer -- the interface; its vocabulary-backed base
  Encoding                  -- ids with byte spans of one text
  TokenizerError            -- a tokenizer or text that cannot be handled exactly
  compute_boundary_bytes, shared_boundary_bytes -- pretoken-boundary bytes

Implementations:
  HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, BytesTokenizer
  load_gguf_tokenizer       -- the tokenizer stored in a GGUF file

Alignment (`alm.tokenization.alignment`):
  align, align_batch        -- chunk ids of two tokenizations of one text
  last_token_indices        -- each chunk's last token
  AlignmentError, CONSTRAINTS

Tokenization bias (`alm.tokenization.bias`):
  BiasTables, compute_bias_tables, count_tokens, unigram_probs

Chat formatting (`alm.tokenization.chat`):
  Message, render_chat, detect_family
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    # alm.tokenization.base / vocab / loading
    "ByteTokenizer": "alm.tokenization.base",
    "Encoding": "alm.tokenization.base",
    "TokenizerError": "alm.tokenization.base",
    "VocabTokenizer": "alm.tokenization.vocab",
    "compute_boundary_bytes": "alm.tokenization.vocab",
    "shared_boundary_bytes": "alm.tokenization.vocab",
    "load_tokenizer": "alm.tokenization.loading",
    # implementations
    "BytesTokenizer": "alm.tokenization.bytes_tok",
    "HFTokenizer": "alm.tokenization.hf",
    "SentencePieceTokenizer": "alm.tokenization.sentencepiece_tok",
    "TiktokenTokenizer": "alm.tokenization.tiktoken_tok",
    "load_gguf_tokenizer": "alm.tokenization.gguf",
    # alm.tokenization.alignment
    "AlignmentError": "alm.tokenization.alignment",
    "CONSTRAINTS": "alm.tokenization.alignment",
    "align": "alm.tokenization.alignment",
    "align_batch": "alm.tokenization.alignment",
    "last_token_indices": "alm.tokenization.alignment",
    # alm.tokenization.bias
    "BiasTables": "alm.tokenization.bias",
    "compute_bias_tables": "alm.tokenization.bias",
    "count_tokens": "alm.tokenization.bias",
    "unigram_probs": "alm.tokenization.bias",
    # alm.tokenization.chat
    "Message": "alm.tokenization.chat",
    "detect_family": "alm.tokenization.chat",
    "render_chat": "alm.tokenization.chat",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
