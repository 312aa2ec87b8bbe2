"""The lm-eval backend against an independent computation written here.

The reference encodes each request itself (joint encoding, continuation =
the tokens holding its bytes, lm-eval's whitespace rule), runs one plain
unbatched forward per request and takes a float64 numpy log-softmax; the
backend batches, sorts, buckets and pads. Rolling log-likelihoods follow
lm-eval's window definition, generation is compared with `alm.generate` run
on one prompt at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # pylint: disable=wrong-import-position

from alm.eval.harness import ALMLM  # pylint: disable=wrong-import-position
from alm.models.generate import generate  # pylint: disable=wrong-import-position
from alm.testing.models import tiny_model  # pylint: disable=wrong-import-position
from alm.testing.tokenizers import tiny_corpus, tiny_tokenizer  # pylint: disable=wrong-import-position
from alm.tokenization import chat as chat_lib  # pylint: disable=wrong-import-position


def _inst(kind, args, i=0):
  return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


@nnx.jit
def _forward(model, ids):
  return model(ids).logits


def _plain_logits(model, ids, length=128):
  """Logits [len(ids), V] of one sequence (see `_plain_logits_rows`)."""
  return _plain_logits_rows(model, [ids], length)[0]


def _plain_logits_rows(model, seqs, length=128, rows=8):
  """Logits [len(s), V] of each sequence: plain forwards, no attention mask.

  Sequences go `rows` at a time in their given order, each right-filled to one
  fixed `length`, so every call reuses one compilation (causal attention: what
  follows a position never changes its logits).
  """
  out = []
  for s in range(0, len(seqs), rows):
    group = seqs[s:s + rows]
    batch = np.zeros((rows, length), np.int32)
    for r, ids in enumerate(group):
      assert len(ids) <= length
      batch[r, :len(ids)] = ids
    logits = np.asarray(_forward(model, batch))
    out += [logits[r, :len(ids)] for r, ids in enumerate(group)]
  return out


def _reference_split(tok, context, continuation, prefix_id):
  """Joint encoding; the continuation is every token holding one of its bytes."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  context = stripped
  enc = tok.encode(context + continuation)
  boundary = len(context.encode())
  idx = [i for i in range(len(enc)) if enc.ends[i] > boundary and not enc.special[i]]
  ids = list(enc.ids)
  first = idx[0]
  if first == 0:
    ids, first = [prefix_id] + ids, 1
  return ids, first


def reference_loglikelihoods(model, tok, pairs, prefix_id, length=128):
  """Independent (log-likelihood, is_greedy) of each (context, continuation)."""
  splits = [_reference_split(tok, c, x, prefix_id) for c, x in pairs]
  out = []
  for (ids, first), logits in zip(splits, _plain_logits_rows(model, [i for i, _ in splits],
                                                              length)):
    logits = logits[first - 1:len(ids) - 1]  # the rows predicting ids[first:]
    lp = _log_softmax64(logits)
    targets = ids[first:]
    out.append((sum(lp[k, tgt] for k, tgt in enumerate(targets)),
                all(int(np.argmax(logits[k])) == tgt for k, tgt in enumerate(targets))))
  return out


def reference_loglikelihood(model, tok, context, continuation, prefix_id, length=128):
  return reference_loglikelihoods(model, tok, [(context, continuation)], prefix_id, length)[0]


@pytest.fixture(scope="module")
def tiny():
  tok = tiny_tokenizer("bpe", 300)
  model = tiny_model("llama", tok.vocab_size, seed=3)
  return model, tok


def cut_pairs(texts, n, *, seed=0, max_context=40, max_continuation=30):
  """n (context, continuation) pairs cut at random character offsets of `texts`."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    t = texts[rng.integers(len(texts))]
    a = int(rng.integers(0, max_context))
    b = int(rng.integers(a + 1, a + max_continuation))
    out.append((t[:a], t[a:b]))
  return out


def _pairs(n, seed=0):
  texts = [t for t in tiny_corpus() if len(t) > 60]
  return cut_pairs(texts, n, seed=seed) + [("The answer is ", "42"), ("", "hello world"),
                                           ("x", " y"), ("ab", "c")]


def test_loglikelihood_matches_independent_reference(tiny):
  model, tok = tiny
  lm = ALMLM(model=model, tokenizer=tok, batch_size=5, max_length=256)
  pairs = _pairs(40)
  got = lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)],
                         disable_tqdm=True)
  want = reference_loglikelihoods(model, tok, pairs, lm.prefix_token_id)
  for (ctx, cont), (lp, greedy), (want, want_greedy) in zip(pairs, got, want):
    assert lp == pytest.approx(want, rel=1e-5, abs=1e-4), (ctx, cont)
    assert greedy == want_greedy, (ctx, cont)


def test_is_greedy_true_for_the_models_own_argmax(tiny):
  model, tok = tiny
  lm = ALMLM(model=model, tokenizer=tok, max_length=64)
  ctx = "Return the"
  ids = tok.encode(ctx).ids
  for _ in range(3):  # greedy continuation, token by token
    nxt = int(np.argmax(_plain_logits(model, ids)[-1]))
    ids = np.append(ids, nxt)
  # Scored as token requests (text would re-tokenise the random model's tokens).
  other = ids.copy()
  other[-1] = (other[-1] + 1) % tok.vocab_size
  (_, greedy), (_, not_greedy) = lm.score_requests([(ids, 3), (other, 3)], disable_tqdm=True)
  assert greedy and not not_greedy


def test_pair_splitting_conventions(tiny):
  _, tok = tiny
  lm = ALMLM(model=tiny[0], tokenizer=tok)
  # Trailing whitespace of the context belongs to the continuation.
  ids_a, n_a = lm.encode_pair("Question: 2 + 2 =", " 4")
  ids_b, n_b = lm.encode_pair("Question: 2 + 2 = ", "4")
  assert list(ids_a) == list(ids_b) and n_a == n_b
  # Empty context: the continuation is conditioned on BOS (this tokenizer adds it).
  ids, n = lm.encode_pair("", "hello")
  assert ids[0] == tok.bos_id and n == len(ids) - 1
  with pytest.raises(ValueError, match="empty continuation"):
    lm.encode_pair("context", "")


def test_prefix_token_without_bos_is_eos():
  tok = tiny_tokenizer("bpe", 300, add_bos=False)
  model = tiny_model("llama", tok.vocab_size, seed=1)
  lm = ALMLM(model=model, tokenizer=tok)
  assert lm.prefix_token_id == tok.bos_id  # the tokenizer has a BOS id, only does not add it
  ids, n = lm.encode_pair("", "hello there")
  assert ids[0] == tok.bos_id and n == len(ids) - 1
  (lp, _), = lm.loglikelihood([_inst("loglikelihood", ("", "hello there"))], disable_tqdm=True)
  want, _ = reference_loglikelihood(model, tok, "", "hello there", tok.bos_id)
  assert lp == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("max_length", [12, 512])
def test_loglikelihood_rolling_matches_windows(tiny, max_length):
  model, tok = tiny
  lm = ALMLM(model=model, tokenizer=tok, max_length=max_length, batch_size=3)
  texts = [t[:300] for t in tiny_corpus()[:4]]
  got = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (t,), i)
                                  for i, t in enumerate(texts)], disable_tqdm=True)
  for text, lp in zip(texts, got):
    toks = list(tok.encode(text, add_special_tokens=False).ids)
    # lm-eval's windows (context length 1): the first predicts up to
    # max_length tokens from the prefix token on; each next one predicts the
    # next (up to) max_length tokens from the max_length tokens before its end.
    total, done = 0.0, 0
    while done < len(toks):
      if done == 0:
        w = min(max_length, len(toks))
        inp = [lm.prefix_token_id] + toks[:w]
      else:
        w = min(max_length, len(toks) - done)
        end = done + w
        inp = toks[end - max_length - 1:end]
      lpv = _log_softmax64(_plain_logits(model, inp, length=512))
      total += sum(lpv[t - 1, inp[t]] for t in range(len(inp) - w, len(inp)))
      done += w
    assert lp == pytest.approx(total, rel=1e-5, abs=1e-3)
  if max_length >= 512:  # one window: the whole text after the prefix token
    full = [lm.prefix_token_id] + list(tok.encode(texts[0], add_special_tokens=False).ids)
    lpv = _log_softmax64(_plain_logits(model, full, length=512))
    assert got[0] == pytest.approx(sum(lpv[t - 1, full[t]] for t in range(1, len(full))),
                                   rel=1e-5)


def test_generate_until_matches_unbatched_greedy(tiny):
  model, tok = tiny
  lm = ALMLM(model=model, tokenizer=tok, batch_size=3, max_length=128)
  prompts = ["The function", "Return a new", "If the", "A", "This module provides"]
  kw = {"until": ["\n", "."], "max_gen_toks": 6}
  got = lm.generate_until([_inst("generate_until", (p, kw), i) for i, p in enumerate(prompts)],
                          disable_tqdm=True)
  for p, text in zip(prompts, got):
    ids = tok.encode(p).ids[None]
    res = generate(model, ids, max_new_tokens=6, eos_id=tok.eos_id)
    want = tok.decode(res.tokens[0, :res.lengths[0]])
    for u in kw["until"]:
      want = want.split(u)[0]
    assert text == want, p


def test_chat_template_round_trips_to_render_chat():
  tok = tiny_tokenizer("bpe", 300)
  model = tiny_model("llama", tok.vocab_size)
  lm = ALMLM(model=model, tokenizer=tok, chat_family="plain")
  msgs = [{"role": "user", "content": "What is 2 + 2?"}]
  text = lm.apply_chat_template(msgs)
  assert text == "user: What is 2 + 2?\nassistant: "
  full = chat_lib.render_chat(tok, msgs + [{"role": "assistant", "content": "4"}],
                              family="plain")
  ids, _ = lm.encode_pair(text, "4")
  assert list(ids) == list(full.ids[:-1])  # render_chat ends with the closing "\n"


def test_bad_input_is_named(tiny):
  model, tok = tiny
  with pytest.raises(ValueError, match="either `pretrained`"):
    ALMLM()
  with pytest.raises(ValueError, match="Unknown dtype"):
    ALMLM("smollm2-135m-instruct", dtype="float8")
  lm = ALMLM(model=model, tokenizer=tok)
  with pytest.raises(ValueError, match="empty continuation"):
    lm.loglikelihood([_inst("loglikelihood", ("abc", ""))], disable_tqdm=True)


def test_simple_evaluate_end_to_end(tiny, tmp_path, monkeypatch):
  """A local JSONL task through lm-eval's own evaluator, offline."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
  import json  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  rows = [{"context": f"Question: What is {a} plus {b}?\nAnswer:", "completion": f" {a + b}"}
          for a, b in [(1, 2), (3, 4), (10, 20), (7, 8)]]
  data = tmp_path / "add.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "add.yaml").write_text(
      "task: alm_test_add\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
      "doc_to_text: '{{context}}'\ndoc_to_target: '{{completion}}'\n"
      "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
  model, tok = tiny
  lm = ALMLM(model=model, tokenizer=tok)
  res = lm_eval.simple_evaluate(model=lm, tasks=["alm_test_add"],
                                task_manager=TaskManager(include_path=str(tmp_path)),
                                log_samples=True)
  r = res["results"]["alm_test_add"]
  samples = res["samples"]["alm_test_add"]
  assert len(samples) == 4
  want = np.mean([float(reference_loglikelihood(model, tok, s["doc"]["context"],
                                                s["doc"]["completion"], lm.prefix_token_id)[1])
                  for s in samples])
  assert r["acc,none"] == pytest.approx(want)
  assert math.isfinite(samples[0]["resps"][0][0][0])
