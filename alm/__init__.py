"""alm: Approximate Likelihood Matching — distil language models across tokenizers.

The public API is re-exported here lazily (importing `alm` does not import JAX
until a model or loss is used):

  alm.load_model(name_or_path)     -> (model, tokenizer)
  alm.load_tokenizer(spec)         -> ByteTokenizer
  alm.align(teacher_enc, student_enc, ...) -> (teacher_chunk_ids, student_chunk_ids)
"""

from __future__ import annotations

from alm._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "load_model": "alm.models.loading",
    "save_model": "alm.models.loading",
    "ModelConfig": "alm.models.config",
    "Transformer": "alm.models.transformer",
    "load_tokenizer": "alm.tokenization.loading",
    "ByteTokenizer": "alm.tokenization.base",
    "Encoding": "alm.tokenization.base",
    "TokenizerError": "alm.tokenization.base",
    "align": "alm.tokenization.alignment",
    "assets": "alm.assets",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
