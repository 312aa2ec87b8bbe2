"""Ensembles (alm.eval.ensemble) against float64 numpy references and brute force.

The references take each member's plain logits, cut them to the tokenizer's
vocabulary and combine them in float64 (log of the weighted mean softmax, or
the weighted mean of logits). Lockstep generation is checked against a loop
that re-runs full forwards of every member on the growing sequence, one
prompt at a time, and takes the argmax of the combined distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from alm.eval import scoring
from alm.eval.ensemble import (Ensemble, EnsembleError, check_same_vocabulary, member_id_map,
                               generate_ensemble, load_ensemble)
from alm.models.generate import SamplingConfig, generate
from alm.models.transformer import InputError
from alm.testing.models import tiny_model
from alm.testing.tokenizers import tiny_tokenizer

_LEN = 32  # every plain forward here is right-filled to this length: one compile per model


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer("bpe", 300)


@pytest.fixture(scope="module")
def members(tok):
  v = tok.vocab_size
  return [tiny_model("llama", v, seed=1),
          tiny_model("qwen2", v + 5, seed=2),  # 5 padding rows, never combined
          tiny_model("gemma2", v, seed=3)]


@nnx.jit
def _forward(model, ids):
  return model(ids).logits


def _plain_logits(model, seq):
  """Float64 logits [len(seq), V_m] of one unpadded sequence (causal: fill is harmless)."""
  ids = np.zeros((1, _LEN), np.int32)
  ids[0, :len(seq)] = seq
  return np.asarray(_forward(model, ids), np.float64)[0, :len(seq)]


def _log_softmax64(x):
  m = x.max(-1, keepdims=True)
  return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


def _combine64(logits, weights, mode, v):
  """The float64 reference of `Ensemble.combine`: logits is a list of [..., V_m]."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  zs = [z[..., :v] for z in logits]
  if mode == "prob":
    return np.log(sum(wm * np.exp(_log_softmax64(z)) for wm, z in zip(w, zs)))
  return sum(wm * z for wm, z in zip(w, zs))


def _ref_logprobs(models, weights, mode, v, seq):
  """Log-probs [len(seq), V] of the combined distribution after each prefix."""
  return _log_softmax64(_combine64([_plain_logits(m, seq) for m in models], weights, mode, v))


def _seqs(tok):
  texts = ["The function returns a new list.", "If the value is"]
  return [tok.encode(t).ids.astype(np.int32) for t in texts]


def _harness():
  pytest.importorskip("lm_eval")
  from alm.eval import harness  # pylint: disable=import-outside-toplevel
  return harness


def _inst(kind, args, i=0):
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_combined_distribution_matches_float64_reference(tok, members, mode):
  weights = [1.0, 2.0, 3.0]
  ens = Ensemble(members, tok, mode=mode, weights=weights)
  seq = _seqs(tok)[0]
  got = np.asarray(ens(seq[None]).logits, np.float64)[0]
  assert got.shape == (len(seq), tok.vocab_size)
  want = _combine64([_plain_logits(m, seq) for m in members], weights, mode, tok.vocab_size)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if mode == "prob":  # log-probs: every row sums to one
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)


def test_one_model_ensemble_is_its_log_softmax(tok, members):
  seq = _seqs(tok)[1]
  z = _plain_logits(members[0], seq)
  got = np.asarray(Ensemble(members[:1], tok)(seq[None]).logits, np.float64)[0]
  np.testing.assert_allclose(got, _log_softmax64(z), rtol=1e-5, atol=1e-5)
  got = np.asarray(Ensemble(members[:1], tok, mode="logit", weights=[7.0])(seq[None]).logits)[0]
  np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-5)  # eager vs jitted forward


def test_score_tokens_and_harness_use_the_combined_distribution(tok, members):
  ALMLM = _harness().ALMLM  # pylint: disable=invalid-name
  models, weights = members[:2], [1.0, 3.0]
  ens = Ensemble(models, tok, weights=weights)
  v = tok.vocab_size

  # score_tokens on a right-padded batch.
  seqs = _seqs(tok)
  ids = np.zeros((2, _LEN), np.int32)
  mask = np.zeros((2, _LEN), bool)
  for r, s in enumerate(seqs):
    ids[r, :len(s)], mask[r, :len(s)] = s, True
  sc = scoring.score_tokens(ens, ids, mask, greedy=True)
  for r, s in enumerate(seqs):
    lp = _ref_logprobs(models, weights, "prob", v, s)
    want = [lp[t - 1, s[t]] for t in range(1, len(s))]
    np.testing.assert_allclose(np.asarray(sc.logprobs)[r, 1:len(s)], want, rtol=1e-5, atol=1e-5)
    assert list(np.asarray(sc.greedy)[r, 1:len(s)]) == [
        lp[t - 1].argmax() == s[t] for t in range(1, len(s))]

  # lm-eval likelihoods (pairs and rolling).
  lm = ALMLM(model=ens, tokenizer=tok, batch_size=4, max_length=64)
  pairs = [("The function", " returns"), ("If the value is", " None."), ("", "Hello")]
  got = lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)],
                         disable_tqdm=True)
  for p, (lp_sum, greedy) in zip(pairs, got):
    pair_ids, n = lm.encode_pair(*p)
    lp = _ref_logprobs(models, weights, "prob", v, pair_ids)
    span = range(len(pair_ids) - n, len(pair_ids))
    assert lp_sum == pytest.approx(sum(lp[t - 1, pair_ids[t]] for t in span), rel=1e-5)
    assert greedy == all(lp[t - 1].argmax() == pair_ids[t] for t in span)
  text = "Return a new list of values."
  (rolled,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))],
                                       disable_tqdm=True)
  full = np.asarray([lm.prefix_token_id] + list(tok.encode(text, add_special_tokens=False).ids))
  lp = _ref_logprobs(models, weights, "prob", v, full)
  assert rolled == pytest.approx(sum(lp[t - 1, full[t]] for t in range(1, len(full))), rel=1e-5)


def _left_padded(seqs):
  t = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), t), np.int32)
  mask = np.zeros((len(seqs), t), bool)
  for r, s in enumerate(seqs):
    ids[r, t - len(s):], mask[r, t - len(s):] = s, True
  return ids, mask


def test_one_model_ensemble_generates_like_generate(tok, members):
  ids, mask = _left_padded(_seqs(tok))
  ens = Ensemble(members[:1], tok)
  for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, top_k=20)):
    want = generate(members[0], ids, attention_mask=mask, max_new_tokens=6, sampling=sampling,
                    seed=5)
    got = generate_ensemble(ens, ids, attention_mask=mask, max_new_tokens=6, sampling=sampling,
                            seed=5)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)


def _brute_force_greedy(models, weights, mode, v, prompt, n_new):
  """Greedy continuation: full forwards of every member on the growing sequence."""
  seq = list(prompt)
  for _ in range(n_new):
    combined = _combine64([_plain_logits(m, seq)[-1] for m in models], weights, mode, v)
    seq.append(int(combined.argmax()))
  return seq[len(prompt):]


# Weights chosen so that, for these tiny models, the ensemble's greedy text
# differs from each member's own (checked below): the test sees the mixture.
@pytest.mark.parametrize("mode,weights", [("prob", [2.0, 1.0]), ("logit", None)])
def test_lockstep_generation_matches_brute_force(tok, members, mode, weights):
  models, n_new, v = members[:2], 5, tok.vocab_size
  seqs = _seqs(tok)
  ids, mask = _left_padded(seqs)
  ens = Ensemble(models, tok, mode=mode, weights=weights)
  got = generate_ensemble(ens, ids, attention_mask=mask, max_new_tokens=n_new)
  for r, s in enumerate(seqs):
    want = _brute_force_greedy(models, weights or [1.0, 1.0], mode, v, s, n_new)
    assert list(got.tokens[r]) == want, r
    for m in models:
      assert _brute_force_greedy([m], [1.0], mode, v, s, n_new) != want
  # EOS: a row stops after its first EOS (lengths count it), then holds pad_id.
  eos = int(got.tokens[0, 1])
  stop = generate_ensemble(ens, ids, attention_mask=mask, max_new_tokens=n_new, eos_id=eos,
                           pad_id=7)
  for r in range(2):
    row = list(got.tokens[r])
    k = row.index(eos) + 1 if eos in row else n_new
    assert stop.lengths[r] == k and list(stop.tokens[r]) == row[:k] + [7] * (n_new - k), r


def test_generate_until_uses_lockstep_generation(tok, members):
  ALMLM = _harness().ALMLM  # pylint: disable=invalid-name
  ens = Ensemble(members[:2], tok)
  lm = ALMLM(model=ens, tokenizer=tok, batch_size=2, max_length=64)
  prompts, kw = ["The function", "If the value is"], {"until": ["\n"], "max_gen_toks": 4}
  got = lm.generate_until([_inst("generate_until", (p, kw), i)
                           for i, p in enumerate(prompts)], disable_tqdm=True)
  for p, text in zip(prompts, got):
    want = _brute_force_greedy(members[:2], [1.0, 1.0], "prob", tok.vocab_size,
                               tok.encode(p).ids, 4)
    if tok.eos_id in want:
      want = want[:want.index(tok.eos_id) + 1]
    assert text == tok.decode(want).split("\n")[0], p


def test_different_vocabularies_are_refused_with_the_fix(tok, monkeypatch):
  small = tiny_tokenizer("bpe", 280)
  check_same_vocabulary([("a", tok), ("b", tiny_tokenizer("bpe", 300))])  # identical: fine
  with pytest.raises(EnsembleError, match=r"'b' vs 'a': vocab_size 300 vs 280.*transfer_tokenizer"):
    check_same_vocabulary([("a", tok), ("b", small)])

  loaded = {"m300": (tiny_model("llama", 300, seed=1), tok),
            "m280": (tiny_model("llama", 280, seed=1), small)}
  monkeypatch.setattr("alm.models.loading.load_model", lambda name, **kw: loaded[name])
  ens, shared = load_ensemble(["m300", "m300"], mode="logit")
  assert shared is tok and len(ens.models) == 2 and ens.mode == "logit"
  with pytest.raises(EnsembleError, match=r"'m280' and 'm300' differ in \d+ regular.*"
                                           r"transfer_tokenizer"):
    load_ensemble(["m300", "m280"])


def test_bad_arguments_are_named(tok, members):
  with pytest.raises(EnsembleError, match="at least one model"):
    Ensemble([], tok)
  with pytest.raises(EnsembleError, match="mode='mean' is not valid; choose one of: prob, logit"):
    Ensemble(members[:1], tok, mode="mean")
  with pytest.raises(EnsembleError, match="positive"):
    Ensemble(members[:2], tok, weights=[1.0, 0.0])
  with pytest.raises(EnsembleError, match="one weight per model"):
    Ensemble(members[:2], tok, weights=[1.0])
  with pytest.raises(EnsembleError, match="260 output rows.*300 ids.*transfer_tokenizer"):
    Ensemble([members[0], tiny_model("llama", 260)], tok)
  ens = Ensemble(members[:1], tok)
  assert ens.weights == (1.0,)
  with pytest.raises(InputError, match="left-pad"):
    generate_ensemble(ens, np.ones((1, 4), np.int32), attention_mask=[[1, 1, 1, 0]],
                      max_new_tokens=2)
  with pytest.raises(InputError, match="out of range"):
    generate_ensemble(ens, np.full((1, 4), 300, np.int32), max_new_tokens=2)


# Members with their own special tokens (SPEC §12) -------------------------------------


def _variant(tok, name, *, specials_first=None, extra_special=None, bos=True):
  """`tok` with its specials at other ids, one more special, or no BOS role."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from alm.tokenization.hf import HFTokenizer  # pylint: disable=import-outside-toplevel
  hf = tokenizers.Tokenizer.from_str(tok.hf_tokenizer.to_str())
  if specials_first is not None:  # rewrite the ids of the three specials (regular ids stay)
    import json  # pylint: disable=import-outside-toplevel
    d = json.loads(hf.to_str())
    ids = {t: i for i, t in enumerate(specials_first)}
    for a in d["added_tokens"]:
      a["id"] = ids[a["content"]]
    d["model"]["vocab"] = {k: ids.get(k, v) for k, v in d["model"]["vocab"].items()}
    hf = tokenizers.Tokenizer.from_str(json.dumps(d))
  if extra_special:
    hf.add_special_tokens([extra_special])
  out = HFTokenizer(hf, name=name, bos_token="<bos>", eos_token="<eos>", add_bos=bos)
  if not bos:  # a tokenizer without a BOS role (Qwen-style); "<bos>" stays a special
    out._bos_id = None  # pylint: disable=protected-access
  return out


def _member_logits64(model, seq, id_map):
  """Float64 [len(seq), V] logits of a member reading the shared ids through id_map."""
  z = _plain_logits(model, id_map[np.asarray(seq)])
  return np.where(id_map >= 0, z[:, np.maximum(id_map, 0)], -np.inf)


def test_member_id_map_by_bytes_role_and_text(tok):
  perm = _variant(tok, "perm", specials_first=("<bos>", "<eos>", "<pad>"))
  assert (perm.bos_id, perm.eos_id) == (0, 1) and (tok.bos_id, tok.eos_id) == (1, 2)
  m = member_id_map(tok, perm)
  assert list(m[:3]) == [2, 0, 1]  # <pad> by its text, <bos> and <eos> by role
  np.testing.assert_array_equal(m[3:], np.arange(3, tok.vocab_size))
  assert member_id_map(tok, tiny_tokenizer("bpe", 300)) is None  # identical
  no_bos = _variant(tok, "nobos", bos=False)
  assert member_id_map(tok, no_bos)[tok.bos_id] == no_bos.eos_id  # the harness's prefix rule
  extra = _variant(tok, "extra", extra_special="<|end|>")
  assert list(member_id_map(extra, tok)[-1:]) == [-1]  # the shared <|end|>: model lacks it
  np.testing.assert_array_equal(member_id_map(tok, extra), np.arange(tok.vocab_size))


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_members_with_their_own_specials_match_float64_reference(tok, mode):
  # The shared tokenizer has one special more than member 1; member 1's specials
  # sit at other ids. Each member reads its own ids; <|end|> is excluded.
  shared = _variant(tok, "shared", extra_special="<|end|>")
  perm = _variant(tok, "perm", specials_first=("<bos>", "<eos>", "<pad>"))
  models = [tiny_model("llama", shared.vocab_size, seed=1), tiny_model("qwen2", 300, seed=2)]
  maps = [member_id_map(shared, shared), member_id_map(shared, perm)]
  assert maps[0] is None and maps[1][-1] == -1
  ens = Ensemble(models, shared, mode=mode, weights=[1.0, 2.0], id_maps=maps)
  seq = shared.encode("If the value is None, return").ids.astype(np.int32)
  assert seq[0] == shared.bos_id
  got = np.asarray(ens(seq[None]).logits, np.float64)[0]
  full = [np.arange(shared.vocab_size, dtype=np.int32), maps[1]]
  zs = [_member_logits64(m, seq, a) for m, a in zip(models, full)]
  w = np.array([1.0, 2.0]) / 3.0
  if mode == "prob":
    with np.errstate(divide="ignore"):
      want = np.log(sum(wm * np.exp(_log_softmax64(np.where(full[1] >= 0, z, -np.inf)))
                        for wm, z in zip(w, zs)))
  else:
    want = sum(wm * z for wm, z in zip(w, zs))
  assert np.isneginf(got[:, -1]).all()  # <|end|>: not every member has it
  np.testing.assert_allclose(got[:, :-1], want[:, :-1], rtol=1e-5, atol=1e-5)
  # Generation in lockstep reads the same combination; an id a member lacks is refused.
  out = generate_ensemble(ens, seq[None], max_new_tokens=3)
  ref = list(seq)
  for _ in range(3):
    ref.append(int(np.asarray(ens(np.asarray(ref, np.int32)[None]).logits)[0, -1].argmax()))
  assert list(out.tokens[0]) == ref[len(seq):]
  with pytest.raises(EnsembleError, match=rf"\[{shared.vocab_size - 1}\].*model 1 does not "
                                          "have"):
    ens(np.append(seq, shared.vocab_size - 1)[None])
