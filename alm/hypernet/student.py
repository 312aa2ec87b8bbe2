"""The hypernetwork student kind: the frozen base, embeddings predicted per batch (SPEC §11).

Training a hypernetwork is distillation where the student is the base model
itself with a *sampled* tokenizer whose embeddings the hypernetwork predicts,
and the teacher is the base model with its own tokenizer. Each batch carries
its student vocabulary (`alm.hypernet.batches.hypernet_batch`: the
`student_vocab_*` arrays of K local rows); the engine hands them to the
student (`vocab=`), which predicts the K rows, embeds the batch's local ids
with them, runs the shared frozen body, and scores the K rows (padding rows
−inf; the output softmax is over the batch's tokens + negatives, as in ZeTT).
Only the hypernetwork trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm.hypernet.hypernet import HypernetConfig, Hypernetwork, base_tables
from alm.models.transformer import ModelOutput, Transformer
from alm.training.config import TrainConfigError
from alm.training.students import StudentKind, Teacher, _param_at, register_kind


# Rows of a batch's vocabulary predicted at once (bounds the hypernetwork's activations).
ROW_CHUNK = 4096


@flax.struct.dataclass
class HypernetOutput(ModelOutput):
  """A hypernetwork student's output: the model's, plus the batch's K local rows.

  Attributes:
    rows: [K, k·D] the rows the batch was embedded and scored with (predicted,
      FVT's where not predicted; input then output when untied): what the
      lexical term (`alm.training.methods.lexical`) compares with the base's.
  """

  rows: jax.Array | None = None


class _Table(nnx.Variable):
  """The base's embedding rows the pieces are read from (frozen)."""


class HypernetStudent(nnx.Module):
  """The base body with hypernetwork-predicted embeddings for each batch's vocabulary.

  Args:
    base: the base Transformer (its body is shared with the teacher, frozen).
    hypernet: the hypernetwork (trained).
  """

  def __init__(self, base: Transformer, hypernet: Hypernetwork):
    emb_in, emb_out = base_tables(base)
    table = emb_in if emb_out is None else np.concatenate([emb_in, emb_out], 1)
    self.transformer = base
    self.hypernet = hypernet
    self.table = _Table(jnp.asarray(table))
    self.projector = None

  def rows(self, vocab: dict[str, jax.Array]) -> jax.Array:
    """The K local rows [K, k·D]: predicted, or FVT's where not predicted.

    Rows go through the hypernetwork bucket by bucket when the batch is laid
    out in piece buckets (`alm.hypernet.batches`), else in chunks of
    `ROW_CHUNK` (a whole vocabulary of an evaluation tokenizer never holds its
    [K, M, width] activations at once).
    """
    fvt = vocab["fvt_in"] if "fvt_out" not in vocab else jnp.concatenate(
        [vocab["fvt_in"], vocab["fvt_out"]], axis=-1)
    table = self.table[...]

    def predict(ids, mask, fvt_rows):
      pieces = jnp.take(table, ids, axis=0) * mask[..., None]
      heur = fvt_rows if self.hypernet.cfg.residual == "mean" else pieces[:, 0]
      return self.hypernet(pieces, mask, heur)

    buckets = sorted((int(key[len("pieces_"):]), key) for key in vocab
                     if key.startswith("pieces_"))
    if buckets:  # the piece-bucket layout (alm.hypernet.batches): m slots per bucket
      parts, lo = [], 0
      for m, key in buckets:
        c = vocab[key].shape[0]
        parts.append(predict(vocab[key], vocab[f"mask_{m}"], fvt[lo:lo + c]))
        lo += c
      return jnp.where(vocab["predict"][:, None], jnp.concatenate(parts), fvt)
    k = fvt.shape[0]
    if k <= ROW_CHUNK:
      pred = predict(vocab["pieces"], vocab["mask"], fvt)
    else:
      n = -(-k // ROW_CHUNK)
      pad = n * ROW_CHUNK - k
      chunk = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
          n, ROW_CHUNK, *x.shape[1:])
      pred = jax.lax.map(lambda a: predict(*a), (chunk(vocab["pieces"]),
                                                 chunk(vocab["mask"]), chunk(fvt)))
      pred = pred.reshape(n * ROW_CHUNK, -1)[:k]
    return jnp.where(vocab["predict"][:, None], pred, fvt)

  def __call__(self, input_ids, *, attention_mask=None, segment_ids=None, positions=None,
               hidden_layers=(), vocab: dict[str, jax.Array] | None = None) -> ModelOutput:
    if vocab is None:
      raise ValueError("A hypernetwork student reads its batch's vocabulary (the "
                       "student_vocab_* arrays of alm.hypernet.batches.hypernet_batch).")
    t = self.transformer
    cfg = t.cfg
    d = cfg.hidden_size
    rows = self.rows(vocab)
    emb_in = rows[:, :d]
    emb_out = emb_in if rows.shape[1] == d else rows[:, d:]
    x = jnp.take(emb_in, input_ids, axis=0).astype(t.dtype)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(d), t.dtype)
    n = cfg.num_layers
    wanted = {l + n + 1 if l < 0 else l for l in hidden_layers}
    out = t(inputs_embeds=x, attention_mask=attention_mask, segment_ids=segment_ids,
            positions=positions, hidden_layers=tuple(sorted(wanted | {n})))
    h = t.final_norm(out.hidden_states[n].astype(t.dtype))
    logits = jnp.dot(h, emb_out.astype(t.dtype).T)
    if cfg.final_logit_softcap:
      cap = cfg.final_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(vocab["valid"], logits, -jnp.inf)
    return HypernetOutput(logits=logits, hidden_states={l: out.hidden_states[l] for l in wanted},
                          cache=None, rows=rows)


@register_kind
class HypernetKind(StudentKind):
  """Hypernetwork training: only the hypernetwork trains; the base is teacher and body.

  Args:
    hypernet: the hypernetwork to train (`Hypernetwork.for_model(base, base_tok)`).
  """

  name = "hypernet"

  def __init__(self, hypernet: Hypernetwork):
    self.hypernet = hypernet

  def build(self, teacher, teacher_tok, student_tok, adapters, rngs):
    del teacher_tok, student_tok, rngs
    if adapters.lora_rank or adapters.train_body or adapters.projector:
      raise TrainConfigError("Hypernetwork training trains the hypernetwork only: pass "
                             "lora_rank=0, train_body=False, projector=False.")
    return Teacher(teacher), HypernetStudent(teacher, self.hypernet)

  @classmethod
  def trainable(cls, adapters):
    del adapters
    return [_param_at(("student", "hypernet"))]

  @classmethod
  def export(cls, model, directory, tokenizer):
    """Writes the hypernetwork (`save_hypernet`); `tokenizer` is unused (any will do)."""
    del tokenizer
    return save_hypernet(model.student.hypernet, directory)


HYPERNET_FILE = "hypernet.safetensors"
CONFIG_FILE = "hypernet.json"


def save_hypernet(hypernet: Hypernetwork, directory) -> Path:
  """Writes a hypernetwork: `hypernet.json` (sizes, base) + `hypernet.safetensors`."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(hypernet, nnx.Param))[0]}
  save_file(flat, str(d / HYPERNET_FILE))
  name, fingerprint = hypernet.base
  meta = {"format": "alm-hypernet", "version": 1, "config": hypernet.cfg.__dict__,
          "embed_dim": hypernet.embed_dim, "tied": hypernet.tied,
          "base": {"name": name, "fingerprint": fingerprint}}
  (d / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  return d


def load_hypernet(directory) -> Hypernetwork:
  """Reads a hypernetwork written by `save_hypernet`.

  Raises:
    FileNotFoundError: no hypernetwork there (names the files expected).
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  d = Path(directory)
  if not (d / CONFIG_FILE).exists() or not (d / HYPERNET_FILE).exists():
    raise FileNotFoundError(f"No hypernetwork at {d} (expected {CONFIG_FILE} and "
                            f"{HYPERNET_FILE}, written by alm.hypernet.student.save_hypernet).")
  meta = json.loads((d / CONFIG_FILE).read_text())
  hn = Hypernetwork(meta["embed_dim"], tied=meta["tied"], cfg=HypernetConfig(**meta["config"]),
                    base=(meta["base"]["name"], meta["base"]["fingerprint"]),
                    rngs=nnx.Rngs(0))
  flat = load_file(str(d / HYPERNET_FILE))
  state = nnx.state(hn, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  missing = [jax.tree_util.keystr(p) for p, _ in leaves if jax.tree_util.keystr(p) not in flat]
  if missing:
    raise ValueError(f"{d / HYPERNET_FILE} lacks {missing[:3]}: not this hypernetwork's file.")
  new = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                     [jnp.asarray(flat[jax.tree_util.keystr(p)])
                                      for p, _ in leaves])
  nnx.update(hn, new)
  return hn
