"""The offline lm-eval task pack (`alm.eval.tasks`): data, configs, end to end.

No models: a fake `lm_eval` LM runs every kind of task through
`lm_eval.simple_evaluate`, and a tiny fake bigbench sdist stands in for the
358 MB one (the real one is used by the `slow` test when it is cached).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from alm import assets
from alm.eval import tasks as T

MC = {  # BIG-bench defaults: no prefixes, choices appended to the input
    "name": "toy_mc", "description": "", "keywords": [], "metrics": ["multiple_choice_grade"],
    "examples": [
        {"input": f"How many legs does a {a} have?",
         "target_scores": {"two": int(n == 2), "four": int(n == 4), "six": int(n == 6)}}
        for a, n in [("horse", 4), ("bird", 2), ("ant", 6), ("dog", 4), ("cow", 4), ("bee", 6),
                     ("cat", 4), ("duck", 2)]
    ] + [{"input": "How many legs does a horse have?",  # a duplicate, dropped
          "target_scores": {"two": 0, "four": 1, "six": 0}}],
}
MC_PREFIXED = {
    "name": "toy_prefixed", "task_prefix": "Which makes sense?", "example_input_prefix": "\nex:",
    "example_output_prefix": "\nanswer:\n", "append_choices_to_input": "false",
    "examples": [{"input": "", "target_scores": {"It rained, so it was wet.": 1.0,
                                                 "It was wet, so it rained.": 0.0}}],
}
GEN = {
    "name": "toy_gen", "output_regex": r"[-+]?\d+",
    "examples": [{"input": f"What is {a} plus {b}?", "target": str(a + b)}
                 for a, b in [(12, 30), (7, 8), (100, 250), (3, 4), (55, 45), (9, 9), (1, 2)]],
}
PARENT = {"name": "toy_parent", "subtasks": ["toy_parent/sub"]}


def _add(tf: tarfile.TarFile, name: str, task: dict) -> None:
  data = json.dumps(task).encode()
  info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("sdist") / "bigbench-1.0.0.tar.gz"
  with tarfile.open(path, "w:gz") as tf:
    readme = tarfile.TarInfo("bigbench-1.0.0/README.md")
    tf.addfile(readme, io.BytesIO(b""))
    for name, task in [("toy_mc", MC), ("toy_prefixed", MC_PREFIXED), ("toy_gen", GEN),
                       ("toy_parent", PARENT), ("toy_parent/sub", MC)]:
      _add(tf, name, task)
  return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("heldout") / "heldout-00000.jsonl"
  docs = [{"text": f"Document {i}: " + "wörds and 🙂 " * (20 + 40 * i), "origin": "test"}
          for i in range(12)]
  path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                  encoding="utf-8")
  return path


def _small_pack(out_dir, sdist, heldout, **kw) -> Path:
  opts = dict(seed=0, arithmetic_n=20, bigbench_tasks=("toy_mc", "toy_prefixed"),
              bigbench_generate=("toy_gen",), bigbench_n=6, heldout_docs=8,
              heldout_max_bytes=600, bigbench_sdist=sdist, heldout_files=[heldout])
  return T.build_task_pack(out_dir, **{**opts, **kw})


def _read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------
# Arithmetic.


def _evaluate(question: str) -> int:
  # A tiny evaluator independent of the generator: words -> symbols, then eval.
  expr = question.replace(" plus ", " + ").replace(" minus ", " - ").replace(" times ", " * ")
  assert re.fullmatch(r"[\d ()+*-]+", expr), expr
  return eval(expr)  # noqa: S307 -- digits, spaces, brackets and + - * only


@pytest.mark.parametrize("operands", T.OPERANDS)
@pytest.mark.parametrize("kind", T.ARITHMETIC_KINDS)
def test_arithmetic_completion_is_the_value_of_the_question(kind, operands):
  docs = T.arithmetic_docs(kind, 300, seed=3, operands=operands)
  assert len(docs) == 300
  for doc in docs:
    m = re.fullmatch(r"Question: What is (.+)\?\nAnswer:", doc["context"])
    assert m, doc
    assert doc["completion"] == f" {_evaluate(m.group(1))}"
    numbers = [int(x) for x in re.findall(r"\d+", m.group(1))]
    if kind == "1dc":
      assert len(numbers) == 3 and all(0 <= x <= 9 for x in numbers)
      assert re.fullmatch(r"\(\d [-+*] \d\) [-+*] \d|\d [-+*] \(\d [-+*] \d\)", m.group(1))
    else:
      d = int(kind[0])
      word = {"a": "plus", "s": "minus", "m": "times"}[kind[2]]
      assert f" {word} " in m.group(1) and len(numbers) == 2
      if operands == "exact_digits":
        assert all(len(str(x)) == d for x in numbers)
      else:
        assert all(0 <= x < 10 ** d for x in numbers)


def test_arithmetic_matches_the_paper_distribution():
  two = T.arithmetic_docs("2ds", 2000, seed=0)
  answers = [int(d["completion"]) for d in two]
  assert sum(a < 0 for a in answers) > 500  # GPT-3: "the answer may be negative"
  operands = [int(x) for d in two for x in re.findall(r"\d+", d["context"])]
  assert 300 < sum(x < 10 for x in operands) < 500  # [0, 100): ~10 % of 4,000 have one digit
  both = [d["context"] for d in T.arithmetic_docs("1dc", 400, seed=0)]
  left = sum(c.startswith("Question: What is (") for c in both)
  assert 120 < left < 280  # parentheses on either side


def test_arithmetic_is_deterministic_and_seeded():
  for kind in T.ARITHMETIC_KINDS:
    assert T.arithmetic_docs(kind, 50, seed=1) == T.arithmetic_docs(kind, 50, seed=1)
    assert T.arithmetic_docs(kind, 50, seed=1) != T.arithmetic_docs(kind, 50, seed=2)
  with pytest.raises(ValueError, match="valid: 2da"):
    T.arithmetic_docs("6da", 5)
  with pytest.raises(ValueError, match="paper, exact_digits"):
    T.arithmetic_docs("2da", 5, operands="wide")


# ---------------------------------------------------------------------------
# BIG-bench.


def test_bigbench_prompts_follow_bigbench_conventions(sdist):
  found = T.read_bigbench_tasks(sdist, ["toy_mc", "toy_prefixed", "toy_gen"])
  docs, counts = T.bigbench_docs(found["toy_mc"], "toy_mc", kind="multiple_choice", n=100)
  assert counts == {"available": 8, "skipped": 0, "kept": 8}  # the duplicate is dropped
  first = docs[0]
  assert first["query"].startswith("Q: How many legs does a horse have?\n  choice: ")
  assert first["query"].endswith("\nA:")
  assert sorted(re.findall(r"choice: (\w+)", first["query"])) == ["four", "six", "two"]
  assert first["choices"] == [" two", " four", " six"] and first["gold"] == 1
  golds = [d["gold"] for d in docs]
  assert golds == [1, 0, 2, 1, 1, 2, 1, 0]

  (doc,), _ = T.bigbench_docs(found["toy_prefixed"], "toy_prefixed", kind="multiple_choice", n=9)
  # Task prefix, input prefix, no appended choices ("false" as a string), and
  # after a newline the answer follows with no space.
  assert doc == {"query": "Which makes sense?\nex:\nanswer:\n",
                 "choices": ["It rained, so it was wet.", "It was wet, so it rained."],
                 "gold": 0}

  gen, _ = T.bigbench_docs(found["toy_gen"], "toy_gen", kind="generate_until", n=100)
  assert gen[0] == {"query": "Q: What is 12 plus 30?\nA:", "targets": ["42"]}
  with pytest.raises(ValueError, match="generate_until"):
    T.bigbench_docs(found["toy_gen"], "toy_gen", kind="multiple_choice", n=5)


def test_bigbench_sampling_is_capped_deterministic_and_in_order(sdist):
  task = T.read_bigbench_tasks(sdist, ["toy_gen"])["toy_gen"]
  a, counts = T.bigbench_docs(task, "toy_gen", kind="generate_until", n=4, seed=0)
  b, _ = T.bigbench_docs(task, "toy_gen", kind="generate_until", n=4, seed=0)
  assert a == b and len(a) == 4 and counts["kept"] == 4 and counts["available"] == 7
  order = [d["query"] for d in T.bigbench_docs(task, "toy_gen", kind="generate_until", n=7)[0]]
  assert [order.index(d["query"]) for d in a] == sorted(order.index(d["query"]) for d in a)
  seeds = {tuple(d["query"] for d in T.bigbench_docs(task, "toy_gen", kind="generate_until",
                                                     n=4, seed=s)[0]) for s in range(6)}
  assert len(seeds) > 1


def test_unknown_bigbench_task_lists_close_matches(sdist):
  with pytest.raises(KeyError, match=r"'toy_mcq' is not a BIG-bench task.*close: toy_mc"):
    T.read_bigbench_tasks(sdist, ["toy_mcq"])
  with pytest.raises(KeyError, match=r"'toy_parent' is made of subtasks; .*toy_parent/sub"):
    T.read_bigbench_tasks(sdist, ["toy_parent"])
  assert T.read_bigbench_tasks(sdist, ["toy_parent/sub"])["toy_parent/sub"]["examples"]


def test_missing_sdist_names_the_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path / "cache"))

  def offline(dest):
    raise OSError("network unreachable")

  monkeypatch.setattr(T, "_fetch_from_index", offline)
  monkeypatch.setattr(T, "_fetch_pinned_url", offline)
  monkeypatch.setattr(T, "_fetch_with_pip", offline)
  with pytest.raises(T.BigBenchSdistError, match="alm.eval.tasks fetch-bigbench") as e:
    T.bigbench_sdist()
  for part in ("pip download bigbench==1.0.0", "network unreachable", T.BIGBENCH_URL,
               "bigbench_tasks=()"):
    assert part in str(e.value)
  with pytest.raises(T.BigBenchSdistError, match="fetch-bigbench"):
    T.bigbench_sdist(tmp_path / "nope.tar.gz")
  assert not list((tmp_path / "cache").rglob("*.tmp*"))  # no partial download left behind


def test_sdist_download_checks_the_hash(tmp_path, monkeypatch):
  monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
  page = tmp_path / "simple" / "bigbench"
  page.mkdir(parents=True)
  (tmp_path / "files").mkdir()
  (tmp_path / "files" / "bigbench-1.0.0.tar.gz").write_bytes(b"not the sdist")
  (page / "index.html").write_text(
      '<a href="../../files/bigbench-1.0.0.tar.gz#sha256=00">bigbench-1.0.0.tar.gz</a>')

  # file:// directory URLs do not serve index.html; point the page URL at it.
  real = T.urllib.request.urlopen
  monkeypatch.setattr(T.urllib.request, "urlopen",
                      lambda url, timeout=None: real(url + "index.html" if url.endswith("/")
                                                     else url))
  with pytest.raises(OSError, match="expected 1bb398a5"):
    T._fetch_from_index(tmp_path / "dest")


# ---------------------------------------------------------------------------
# Held-out text.


def test_heldout_docs_are_capped_at_a_character_boundary(heldout):
  docs = T.heldout_docs([heldout], 5, seed=0, max_bytes=300)
  assert len(docs) == 5 and docs == T.heldout_docs([heldout], 5, seed=0, max_bytes=300)
  for d in docs:
    assert 0 < len(d["text"].encode("utf-8")) <= 300
  all_docs = T.heldout_docs([heldout], 100, seed=0, max_bytes=10**6)
  assert len(all_docs) == 12 and all_docs[0]["text"].startswith("Document 0:")
  empty = heldout.parent / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="No documents"):
    T.heldout_docs([empty], 5)


# ---------------------------------------------------------------------------
# The pack.


def test_pack_manifest_reuse_and_rebuild(tmp_path, sdist, heldout, monkeypatch):
  monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path / "cache"))
  d = _small_pack(None, sdist, heldout)
  assert d.parent == tmp_path / "cache" / "eval_tasks"
  assert d.name.startswith(f"pack-v{T.PACK_VERSION}-")
  m = json.loads((d / "manifest.json").read_text())
  counts = {t["name"]: t["count"] for t in m["tasks"]}
  assert counts == {**{f"alm_arithmetic_{k}": 20 for k in T.ARITHMETIC_KINDS},
                    "alm_bb_toy_mc": 6, "alm_bb_toy_prefixed": 1, "alm_bb_toy_gen": 6,
                    "alm_heldout_bpb": 8}
  for t in m["tasks"]:
    assert hashlib.sha256((d / t["file"]).read_bytes()).hexdigest() == t["sha256"]
    assert (d / t["file"]).with_suffix(".yaml").exists()
    if t["kind"] == "multiple_choice":  # a uniform guess among each document's choices
      docs = _read_jsonl(d / t["file"])
      assert t["chance"] == pytest.approx(sum(1 / len(x["choices"]) for x in docs) / len(docs),
                                          abs=1e-4)
    else:
      assert "chance" not in t
  assert T.pack_tasks(d) == {
      "alm_arithmetic": [f"alm_arithmetic_{k}" for k in T.ARITHMETIC_KINDS],
      "alm_bigbench": ["alm_bb_toy_mc", "alm_bb_toy_prefixed"],
      "alm_bigbench_generate": ["alm_bb_toy_gen"], "alm_heldout_bpb": ["alm_heldout_bpb"]}

  stamp = (d / "manifest.json").stat().st_mtime_ns
  assert _small_pack(None, sdist, heldout) == d  # reused, not rebuilt
  assert (d / "manifest.json").stat().st_mtime_ns == stamp
  assert T.task_pack_dir(None, seed=0, arithmetic_n=20, bigbench_tasks=("toy_mc", "toy_prefixed"),
                         bigbench_generate=("toy_gen",), bigbench_n=6, heldout_docs=8,
                         heldout_max_bytes=600, bigbench_sdist=sdist,
                         heldout_files=[heldout]) == d
  other = _small_pack(None, sdist, heldout, seed=1)
  assert other != d
  assert (other / "arithmetic/alm_arithmetic_2da.jsonl").read_bytes() != \
      (d / "arithmetic/alm_arithmetic_2da.jsonl").read_bytes()

  # A pack copied elsewhere is reused with its data paths pointed at the copy.
  moved = tmp_path / "moved"
  shutil.copytree(d, moved)
  assert _small_pack(moved, sdist, heldout) == moved
  assert str(moved) in (moved / "heldout/alm_heldout_bpb.yaml").read_text()
  assert str(d) not in (moved / "heldout/alm_heldout_bpb.yaml").read_text()
  carried = tmp_path / "carried"  # e.g. copied to another machine: no rebuild needed
  shutil.copytree(d, carried)
  assert T._relocate(carried) == carried
  assert str(carried) in (carried / "bigbench/alm_bb_toy_mc.yaml").read_text()


def test_pack_refuses_to_overwrite_other_directories(tmp_path, sdist, heldout):
  (tmp_path / "mine.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="neither empty nor a task pack"):
    _small_pack(tmp_path, sdist, heldout)
  with pytest.raises(ValueError, match="0 leaves that part out"):
    _small_pack(tmp_path / "p", sdist, heldout, arithmetic_n=-1)
  with pytest.raises(ValueError, match="nothing to build"):
    _small_pack(tmp_path / "p", sdist, heldout, arithmetic_n=0, bigbench_n=0, heldout_docs=0)
  with pytest.raises(KeyError, match="close: toy_mc"):
    _small_pack(tmp_path / "p", sdist, heldout, bigbench_tasks=("toy_mcc",))
  assert not (tmp_path / "p").exists()  # a failed build leaves nothing behind
  # No BIG-bench tasks: no sdist needed at all.
  d = _small_pack(tmp_path / "q", None, heldout, bigbench_tasks=(), bigbench_generate=())
  assert "alm_bigbench" not in T.pack_tasks(d)


class _FakeLM:
  """Built lazily so importing this file does not import lm_eval."""

  @staticmethod
  def make():
    from lm_eval.api.model import LM

    class Fake(LM):

      def loglikelihood(self, requests):
        # Shorter continuations are likelier; every continuation is "greedy".
        return [(-float(len(r.args[1])), True) for r in requests]

      def loglikelihood_rolling(self, requests):
        # One bit per byte, exactly.
        return [-len(r.args[0].encode("utf-8")) * math.log(2) for r in requests]

      def generate_until(self, requests):
        out = []
        for r in requests:
          m = re.search(r"What is (\d+) plus (\d+)\?", r.args[0])
          out.append(f" {int(m.group(1)) + int(m.group(2))} apples" if m else " none")
        return out

    return Fake()


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
  pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
  import datasets  # the env is read at import; also patch it if already imported
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def test_pack_runs_end_to_end_through_lm_eval(tmp_path, sdist, heldout, offline_datasets):
  lm_eval = pytest.importorskip("lm_eval")  # the optional `eval` extra
  from lm_eval.tasks import get_task_dict

  d = _small_pack(tmp_path / "pack", sdist, heldout)
  tm = T.task_manager(d)
  for name in ["alm_arithmetic", "alm_bigbench", "alm_bigbench_generate", "alm_heldout_bpb",
               "alm_arithmetic_1dc", "alm_bb_toy_mc"]:
    assert name in tm.all_tasks
  built = get_task_dict(["alm_arithmetic_2da", "alm_bb_toy_mc", "alm_bb_toy_gen",
                         "alm_heldout_bpb"], tm)
  assert len(built) == 4

  names = ["alm_arithmetic_2da", "alm_bb_toy_mc", "alm_bb_toy_gen", "alm_heldout_bpb"]
  res = lm_eval.simple_evaluate(model=_FakeLM.make(), tasks=names, task_manager=tm, limit=5)
  r = res["results"]
  assert r["alm_arithmetic_2da"]["acc,none"] == 1.0
  # The shortest choice wins under the fake LM; compare with the gold answers.
  docs = _read_jsonl(d / "bigbench/alm_bb_toy_mc.jsonl")[:5]
  want = sum(min(range(3), key=lambda i: len(doc["choices"][i])) == doc["gold"] for doc in docs)
  assert r["alm_bb_toy_mc"]["acc,none"] == pytest.approx(want / 5)
  assert r["alm_bb_toy_gen"]["exact_match,strip"] == 1.0  # " 42 apples" -> regex -> "42"
  assert r["alm_heldout_bpb"]["bits_per_byte,none"] == pytest.approx(1.0)
  assert r["alm_heldout_bpb"]["byte_perplexity,none"] == pytest.approx(2.0)
  assert set(res["configs"]) == set(names)


# ---------------------------------------------------------------------------
# The real sdist (358 MB): only when it is already cached or named by env.


@pytest.mark.slow
def test_default_bigbench_tasks_from_the_real_sdist(tmp_path):
  path = os.environ.get("ALM_BIGBENCH_SDIST") or assets.cache_dir() / "bigbench" / T.BIGBENCH_SDIST
  if not Path(path).is_file():
    pytest.skip(f"no real bigbench sdist (run `{T.FETCH_COMMAND}` or set ALM_BIGBENCH_SDIST)")
  d = T.build_task_pack(tmp_path / "pack", arithmetic_n=0, heldout_docs=0, bigbench_n=50,
                        bigbench_sdist=path)
  groups = T.pack_tasks(d)
  assert tuple(groups["alm_bigbench"]) == T.TASK_GROUPS["alm_bigbench"]
  assert tuple(groups["alm_bigbench_generate"]) == T.TASK_GROUPS["alm_bigbench_generate"]
  m = json.loads((d / "manifest.json").read_text())
  for t in m["tasks"]:
    assert 30 <= t["count"] <= 50, t
    docs = _read_jsonl(d / t["file"])
    if t["kind"] == "multiple_choice":
      assert all(0 <= doc["gold"] < len(doc["choices"]) for doc in docs)
      assert t["chance"] == pytest.approx(
          sum(1 / len(doc["choices"]) for doc in docs) / len(docs), abs=1e-4)
    else:
      assert all(re.fullmatch(r"Q: What is \d+ plus \d+\?\nA:", doc["query"]) for doc in docs)
  gk = _read_jsonl(d / "bigbench/alm_bb_general_knowledge.jsonl")
  assert any("How many legs do horses have?" in doc["query"] for doc in gk)
