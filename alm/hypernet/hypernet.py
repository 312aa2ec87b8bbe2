"""ZeTT-style embedding hypernetworks (SPEC §11, docs/method.md §14).

A hypernetwork predicts the embeddings of any new tokenizer's tokens from the
base model's own embeddings, so the base model moves to that tokenizer
without training on it (zero-shot tokenizer transfer):

  hn = Hypernetwork.for_model(base, base_tok, HypernetConfig(), rngs=nnx.Rngs(0))
  student = transfer(base, base_tok, new_tok, hn)     # an alm.Transformer for new_tok

For a new token `t`: its decomposition by the base tokenizer (`alm.hypernet.
fvt.decompose`; the first `max_pieces` pieces), each piece embedded with the
base model's input embeddings (and output embeddings, stacked, when the model
is untied) → `[M, k·D]` → in-projection → learned position embeddings → a
small pre-norm transformer encoder (attention masked to the real pieces) →
the first position → a **zero-initialised** output projection, added to a
heuristic: the FVT embedding (the mean of all the pieces' embeddings,
`residual="mean"`) or the first piece's (`residual="first"`). At
initialisation the hypernetwork reproduces that heuristic exactly. Special
tokens are never predicted: they take FVT's (by role, then by string).

A hypernetwork belongs to one base model: it records the base's vocabulary
hash and a hash of its embedding tables, and `transfer` / `predict_embeddings`
refuse another base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.hypernet import fvt

Residual = Literal["mean", "first"]
# The largest share of a new vocabulary's regular tokens the base tokenizer may be
# unable to spell (they keep FVT's fallback); more is refused.
MAX_UNSPELLABLE = 0.01


class HypernetError(ValueError):
  """A hypernetwork used with a base or tokenizer it cannot serve; says why and what to do."""


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
  """Sizes and options of a hypernetwork.

  Attributes:
    max_pieces: M, the base-tokenizer pieces of a new token the encoder reads
      (ZeTT's released models: 7; the paper's code: 8).
    num_layers: encoder layers.
    num_heads: attention heads (must divide `dim`).
    dim: encoder width (0: the base model's embedding width).
    mlp_ratio: the MLP's hidden width over `dim`.
    residual: the heuristic the prediction is added to: "mean" (FVT: the mean
      of all the pieces' embeddings) or "first" (the first piece's).
    copy_shared: tokens the base vocabulary also has (the same bytes) keep the
      base's own embeddings, as FVT does, and are not predicted; only the
      tokens new to the base are (ZeTT predicts every token: the default).
    eps: RMSNorm epsilon.
  """

  max_pieces: int = 8
  num_layers: int = 3
  num_heads: int = 8
  dim: int = 0
  mlp_ratio: int = 2
  residual: Residual = "mean"
  copy_shared: bool = False
  eps: float = 1e-6

  def __post_init__(self):
    for name, low in (("max_pieces", 1), ("num_layers", 0), ("num_heads", 1), ("dim", 0),
                      ("mlp_ratio", 1)):
      if getattr(self, name) < low:
        raise ValueError(f"HypernetConfig.{name} must be >= {low}, got {getattr(self, name)}.")
    if self.residual not in ("mean", "first"):
      raise ValueError(f"HypernetConfig.residual must be 'mean' or 'first', got "
                       f"{self.residual!r}.")


def base_tables(model) -> tuple[np.ndarray, np.ndarray | None]:
  """The base model's (input [V, D], output [V, D] or None when tied) embedding tables."""
  emb_in = np.asarray(model.embedder.embedding[...], np.float32)
  emb_out = None if model.lm_head is None else np.asarray(model.lm_head.kernel[...],
                                                          np.float32).T
  return emb_in, emb_out


def base_fingerprint(tok, emb_in: np.ndarray, emb_out: np.ndarray | None) -> str:
  """A hash of a base model's vocabulary and embedding tables (what a hypernetwork serves)."""
  from alm.training.students import hash_vocab  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  hash_vocab(h, tok)
  for t in (emb_in, emb_out):
    if t is not None:
      h.update(str(t.shape).encode())
      h.update(np.ascontiguousarray(t, np.float32).tobytes())
  return h.hexdigest()[:20]


class _Block(nnx.Module):
  """Pre-norm attention (masked to real pieces) + MLP over [N, M, H]."""

  def __init__(self, dim: int, cfg: HypernetConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = nnx.RMSNorm(dim, epsilon=cfg.eps, **kw)
    self.attn = nnx.MultiHeadAttention(num_heads=cfg.num_heads, in_features=dim, decode=False,
                                       use_bias=False, **kw)
    self.norm2 = nnx.RMSNorm(dim, epsilon=cfg.eps, **kw)
    self.up = nnx.Linear(dim, cfg.mlp_ratio * dim, use_bias=False, **kw)
    self.down = nnx.Linear(cfg.mlp_ratio * dim, dim, use_bias=False, **kw)

  def __call__(self, x, mask):
    att = mask[:, None, None, :] & mask[:, None, :, None]  # [N, 1, M, M]
    x = x + self.attn(self.norm1(x), mask=att)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Hypernetwork(nnx.Module):
  """Predicts new-token embeddings from base-tokenizer pieces (see the module docstring).

  Args:
    embed_dim: D, the base model's embedding width.
    tied: whether the base model ties its input and output embeddings (else
      the input is `[M, 2D]` and the prediction `[2D]`: input and output).
    cfg: sizes and options.
    base: the base model's name and `base_fingerprint`, recorded and checked.
    rngs: parameter init streams.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  def __init__(self, embed_dim: int, *, tied: bool, cfg: HypernetConfig | None = None,
               base: tuple[str, str] = ("", ""), rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    cfg = cfg or HypernetConfig()
    width = cfg.dim or embed_dim
    if width % cfg.num_heads:
      raise HypernetError(f"num_heads={cfg.num_heads} must divide the hypernetwork width "
                          f"{width}; pick a divisor of it.")
    k = 1 if tied else 2
    self.cfg = nnx.static(cfg)
    self.embed_dim, self.tied, self.base = embed_dim, tied, nnx.static(tuple(base))
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.in_proj = nnx.Linear(k * embed_dim, width, use_bias=False, **kw)
    self.positions = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(),
                                                             (cfg.max_pieces, width),
                                                             param_dtype))
    self.blocks = nnx.List([_Block(width, cfg, **kw) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(width, epsilon=cfg.eps, **kw)
    # Zero-initialised: the prediction is the heuristic exactly at step 0.
    self.out_proj = nnx.Linear(width, k * embed_dim, use_bias=False,
                               kernel_init=nnx.initializers.zeros, **kw)

  @classmethod
  def for_model(cls, model, tokenizer, cfg: HypernetConfig | None = None, *, name: str = "",
                rngs: nnx.Rngs, param_dtype=jnp.float32) -> "Hypernetwork":
    """A fresh hypernetwork for a base `alm.Transformer` and its tokenizer."""
    emb_in, emb_out = base_tables(model)
    return cls(emb_in.shape[1], tied=emb_out is None, cfg=cfg,
               base=(name, base_fingerprint(tokenizer, emb_in, emb_out)), rngs=rngs,
               param_dtype=param_dtype)

  def __call__(self, pieces: jax.Array, mask: jax.Array, heuristic: jax.Array) -> jax.Array:
    """Predicted embeddings [N, k·D].

    Args:
      pieces: [N, M, k·D] the pieces' base embeddings (input, then output
        when untied), zeros where `mask` is False.
      mask: bool [N, M], True on real pieces (at least the first).
      heuristic: [N, k·D] what the prediction is added to (FVT or first piece).
    """
    x = self.in_proj(pieces) + self.positions[...][None, : pieces.shape[1]]
    for blk in self.blocks:
      x = blk(x, mask)
    delta = self.out_proj(self.final_norm(x[:, 0]))
    return heuristic + delta.astype(heuristic.dtype)


@dataclasses.dataclass(frozen=True)
class Pieces:
  """The hypernetwork's inputs for a new vocabulary (host arrays).

  Attributes:
    ids: int32 [V_new, M] base ids of each new token's first M pieces (0 pad).
    mask: bool [V_new, M].
    predicted: bool [V_new]: the token is predicted (every non-special
      token the base can spell); the others (specials, and the few byte
      values a base vocabulary may lack) take FVT's embedding.
    fvt_in: float32 [V_new, D] FVT input embeddings; fvt_out the output ones
      (None when tied).
    shared: bool [V_new]: a predicted token that is also a base token (same
      bytes; FVT copies its embedding): the targets of ZeTT's lexical loss.
  """

  ids: np.ndarray
  mask: np.ndarray
  predicted: np.ndarray
  fvt_in: np.ndarray
  fvt_out: np.ndarray | None
  shared: np.ndarray | None = None


def new_vocab_pieces(base_tok, new_tok, emb_in: np.ndarray, emb_out: np.ndarray | None,
                     max_pieces: int, *, copy_shared: bool = False,
                     decomposition: fvt.Decomposition | None = None,
                     log: bool = True) -> Pieces:
  """Decomposes every new token by the base tokenizer (see `Pieces`; `copy_shared`:
  tokens the base also has are not predicted, see `HypernetConfig`; `log`: log the
  decomposition's counts and the tokens left to FVT's fallback).

  Raises:
    HypernetError: more than `MAX_UNSPELLABLE` of the new vocabulary cannot be
      spelled by the base tokenizer (no decomposition), naming examples.
  """
  fvt.check_embedding_rows(emb_in.shape[0], base_tok)
  d = fvt.decompose(base_tok, new_tok, log=log) if decomposition is None else decomposition
  fvt.check_decomposition(d, new_tok, emb_in.shape[0])
  special = np.zeros(new_tok.vocab_size, bool)
  special[list(new_tok.special_ids)] = True
  lens = np.diff(d.offsets)
  lost = np.flatnonzero(~special & (lens == 0))
  if lost.size:
    tb = new_tok.token_bytes
    ex = [tb[i] for i in lost[:5]]
    what = (f"{lost.size} regular token(s) of {getattr(new_tok, 'name', 'the new tokenizer')!r} "
            f"cannot be spelled with the base tokenizer's tokens (e.g. ids {lost[:5].tolist()}: "
            f"{ex})")
    if lost.size > MAX_UNSPELLABLE * new_tok.vocab_size:
      raise HypernetError(
          f"{what}, so the hypernetwork has no pieces to read for them. Use a base model "
          "whose tokenizer covers every byte (byte-level BPE), or a new tokenizer without "
          "those tokens.")
    # A few byte values a base vocabulary lacks (SmolLM2: 21, never in valid UTF-8 text or
    # rare controls): not predicted, FVT's fallback (the mean of all embeddings).
    if log:
      logging.warning("%s; they keep FVT's fallback embedding (the mean of all), not a "
                      "prediction.", what)
    special = special | (lens == 0)
  m = max_pieces
  ids = np.zeros((new_tok.vocab_size, m), np.int32)
  take = np.minimum(lens, m)
  pos = np.arange(m)
  mask = pos[None, :] < take[:, None]
  src = d.offsets[:-1, None] + pos[None, :]
  ids[mask] = d.flat[src[mask]]
  fvt_in = fvt.apply_decomposition(emb_in, d).astype(np.float32)
  fvt_out = None if emb_out is None else fvt.apply_decomposition(emb_out, d).astype(np.float32)
  shared = ~special & (d.kind == 0)
  predicted = ~special & ~shared if copy_shared else ~special
  return Pieces(ids=ids, mask=mask, predicted=predicted, fvt_in=fvt_in, fvt_out=fvt_out,
                shared=shared)


def check_base(hypernet: Hypernetwork, base_tok, emb_in, emb_out) -> None:
  """Raises HypernetError unless `hypernet` was made for this base model."""
  name, want = hypernet.base
  if emb_in.shape[1] != hypernet.embed_dim or (emb_out is None) != hypernet.tied:
    raise HypernetError(
        f"This hypernetwork predicts {'tied' if hypernet.tied else 'untied'} embeddings of "
        f"width {hypernet.embed_dim} (base {name or '?'}); the model has "
        f"{'tied' if emb_out is None else 'untied'} embeddings of width {emb_in.shape[1]}. "
        "Use the hypernetwork of this base model (alm.hypernet.zoo lists them).")
  got = base_fingerprint(base_tok, emb_in, emb_out)
  if want and got != want:
    raise HypernetError(
        f"This hypernetwork was trained for base model {name or '?'} (fingerprint {want}); "
        f"the model given has fingerprint {got} (another model, or other weights). Use the "
        "hypernetwork of this base model, or train one for it.")


def piece_buckets(max_pieces: int) -> list[tuple[int, int]]:
  """(more than, at most) piece counts of the prediction buckets: (0, 1], (1, 2], (2, 4], ..."""
  edges = [0]
  while edges[-1] < max_pieces:
    edges.append(min(max(1, 2 * edges[-1]), max_pieces))
  return list(zip(edges[:-1], edges[1:]))


@nnx.jit
def _predict(hypernet, table, ids, mask, heuristic):
  pieces = jnp.take(table, ids, axis=0) * mask[..., None]
  return hypernet(pieces, mask, heuristic)


def predict_embeddings(hypernet: Hypernetwork, model, base_tok, new_tok, *,
                       batch_size: int = 4096, pieces: Pieces | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
  """The new vocabulary's (input, output or None) embeddings, each token predicted once.

  Tokens go through the hypernetwork grouped by their number of pieces
  (buckets of at most 1, 2, 4, ..., `max_pieces` pieces, each read with only
  that many slots: the encoder's attention is masked to the real pieces, so
  the result is the same as with all `max_pieces` slots, at a fraction of the
  cost — most tokens have 1–3 pieces), in batches of `batch_size` (one
  compilation per bucket; a bucket's last batch padded); special tokens take
  FVT's embedding.

  Raises:
    HypernetError: another base model than the hypernetwork's, or a new
      token the base tokenizer cannot spell.
  """
  emb_in, emb_out = base_tables(model)
  check_base(hypernet, base_tok, emb_in, emb_out)
  p = pieces or new_vocab_pieces(base_tok, new_tok, emb_in, emb_out, hypernet.cfg.max_pieces,
                                 copy_shared=hypernet.cfg.copy_shared)
  table = jnp.asarray(emb_in if emb_out is None else np.concatenate([emb_in, emb_out], 1))
  fvt_all = p.fvt_in if p.fvt_out is None else np.concatenate([p.fvt_in, p.fvt_out], 1)
  heur = fvt_all if hypernet.cfg.residual == "mean" else np.asarray(table)[p.ids[:, 0]]
  out = fvt_all.copy()
  count = p.mask.sum(axis=1)
  for lo_m, m in piece_buckets(p.mask.shape[1]):
    rows = np.flatnonzero(p.predicted & (count > lo_m) & (count <= m))
    n = max(1, min(batch_size, len(rows)))
    for lo in range(0, len(rows), n):
      r = rows[lo:lo + n]
      pad = n - len(r)
      rr = np.concatenate([r, np.repeat(r[-1:], pad)]) if pad else r
      got = np.asarray(_predict(hypernet, table, jnp.asarray(p.ids[rr, :m]),
                                jnp.asarray(p.mask[rr, :m]), jnp.asarray(heur[rr])))
      out[r] = got[:len(r)]
  d = emb_in.shape[1]
  return out[:, :d], (None if emb_out is None else out[:, d:])


def transfer(model, base_tok, new_tok, hypernet: Hypernetwork, *, batch_size: int = 4096):
  """The base model moved to `new_tok` with hypernetwork-predicted embeddings.

  Returns an `alm.Transformer` (body shared with `model`, as
  `alm.hypernet.fvt_transformer`'s) that the rest of the toolkit uses as any
  other: training, export, lm-eval.

  Raises:
    HypernetError: another base model than the hypernetwork's, or a new
      token the base tokenizer cannot spell.
  """
  from alm.models import transformer as tfm  # pylint: disable=import-outside-toplevel
  new_in, new_out = predict_embeddings(hypernet, model, base_tok, new_tok, batch_size=batch_size)
  cfg = model.cfg.replace(vocab_size=new_tok.vocab_size, bos_token_id=new_tok.bos_id,
                          eos_token_id=new_tok.eos_id, pad_token_id=getattr(new_tok, "pad_id",
                                                                            None))
  student = tfm.abstract_transformer(cfg, dtype=model.dtype, param_dtype=model.param_dtype)
  student.embedder.embedding.set_value(jnp.asarray(new_in, model.param_dtype))
  if student.lm_head is not None:
    student.lm_head.kernel.set_value(jnp.asarray(new_out.T, model.param_dtype))
  student.layers = model.layers
  student.final_norm = model.final_norm
  return student


def num_params(hypernet: Hypernetwork) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(hypernet, nnx.Param))))
