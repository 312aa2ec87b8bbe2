"""Losses of cross-tokenizer distillation, each returning a `LossSum`.

The method and its formulas are in docs/method.md (§3 chunk likelihoods, §4
the ALM objective, §6 auxiliary objectives, §7 baselines). Names are imported
lazily: `import alm.losses` does not import JAX until one of them is used.

The ALM objective (`alm.losses.alm`):
  ALMConfig, Side                 -- options; one model's view of a batch
  alm_loss                        -- sum and count of D(a_c, b_c) over chunks
  aligned_chunk_logprobs, AlignedChunks -- merged chunk log-likelihoods
  binarised_divergence            -- D(a, b) from log a, log b (KL, TV, reverse KL)
  LOG_PROB_FLOOR, MIN_TAU         -- the value guard's floor; the smallest tau

Token and chunk log-likelihoods (`alm.losses.chunks`):
  token_logprobs, TokenLogProbs   -- path and boundary log-probs per position
  chunk_logprobs, ChunkLogProbs   -- per-chunk segment sums
  vocab_logsumexps                -- the blockwise vocabulary pass
  log1mexp                        -- log(1 - exp(x)), precise everywhere

Next-token prediction and combinations (`alm.losses.ntp`):
  next_token_loss, combined_mean

Global means (`alm.losses.reduce`):
  LossSum, normalize, global_mean

Auxiliary objectives (`alm.losses.hidden`, `alm.losses.gradmag`):
  hidden_state_loss, HiddenProjector
  gradmag_value_and_grad, GradMagInfo

Baselines (`alm.losses.dskd`, `alm.losses.baselines`):
  dskd_loss, DSKDSide, DSKDProjector, DSKDScales,
  teacher_moments, merge_moments, scales_from_moments -- DSKD
  mined_loss, mined_vocab_map, load_or_compute_mined_map -- MinED
  uld_loss                                               -- ULD
"""

from __future__ import annotations

from alm._lazy import lazy_exports

_LAZY = {
    # alm.losses.alm
    "ALMConfig": "alm.losses.alm",
    "AlignedChunks": "alm.losses.alm",
    "LOG_PROB_FLOOR": "alm.losses.alm",
    "MIN_TAU": "alm.losses.alm",
    "Side": "alm.losses.alm",
    "aligned_chunk_logprobs": "alm.losses.alm",
    "alm_loss": "alm.losses.alm",
    "binarised_divergence": "alm.losses.alm",
    # alm.losses.chunks
    "ChunkLogProbs": "alm.losses.chunks",
    "TokenLogProbs": "alm.losses.chunks",
    "chunk_logprobs": "alm.losses.chunks",
    "log1mexp": "alm.losses.chunks",
    "token_logprobs": "alm.losses.chunks",
    "vocab_logsumexps": "alm.losses.chunks",
    # alm.losses.ntp
    "combined_mean": "alm.losses.ntp",
    "next_token_loss": "alm.losses.ntp",
    # alm.losses.reduce
    "LossSum": "alm.losses.reduce",
    "global_mean": "alm.losses.reduce",
    "normalize": "alm.losses.reduce",
    # alm.losses.hidden, alm.losses.gradmag
    "HiddenProjector": "alm.losses.hidden",
    "hidden_state_loss": "alm.losses.hidden",
    "GradMagInfo": "alm.losses.gradmag",
    "gradmag_value_and_grad": "alm.losses.gradmag",
    # alm.losses.dskd
    "DSKDProjector": "alm.losses.dskd",
    "DSKDScales": "alm.losses.dskd",
    "DSKDSide": "alm.losses.dskd",
    "dskd_loss": "alm.losses.dskd",
    "merge_moments": "alm.losses.dskd",
    "scales_from_moments": "alm.losses.dskd",
    "teacher_moments": "alm.losses.dskd",
    # alm.losses.baselines
    "load_or_compute_mined_map": "alm.losses.baselines",
    "mined_loss": "alm.losses.baselines",
    "mined_vocab_map": "alm.losses.baselines",
    "uld_loss": "alm.losses.baselines",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
