"""Training data: documents, the offline default corpus, and the input pipeline.

Names are imported lazily: `import alm.data` imports neither grain nor JAX
until one of them is used.

The input pipeline (`alm.data.pipeline`; docs/method.md §2 for the chunks):
  Pipeline, PipelineConfig  -- documents -> teacher/student batches with chunk ids
  build_dataset             -- the underlying grain dataset
  check_documents           -- find a document a tokenizer cannot spell, up front
  resolve_text_normalization -- what text_normalization="auto" means for a pair
  BadDocumentError          -- raised under bad_documents="error"

Document sources (`alm.data.sources`):
  open_source               -- a path, glob, list or "hf:NAME" -> a source
  JsonlSource, TextSource, ParquetSource, HFSource
  DataError                 -- unreadable input, naming the file and line

The offline default corpus (`alm.data.corpus`):
  default_corpus            -- the train / heldout shard paths (built on first use)
  CorpusConfig, build_corpus, corpus_dir, iter_documents, manifest
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    # alm.data.pipeline
    "BadDocumentError": "alm.data.pipeline",
    "Pipeline": "alm.data.pipeline",
    "PipelineConfig": "alm.data.pipeline",
    "build_dataset": "alm.data.pipeline",
    "check_documents": "alm.data.pipeline",
    "resolve_text_normalization": "alm.data.pipeline",
    # alm.data.sources
    "DataError": "alm.data.sources",
    "HFSource": "alm.data.sources",
    "JsonlSource": "alm.data.sources",
    "ParquetSource": "alm.data.sources",
    "TextSource": "alm.data.sources",
    "open_source": "alm.data.sources",
    # alm.data.corpus
    "CorpusConfig": "alm.data.corpus",
    "build_corpus": "alm.data.corpus",
    "corpus_dir": "alm.data.corpus",
    "default_corpus": "alm.data.corpus",
    "iter_documents": "alm.data.corpus",
    "manifest": "alm.data.corpus",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
