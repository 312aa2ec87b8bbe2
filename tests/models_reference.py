"""An independent float64 numpy forward of a decoder-only transformer.

Written from the architecture descriptions (HF modeling code conventions,
llama.cpp conventions for GGUF weights), not from alm.models: it shares no
code with it. Weights are given through a `get(key, layer)` callable in a
uniform [out, in] layout, so the same reference runs on raw GGUF tensors
(llama.cpp conventions: Q/K rows permuted for interleaved RoPE, Gemma norm
weights already including the +1) and on the parameters of tiny alm models.

`Arch` lists the facts the forward needs; tests fill it from ASSETS.md (real
models) or from the tiny configs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass
class Arch:
  n_layers: int
  d: int
  n_heads: int
  n_kv: int
  head_dim: int
  eps: float
  act: str  # "silu" | "gelu_tanh"
  rope_style: str  # "interleaved" (llama.cpp on GGUF llama) | "half" (HF / NEOX)
  rope_base: list[float]  # per layer
  window: list[int | None]  # per layer sliding window (None = full causal)
  tied: bool = True
  sandwich: bool = False
  qk_norm: bool = False
  embed_scale: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  query_scale: float | None = None  # attention logits multiplier (default head_dim**-0.5)
  attn_softcap: float | None = None
  final_softcap: float | None = None
  llama3_scaling: tuple[float, float, float, int] | None = None  # factor, low, high, orig ctx
  linear_scaling: list[float] | None = None  # per layer factor


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _freqs(a: Arch, layer: int) -> np.ndarray:
  hd = a.head_dim
  f = a.rope_base[layer] ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  if a.linear_scaling is not None:
    f = f / a.linear_scaling[layer]
  if a.llama3_scaling is not None:
    factor, low, high, orig = a.llama3_scaling
    out = []
    for fr in f:
      wavelen = 2 * math.pi / fr
      if wavelen < orig / high:
        out.append(fr)
      elif wavelen > orig / low:
        out.append(fr / factor)
      else:
        s = (orig / wavelen - low) / (high - low)
        out.append((1 - s) * fr / factor + s * fr)
    f = np.array(out)
  return f


def _rope(x, pos, freqs, style):
  """x [T, N, hd]; rotates pairs (2i, 2i+1) ("interleaved") or (i, i + hd/2) ("half")."""
  ang = pos[:, None] * freqs[None, :]  # [T, hd/2]
  c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  out = np.empty_like(x)
  if style == "interleaved":
    a, b = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
  else:
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    out[..., :h] = a * c - b * s
    out[..., h:] = a * s + b * c
  return out


def forward(a: Arch, get: Callable[[str, int | None], np.ndarray], ids: np.ndarray,
            hidden: bool = False):
  """Logits [T, V] (float64) of one sequence `ids` [T] (and per-layer residuals if `hidden`).

  `get(key, layer)` returns float64 weights: keys "embed" [V, D], "final_norm",
  "lm_head" [V, D]; per layer "attn_norm", "q", "k", "v", "o" ([out, in]),
  "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm", "post_attn_norm",
  "mlp_norm", "gate", "up", "down", "post_mlp_norm". Norm weights are the full
  multipliers.
  """
  t = len(ids)
  pos = np.arange(t, dtype=np.float64)
  x = get("embed", None)[ids]
  if a.embed_scale:
    x = x * math.sqrt(a.d)
  states = [x]
  g = a.n_heads // a.n_kv
  scale = a.query_scale if a.query_scale is not None else a.head_dim ** -0.5
  for l in range(a.n_layers):
    h = _rms(x, get("attn_norm", l), a.eps)
    q = h @ get("q", l).T
    k = h @ get("k", l).T
    v = h @ get("v", l).T
    if a.qkv_bias:
      q, k, v = q + get("q_bias", l), k + get("k_bias", l), v + get("v_bias", l)
    q = q.reshape(t, a.n_heads, a.head_dim)
    k = k.reshape(t, a.n_kv, a.head_dim)
    v = v.reshape(t, a.n_kv, a.head_dim)
    if a.qk_norm:
      q = _rms(q, get("q_norm", l), a.eps)
      k = _rms(k, get("k_norm", l), a.eps)
    f = _freqs(a, l)
    q = _rope(q, pos, f, a.rope_style)
    k = _rope(k, pos, f, a.rope_style)
    out = np.zeros((t, a.n_heads, a.head_dim))
    for hh in range(a.n_heads):
      kk, vv = k[:, hh // g], v[:, hh // g]
      s = (q[:, hh] @ kk.T) * scale  # [T, T]
      if a.attn_softcap:
        s = a.attn_softcap * np.tanh(s / a.attn_softcap)
      i, j = np.arange(t)[:, None], np.arange(t)[None, :]
      allowed = j <= i
      if a.window[l] is not None:
        allowed &= (i - j) < a.window[l]
      s = np.where(allowed, s, -np.inf)
      s = s - s.max(axis=1, keepdims=True)
      p = np.exp(s)
      p /= p.sum(axis=1, keepdims=True)
      out[:, hh] = p @ vv
    o = out.reshape(t, -1) @ get("o", l).T
    if a.out_bias:
      o = o + get("o_bias", l)
    if a.sandwich:
      o = _rms(o, get("post_attn_norm", l), a.eps)
    x = x + o
    h = _rms(x, get("mlp_norm", l), a.eps)
    gate = h @ get("gate", l).T
    gate = gate / (1 + np.exp(-gate)) if a.act == "silu" else _gelu_tanh(gate)
    m = (gate * (h @ get("up", l).T)) @ get("down", l).T
    if a.sandwich:
      m = _rms(m, get("post_mlp_norm", l), a.eps)
    x = x + m
    states.append(x)
  x = _rms(x, get("final_norm", None), a.eps)
  logits = x @ (get("embed", None) if a.tied else get("lm_head", None)).T
  if a.final_softcap:
    logits = a.final_softcap * np.tanh(logits / a.final_softcap)
  return (logits, states) if hidden else logits
