"""Initialising and mapping the embeddings of a new tokenizer.

See docs/method.md §8. Names are imported lazily: `import alm.hypernet`
imports neither numpy nor JAX until one of them is used.

FVT initialisation (`alm.hypernet.fvt`):
  fvt_embeddings            -- (input, output) embeddings for a new tokenizer
  fvt_transformer           -- a student Transformer with FVT embeddings, body shared
  decompose, apply_decomposition, Decomposition -- the two steps, and their plan

The embedding projector (`alm.hypernet.projector`):
  EmbeddingProjector, ProjectorConfig -- a learned residual map, identity at step 0

ZeTT-style hypernetworks (`alm.hypernet.hypernet`, docs/method.md §14):
  Hypernetwork, HypernetConfig -- new-token embeddings from base-tokenizer pieces
  predict_embeddings          -- a whole new vocabulary, each token once, in batches
  transfer                    -- the base model moved to a new tokenizer (zero-shot)

The zoo (`alm.hypernet.zoo`): named hypernetworks with the recipes that build them:
  load                        -- a zoo entry by name (or a trained one by directory)
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    "Decomposition": "alm.hypernet.fvt",
    "apply_decomposition": "alm.hypernet.fvt",
    "decompose": "alm.hypernet.fvt",
    "fvt_embeddings": "alm.hypernet.fvt",
    "fvt_transformer": "alm.hypernet.fvt",
    "EmbeddingProjector": "alm.hypernet.projector",
    "ProjectorConfig": "alm.hypernet.projector",
    "Hypernetwork": "alm.hypernet.hypernet",
    "HypernetConfig": "alm.hypernet.hypernet",
    "HypernetError": "alm.hypernet.hypernet",
    "predict_embeddings": "alm.hypernet.hypernet",
    "transfer": "alm.hypernet.hypernet",
    "load": "alm.hypernet.zoo",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
