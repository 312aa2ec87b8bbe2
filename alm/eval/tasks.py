"""An offline task pack for lm-eval: YAML task configs + JSONL data in one folder.

`build_task_pack()` writes, deterministically from a seed, three kinds of
lm-eval tasks that run with no network (`dataset_path: json`, local
`data_files`):

* `alm_arithmetic` -- the GPT-3 arithmetic battery (2-5 digit addition and
  subtraction, 2-digit multiplication, 1-digit composite) in exactly the shape
  of lm-eval's own `arithmetic_*` tasks (`context` / `completion`,
  loglikelihood, `acc` = the completion is the greedy continuation).
* `alm_bigbench` -- a few BIG-bench JSON tasks read straight from the `bigbench`
  sdist on PyPI (no full extraction), multiple choice (`acc`, `acc_norm`);
  `alm_bigbench_generate` -- one short-answer BIG-bench task, generated and
  scored by `exact_match` (a group of its own: its metric is not `acc`).
* `alm_heldout_bpb` -- rolling log-likelihood over the toolkit's held-out
  corpus split (`word_perplexity`, `byte_perplexity`, `bits_per_byte`), like
  lm-eval's `wikitext`.

Use it with lm-eval through `task_manager(pack_dir)` (a `TaskManager` whose
`include_path` is the pack). Command line:

  python -m alm.eval.tasks build [--out_dir DIR] [--seed 0]
  python -m alm.eval.tasks fetch-bigbench     # download the sdist into the cache
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from alm import assets

# Bump when the generated files change for the same options.
PACK_VERSION = 2  # 2: multiple-choice tasks record their chance accuracy

ARITHMETIC_KINDS: tuple[str, ...] = (
    "2da", "3da", "4da", "5da", "2ds", "3ds", "4ds", "5ds", "2dm", "1dc")
# Multiple choice, short inputs, chosen by measurement: of 12 candidates, the tasks on
# which SmolLM2-135M-Instruct or Gemma 3 270M beats chance by more than one standard
# error on up to 100 documents each (BUILD_NOTES, "BIG-bench tasks"; dropped:
# cause_and_effect/one_sentence, emoji_movie, code_line_description, english_proverbs,
# known_unknowns, novel_concepts). Pass `bigbench_tasks` for others.
DEFAULT_BIGBENCH: tuple[str, ...] = (
    "general_knowledge", "human_organs_senses", "common_morpheme", "date_understanding",
    "crash_blossom", "riddle_sense")
DEFAULT_BIGBENCH_GENERATE: tuple[str, ...] = ("arithmetic/3_digit_addition",)
HELDOUT_TASK = "alm_heldout_bpb"

# The BIG-bench release on PyPI whose sdist carries the task files.
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_SIZE = 358_249_635
BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/"
                f"c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/{BIGBENCH_SDIST}")
PIP_DOWNLOAD_COMMAND = (f"{sys.executable} -m pip download bigbench=={BIGBENCH_VERSION} "
                        "--no-deps --no-binary :all: -d DIR")
FETCH_COMMAND = f"{sys.executable} -m alm.eval.tasks fetch-bigbench"

Operands = Literal["paper", "exact_digits"]
OPERANDS: tuple[str, ...] = ("paper", "exact_digits")
_MEMBER_RE = re.compile(r"(?:^|/)bigbench/benchmark_tasks/(.+)/task\.json$")


class BigBenchSdistError(FileNotFoundError):
  """The bigbench sdist is missing and could not be fetched; says how to get it."""


def _rng(seed: int, name: str) -> np.random.Generator:
  # One stream per task: adding or removing a task never changes the others.
  return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _task_name(prefix: str, name: str) -> str:
  return prefix + re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


# The groups and tasks of a pack built with the defaults (`pack_tasks(dir)` reads
# the ones of a given pack from its manifest).
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "alm_arithmetic": tuple(f"alm_arithmetic_{k}" for k in ARITHMETIC_KINDS),
    "alm_bigbench": tuple(_task_name("alm_bb_", t) for t in DEFAULT_BIGBENCH),
    "alm_bigbench_generate": tuple(_task_name("alm_bb_", t) for t in DEFAULT_BIGBENCH_GENERATE),
    HELDOUT_TASK: (HELDOUT_TASK,),
}


# ---------------------------------------------------------------------------
# Arithmetic (GPT-3 §3.9.1; lm-eval's `arithmetic_*` format).


def _apply(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_docs(kind: str, n: int, *, seed: int = 0,
                    operands: Operands = "paper") -> list[dict]:
  """Arithmetic questions in the shape of lm-eval's `arithmetic_*` documents.

  The contexts are already normalised the way lm-eval's `process_docs` does it
  for the EleutherAI/GPT-3 files ("Q:" -> "Question:", blank line removed):
  `{"context": "Question: What is 98 plus 45?\\nAnswer:", "completion": " 143"}`.

  Operands follow the GPT-3 paper (§3.9.1): `operands="paper"` samples both
  numbers of an n-digit task uniformly from [0, 10^n), so a few have fewer
  digits, and subtraction may go negative ("What is 34 minus 53?" -> " -19").
  `"exact_digits"` samples from [10^(n-1), 10^n) instead (every operand has n
  digits; subtraction still goes negative). 1DC ("1dc") draws three digits from
  [0, 10) and two operators from {+, -, *}; the paper's text puts the
  parentheses around the last two ("6+(4*8)") while its Figure G.42 example,
  "(2 * 4) * 6", has them around the first two, so either side is picked with
  probability 1/2, written with spaces as in that example. The released
  EleutherAI/GPT-3 files could not be read here (no network), so the exact
  operand distribution of those files is not checked, only the paper's text.

  Args:
    kind: one of `ARITHMETIC_KINDS` ("2da" .. "5da", "2ds" .. "5ds", "2dm", "1dc").
    n: number of questions.
    seed: base seed; each kind uses its own stream derived from it.
    operands: "paper" or "exact_digits" (see above).

  Returns:
    `n` dicts with `context` and `completion`.
  """
  if kind not in ARITHMETIC_KINDS:
    raise ValueError(f"Unknown arithmetic task {kind!r}; valid: {', '.join(ARITHMETIC_KINDS)}.")
  if operands not in OPERANDS:
    raise ValueError(f"Unknown operands {operands!r}; valid: {', '.join(OPERANDS)}.")
  rng = _rng(seed, f"arithmetic_{kind}")
  docs = []
  if kind == "1dc":
    digits = rng.integers(0, 10, size=(n, 3))
    ops = rng.choice(np.array(list("+-*")), size=(n, 2))
    left = rng.integers(0, 2, size=n).astype(bool)
    for (a, b, c), (o1, o2), first in zip(digits.tolist(), ops.tolist(), left.tolist()):
      if first:
        q, v = f"({a} {o1} {b}) {o2} {c}", _apply(_apply(a, o1, b), o2, c)
      else:
        q, v = f"{a} {o1} ({b} {o2} {c})", _apply(a, o1, _apply(b, o2, c))
      docs.append({"context": f"Question: What is {q}?\nAnswer:", "completion": f" {v}"})
    return docs
  d = int(kind[0])
  op = {"a": "+", "s": "-", "m": "*"}[kind[2]]
  word = {"+": "plus", "-": "minus", "*": "times"}[op]
  lo = 0 if operands == "paper" else 10 ** (d - 1)
  for a, b in rng.integers(lo, 10 ** d, size=(n, 2)).tolist():
    docs.append({"context": f"Question: What is {a} {word} {b}?\nAnswer:",
                 "completion": f" {_apply(a, op, b)}"})
  return docs


# ---------------------------------------------------------------------------
# BIG-bench: the sdist, and its JSON tasks as lm-eval documents.


def _index_url() -> str:
  url = os.environ.get("PIP_INDEX_URL")
  if not url:
    try:
      url = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      url = ""
  return (url or "https://pypi.org/simple").rstrip("/")


def _download(url: str, dest: Path) -> None:
  h = hashlib.sha256()
  with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as f:
    while chunk := r.read(1 << 20):
      h.update(chunk)
      f.write(chunk)
  if h.hexdigest() != BIGBENCH_SHA256:
    raise OSError(f"{url} has sha256 {h.hexdigest()}, expected {BIGBENCH_SHA256}.")


def _fetch_from_index(dest: Path) -> None:
  """Downloads the file the index's simple page (PEP 503) links to, checking its hash."""
  page_url = f"{_index_url()}/bigbench/"
  with urllib.request.urlopen(page_url, timeout=60) as r:
    page = r.read().decode("utf-8", "replace")
  m = re.search(r'href="([^"]*/' + re.escape(BIGBENCH_SDIST) + r'[^"]*)"', page)
  if m is None:
    raise OSError(f"{page_url} lists no {BIGBENCH_SDIST}.")
  _download(urllib.parse.urljoin(page_url, m.group(1).replace("&amp;", "&")), dest)


def _fetch_pinned_url(dest: Path) -> None:
  """Downloads PyPI's own file URL (for an index mirror without bigbench)."""
  _download(BIGBENCH_URL, dest)


def _fetch_with_pip(dest: Path) -> None:
  """Last resort: `pip download` (honours every pip setting, but builds the sdist's
  metadata: ~60 s, and pip >= 23.3 refuses it, bigbench declaring a direct URL dependency)."""
  with tempfile.TemporaryDirectory() as d:
    cmd = PIP_DOWNLOAD_COMMAND.split()[:-1] + [d]
    r = subprocess.run(cmd, capture_output=True, text=True)
    got = Path(d) / BIGBENCH_SDIST
    if r.returncode != 0 or not got.exists():
      raise OSError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-500:]}")
    shutil.move(str(got), dest)


def bigbench_sdist(path: str | os.PathLike | None = None, *, fetch: bool = True) -> Path:
  """The bigbench sdist: `path`, else the cached copy, else downloaded into the cache.

  The download reads the package index's simple page (`PIP_INDEX_URL` or pip's
  `global.index-url`, default PyPI) for the file URL and checks the pinned
  sha256 (about 5 s for the 358 MB file from PyPI); if that fails it tries
  PyPI's file URL, then `pip download`.

  Args:
    path: an existing `bigbench-1.0.0.tar.gz` to use instead of the cache.
    fetch: download into the cache when missing.

  Returns:
    The path of the sdist.

  Raises:
    BigBenchSdistError: `path` does not exist, or the sdist is not cached and
      could not be downloaded; the message names the commands that fetch it.
  """
  if path is not None:
    p = Path(path)
    if not p.is_file():
      raise BigBenchSdistError(
          f"No bigbench sdist at {p}. Fetch it with `{FETCH_COMMAND}` (into the cache) or "
          f"`{PIP_DOWNLOAD_COMMAND}`, or leave BIG-bench out (bigbench_tasks=()).")
    return p
  dest = assets.cache_dir() / "bigbench" / BIGBENCH_SDIST
  if dest.is_file() or not fetch:
    if not dest.is_file():
      raise BigBenchSdistError(f"{dest} is missing; fetch it with `{FETCH_COMMAND}`.")
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  errors = []
  for fetcher in (_fetch_from_index, _fetch_pinned_url, _fetch_with_pip):
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
      fetcher(tmp)
      os.replace(tmp, dest)
      return dest
    except (OSError, subprocess.SubprocessError) as e:
      errors.append(f"{fetcher.__name__}: {e}")
    finally:
      tmp.unlink(missing_ok=True)
  raise BigBenchSdistError(
      f"Could not download {BIGBENCH_SDIST} ({'; '.join(errors)}). Fetch it where the "
      f"package index is reachable with `{FETCH_COMMAND}`, or download {BIGBENCH_URL} (sha256 "
      f"{BIGBENCH_SHA256}) or run `{PIP_DOWNLOAD_COMMAND}` (pip < 23.3) and pass "
      f"bigbench_sdist=DIR/{BIGBENCH_SDIST} (--bigbench_sdist), or copy it to {dest}; or leave "
      "BIG-bench out (bigbench_tasks=(), bigbench_generate=()).")


def read_bigbench_tasks(sdist: str | os.PathLike, names: Iterable[str]) -> dict[str, dict]:
  """Reads the `task.json` of each named task straight from the sdist tarball.

  One streaming pass over the gzip (about 9 s for the whole 358 MB file on one
  core), stopping as soon as every task is found.

  Args:
    sdist: the bigbench sdist (or any tarball with the same
      `.../bigbench/benchmark_tasks/<task>/task.json` layout).
    names: task names as BIG-bench spells them, subtasks with a slash
      (`"cause_and_effect/one_sentence"`).

  Returns:
    Task name -> the parsed task JSON.

  Raises:
    KeyError: a name is not a task of the sdist (the message lists close
      matches), or names a task made of subtasks (the message lists them).
  """
  wanted, found, seen = set(names), {}, []
  with tarfile.open(sdist, "r|gz") as tf:
    for member in tf:
      m = _MEMBER_RE.search(member.name)
      if m is None:
        continue
      seen.append(m.group(1))
      if m.group(1) in wanted:
        found[m.group(1)] = json.loads(tf.extractfile(member).read().decode("utf-8"))
        if "examples" not in found[m.group(1)]:
          wanted.add(None)  # a parent task: read on so the error can list its subtasks
        if wanted <= found.keys():
          break
  problems = []
  for name in sorted(n for n in wanted if n is not None):
    if name not in found:
      close = difflib.get_close_matches(name, seen, n=5, cutoff=0.5)
      close += [s for s in seen if s.startswith(name + "/")][:5]
      problems.append(f"{name!r} is not a BIG-bench task of {Path(sdist).name}"
                      + (f" (close: {', '.join(dict.fromkeys(close))})" if close else ""))
    elif "examples" not in found[name]:
      subs = [s for s in seen if s.startswith(name + "/")]
      problems.append(f"{name!r} is made of subtasks; name one of: {', '.join(subs)}")
  if problems:
    raise KeyError("; ".join(problems))
  return found


def _bb_prompt(task: dict, text: str, choices: Sequence[str] | None,
               rng: np.random.Generator) -> str:
  """BIG-bench's zero-shot prompt (`json_task.default_format_fn` + task prefix)."""
  input_prefix = task.get("example_input_prefix", "\nQ: ")
  output_prefix = task.get("example_output_prefix", "\nA: ")
  choice_prefix = task.get("choice_prefix", "\n  choice: ")
  append = task.get("append_choices_to_input", True)
  if isinstance(append, str):  # one task spells it "false"
    append = append.strip().lower() == "true"
  if choices is not None and append:
    text += choice_prefix + choice_prefix.join(rng.permutation(sorted(choices)).tolist())
  # The default prefixes start with a newline that only separates few-shot
  # examples; a zero-shot prompt starts at its first character.
  return (str(task.get("task_prefix", "")) + input_prefix + text + output_prefix).lstrip()


def bigbench_docs(task: dict, name: str, *, kind: Literal["multiple_choice", "generate_until"],
                  n: int, seed: int = 0) -> tuple[list[dict], dict]:
  """Turns one BIG-bench JSON task into lm-eval documents.

  Prompts follow BIG-bench's conventions (task prefix, `example_input_prefix`
  default "\\nQ: ", `example_output_prefix` default "\\nA: ", the choices
  appended to the input as "\\n  choice: ..." in a random order unless
  `append_choices_to_input` is false), zero-shot, leading whitespace removed:
  by default "Q: {input}\\nA:". A trailing space of the prompt moves to the
  front of every answer (" four"), the way lm-eval's own tasks tokenise; after a
  newline the answer follows directly.

  Args:
    task: the parsed `task.json`.
    name: its BIG-bench name (seeds its sampling stream).
    kind: "multiple_choice" (needs `target_scores`; gold = first highest
      score, as in BIG-bench) or "generate_until" (needs `target`).
    n: keep at most this many examples, sampled without replacement in their
      original order; duplicates are dropped first, as BIG-bench does.
    seed: base seed.

  Returns:
    The documents (`query`, `choices`, `gold` or `query`, `targets`) and a dict
    of counts (`available`, `kept`, `skipped`: examples without the needed field).
  """
  key = "target_scores" if kind == "multiple_choice" else "target"
  unique = list({json.dumps(e, sort_keys=True): e for e in task["examples"]}.values())
  usable = [e for e in unique if e.get(key) not in (None, {}, [], "")]
  if not usable:
    other = "generate_until" if kind == "multiple_choice" else "multiple_choice"
    raise ValueError(f"BIG-bench task {name!r} has no examples with {key!r}, so it cannot be "
                     f"a {kind} task; list it as a {other} task instead.")
  counts = {"available": len(unique), "skipped": len(unique) - len(usable)}
  rng = _rng(seed, f"bigbench_{name}")
  if len(usable) > n:
    usable = [usable[i] for i in sorted(rng.choice(len(usable), n, replace=False).tolist())]
  docs = []
  for e in usable:
    if kind == "multiple_choice":
      choices = list(e["target_scores"])
      scores = [float(e["target_scores"][c]) for c in choices]
      prompt = _bb_prompt(task, e["input"], choices, rng)
      if not prompt.endswith("\n"):
        prompt, choices = prompt.rstrip(" "), [" " + c for c in choices]
      docs.append({"query": prompt, "choices": choices, "gold": int(np.argmax(scores))})
    else:
      targets = e["target"] if isinstance(e["target"], list) else [e["target"]]
      docs.append({"query": _bb_prompt(task, e["input"], None, rng).rstrip(" "),
                   "targets": [str(t) for t in targets]})
  return docs, {**counts, "kept": len(docs)}


# ---------------------------------------------------------------------------
# Held-out text for rolling bits per byte.


def _truncate(text: str, max_bytes: int) -> str:
  raw = text.encode("utf-8")
  if len(raw) <= max_bytes:
    return text
  cut = raw[:max_bytes].decode("utf-8", "ignore")  # never half a character
  nl = cut.rfind("\n")
  return cut[:nl] if nl >= len(cut) // 2 else cut  # end on a line when that keeps half


def heldout_docs(files: Sequence[str | os.PathLike], n: int, *, seed: int = 0,
                 max_bytes: int = 4000) -> list[dict]:
  """Samples `n` documents from JSONL files (a `text` field per line), capped in bytes.

  Args:
    files: JSONL shards, e.g. `alm.data.corpus.default_corpus("heldout")`.
    n: documents to keep (all of them if there are fewer), in file order.
    seed: base seed.
    max_bytes: longer texts are cut at a character boundary, at the last line
      break when that keeps at least half.

  Returns:
    Dicts with `text`.
  """
  texts = []
  for f in sorted(map(str, files)):
    with open(f, encoding="utf-8") as fh:
      for i, line in enumerate(fh, 1):
        if line.strip():
          doc = json.loads(line)
          if not isinstance(doc.get("text"), str):
            raise ValueError(f"{f}:{i} has no string 'text' field.")
          if doc["text"].strip():
            texts.append(doc["text"])
  if not texts:
    raise ValueError(f"No documents in {', '.join(map(str, files)) or 'an empty file list'}.")
  if len(texts) > n:
    texts = [texts[i] for i in sorted(_rng(seed, HELDOUT_TASK).choice(len(texts), n,
                                                                      replace=False).tolist())]
  return [{"text": _truncate(t, max_bytes)} for t in texts]


# ---------------------------------------------------------------------------
# The pack: data files, YAML configs, manifest.


def _options(seed, arithmetic_n, arithmetic_operands, bigbench_tasks, bigbench_generate,
             bigbench_n, bigbench_sdist, heldout_docs, heldout_max_bytes, heldout_files):
  if arithmetic_operands not in OPERANDS:
    raise ValueError(f"Unknown arithmetic_operands {arithmetic_operands!r}; valid: "
                     f"{', '.join(OPERANDS)}.")
  for k, v in (("arithmetic_n", arithmetic_n), ("bigbench_n", bigbench_n),
               ("heldout_docs", heldout_docs), ("heldout_max_bytes", heldout_max_bytes)):
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"{k} must be an int >= 0 (0 leaves that part out), got {v!r}.")
  if isinstance(bigbench_tasks, str) or isinstance(bigbench_generate, str):
    raise TypeError("bigbench_tasks / bigbench_generate take a list of task names, not a string.")
  both = set(bigbench_tasks) & set(bigbench_generate)
  if both:
    raise ValueError(f"{sorted(both)} listed both as multiple_choice and generate_until tasks.")
  bb = bool(bigbench_n and (bigbench_tasks or bigbench_generate))
  if bb:  # identity of the sdist without hashing 358 MB on every call
    sd = Path(bigbench_sdist) if bigbench_sdist else None
    bb_id = f"{sd.name}:{sd.stat().st_size}" if sd and sd.is_file() else BIGBENCH_SHA256
    bb_id = BIGBENCH_SHA256 if bb_id == f"{BIGBENCH_SDIST}:{BIGBENCH_SIZE}" else bb_id
  if heldout_docs:
    if heldout_files is None:
      from alm.data import corpus  # builds the corpus on first use
      heldout_files = corpus.default_corpus("heldout")
    heldout_files = sorted(str(Path(f).resolve()) for f in heldout_files)
    held_id = [hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] for f in heldout_files]
  return {
      "seed": seed, "arithmetic_n": arithmetic_n, "arithmetic_operands": arithmetic_operands,
      "bigbench_tasks": list(bigbench_tasks) if bb else [],
      "bigbench_generate": list(bigbench_generate) if bb else [],
      "bigbench_n": bigbench_n if bb else 0, "bigbench_sdist": bb_id if bb else None,
      "heldout_docs": heldout_docs, "heldout_max_bytes": heldout_max_bytes,
      "heldout_files": heldout_files if heldout_docs else [],
      "heldout_sha256": held_id if heldout_docs else [],
  }


def _key(options: dict) -> str:
  blob = json.dumps({k: v for k, v in options.items() if k != "heldout_files"}, sort_keys=True)
  return hashlib.sha256(f"{blob}v{PACK_VERSION}".encode()).hexdigest()[:12]


def _pack_dir(options: dict) -> Path:
  return assets.cache_dir() / "eval_tasks" / f"pack-v{PACK_VERSION}-{_key(options)}"


def task_pack_dir(out_dir=None, *, seed: int = 0, arithmetic_n: int = 200,
                  arithmetic_operands: Operands = "paper",
                  bigbench_tasks: Sequence[str] = DEFAULT_BIGBENCH,
                  bigbench_generate: Sequence[str] = DEFAULT_BIGBENCH_GENERATE,
                  bigbench_n: int = 300, heldout_docs: int = 64, heldout_max_bytes: int = 4000,
                  bigbench_sdist=None, heldout_files=None) -> Path:
  """Where `build_task_pack` with the same arguments puts (or finds) the pack.

  Args:
    out_dir, ...: as for `build_task_pack`.

  Returns:
    `out_dir` if given, else `cache_dir()/eval_tasks/pack-v<version>-<key>`,
    the key naming every option (and the held-out files' contents).
  """
  if out_dir is not None:
    return Path(out_dir)
  return _pack_dir(_options(seed, arithmetic_n, arithmetic_operands, bigbench_tasks,
                            bigbench_generate, bigbench_n, bigbench_sdist, heldout_docs,
                            heldout_max_bytes, heldout_files))


def _write_jsonl(path: Path, docs: list[dict]) -> str:
  data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
  path.write_bytes(data)
  return hashlib.sha256(data).hexdigest()


def _task_yaml(root: Path, t: dict) -> dict:
  split = "validation" if t["kind"] == "loglikelihood" else "test"
  cfg = {"task": t["name"], "dataset_path": "json",
         "dataset_kwargs": {"data_files": {split: str(root / t["file"])}},
         "output_type": t["kind"]}
  if t["kind"] == "loglikelihood":  # as lm-eval's arithmetic_*.yaml
    cfg.update(validation_split="validation", test_split=None, doc_to_text="{{context}}",
               doc_to_target="{{completion}}", target_delimiter="",
               metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
  elif t["kind"] == "multiple_choice":
    cfg.update(test_split="test", doc_to_text="query", doc_to_choice="choices",
               doc_to_target="gold", target_delimiter="",
               metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")])
  elif t["kind"] == "generate_until":
    # BIG-bench scores the first match of the task's output_regex; else the stripped text.
    extract = ({"function": "regex", "regex_pattern": t["output_regex"]} if t.get("output_regex")
               else {"function": "remove_whitespace"})
    cfg.update(test_split="test", doc_to_text="query", doc_to_target="targets",
               target_delimiter="",
               generation_kwargs={"until": ["\n"], "max_gen_toks": 32, "do_sample": False,
                                  "temperature": 0.0},
               filter_list=[{"name": "strip", "filter": [extract, {"function": "take_first"}]}],
               metric_list=[{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True}])
  else:  # loglikelihood_rolling, as lm-eval's wikitext.yaml
    cfg.update(test_split="test", doc_to_text="", doc_to_target="text",
               metric_list=[{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                            (("word_perplexity", "weighted_perplexity"),
                             ("byte_perplexity", "weighted_perplexity"),
                             ("bits_per_byte", "bits_per_byte"))])
  cfg["metadata"] = {"version": PACK_VERSION, "source": t["source"]}
  return cfg


def _write_yamls(manifest: dict, write_to: Path) -> None:
  """Writes the task and group YAML files of `manifest` into `write_to`.

  The data paths in them point into `manifest["root"]` (where the pack lives once
  renamed into place), since `datasets` resolves relative paths against the CWD.
  """
  import yaml  # a flax dependency
  root = Path(manifest["root"])
  for t in manifest["tasks"]:
    (write_to / t["file"]).with_suffix(".yaml").write_text(
        yaml.safe_dump(_task_yaml(root, t), sort_keys=False, allow_unicode=True, width=1000))
  for group, names in manifest["groups"].items():
    metrics = {"alm_arithmetic": [("acc", "none")], "alm_bigbench_generate": [("exact_match",
               "strip")]}.get(group, [("acc", "none"), ("acc_norm", "none")])
    cfg = {"group": group, "task": names,
           "aggregate_metric_list": [{"metric": m, "filter_list": [f], "aggregation": "mean",
                                      "weight_by_size": True} for m, f in metrics],
           "metadata": {"version": PACK_VERSION}}
    (write_to / f"_{group}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _build(tmp: Path, options: dict, sdist) -> dict:
  tasks, groups = [], {}

  def add(group, name, kind, sub, docs, source, **extra):
    if not docs:
      raise ValueError(f"Task {name} came out empty; check its options.")
    if any(t["name"] == name for t in tasks):
      raise ValueError(f"Two tasks are both named {name}; list each BIG-bench task once.")
    (tmp / sub).mkdir(exist_ok=True)
    file = f"{sub}/{name}.jsonl"
    if kind == "multiple_choice":  # the accuracy of a uniform guess, for "above chance"
      extra["chance"] = round(float(np.mean([1.0 / len(d["choices"]) for d in docs])), 4)
    tasks.append({"name": name, "group": group, "kind": kind, "file": file, "count": len(docs),
                  "sha256": _write_jsonl(tmp / file, docs), "source": source, **extra})
    if group:
      groups.setdefault(group, []).append(name)

  if options["arithmetic_n"]:
    for kind in ARITHMETIC_KINDS:
      add("alm_arithmetic", f"alm_arithmetic_{kind}", "loglikelihood", "arithmetic",
          arithmetic_docs(kind, options["arithmetic_n"], seed=options["seed"],
                          operands=options["arithmetic_operands"]),
          f"GPT-3 arithmetic {kind} ({options['arithmetic_operands']} operands), generated")
  mc, gen = options["bigbench_tasks"], options["bigbench_generate"]
  if mc or gen:
    path = bigbench_sdist(sdist)
    found = read_bigbench_tasks(path, list(mc) + list(gen))
    for names, kind in ((mc, "multiple_choice"), (gen, "generate_until")):
      for bb in names:
        docs, counts = bigbench_docs(found[bb], bb, kind=kind, n=options["bigbench_n"],
                                     seed=options["seed"])
        regex = found[bb].get("output_regex") if kind == "generate_until" else None
        group = "alm_bigbench" if kind == "multiple_choice" else "alm_bigbench_generate"
        add(group, _task_name("alm_bb_", bb), kind, "bigbench", docs,
            f"BIG-bench {bb} ({path.name})", bigbench_counts=counts,
            **({"output_regex": regex} if regex else {}))
  if options["heldout_docs"]:
    docs = heldout_docs(options["heldout_files"], options["heldout_docs"], seed=options["seed"],
                        max_bytes=options["heldout_max_bytes"])
    add(None, HELDOUT_TASK, "loglikelihood_rolling", "heldout", docs,
        "alm.data.corpus held-out split", bytes=sum(len(d["text"].encode()) for d in docs))
  if not tasks:
    raise ValueError("Every part of the pack is switched off; nothing to build.")
  return {"alm_task_pack": PACK_VERSION, "key": _key(options), "options": options,
          "tasks": tasks, "groups": groups}


def build_task_pack(out_dir: str | os.PathLike | None = None, *, seed: int = 0,
                    arithmetic_n: int = 200, arithmetic_operands: Operands = "paper",
                    bigbench_tasks: Sequence[str] = DEFAULT_BIGBENCH,
                    bigbench_generate: Sequence[str] = DEFAULT_BIGBENCH_GENERATE,
                    bigbench_n: int = 300, heldout_docs: int = 64, heldout_max_bytes: int = 4000,
                    bigbench_sdist: str | os.PathLike | None = None,
                    heldout_files: Sequence[str | os.PathLike] | None = None,
                    force: bool = False) -> Path:
  """Writes the offline lm-eval task pack (once; an identical complete pack is reused).

  The build writes into a temporary sibling and renames it into place, so an
  interrupted build never leaves a half pack; `manifest.json` (options, per-task
  counts and sha256 of every data file) marks a complete one.

  Args:
    out_dir: where to write; default `task_pack_dir(...)` in the toolkit cache,
      named by a key of every option. An existing directory is only replaced if
      it is empty or an older task pack.
    seed: base seed of all sampling (each task has its own stream).
    arithmetic_n: questions per arithmetic task (GPT-3 used 2,000); 0 leaves
      arithmetic out.
    arithmetic_operands: "paper" ([0, 10^n), GPT-3 §3.9.1) or "exact_digits"
      ([10^(n-1), 10^n)); see `arithmetic_docs`.
    bigbench_tasks: BIG-bench multiple-choice tasks ("name" or "name/subtask").
    bigbench_generate: BIG-bench short-answer tasks scored by exact match.
    bigbench_n: at most this many examples per BIG-bench task; 0 leaves
      BIG-bench out (as do two empty task lists; then no sdist is needed).
    heldout_docs: documents of the rolling bits-per-byte task; 0 leaves it out.
    heldout_max_bytes: cap on each held-out document, in UTF-8 bytes.
    bigbench_sdist: a local `bigbench-1.0.0.tar.gz`; default: the cached copy,
      downloaded on first use (`bigbench_sdist()`).
    heldout_files: JSONL files with a `text` field; default the held-out split
      of `alm.data.corpus.default_corpus`.
    force: rebuild even if a complete pack with the same options exists.

  Returns:
    The pack directory (pass it to `task_manager`).
  """
  options = _options(seed, arithmetic_n, arithmetic_operands, bigbench_tasks, bigbench_generate,
                     bigbench_n, bigbench_sdist, heldout_docs, heldout_max_bytes, heldout_files)
  out = Path(out_dir) if out_dir is not None else _pack_dir(options)
  out = out.resolve()
  old = _read_manifest(out)
  if old is not None and old.get("key") == _key(options) and not force:
    return _relocate(out)
  if out.exists() and any(out.iterdir()) and old is None:
    raise FileExistsError(f"{out} is neither empty nor a task pack; choose another out_dir.")
  from alm.training.rundir import atomic_directory  # pylint: disable=import-outside-toplevel
  with atomic_directory(out, "task pack") as tmp:  # renamed into place only when complete
    t0 = time.perf_counter()
    manifest = _build(tmp, options, bigbench_sdist)
    manifest.update(root=str(out), build_seconds=round(time.perf_counter() - t0, 2))
    _write_yamls(manifest, tmp)  # naming the final paths: valid once renamed
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
  return out


def _relocate(d: Path) -> Path:
  """Points the YAML data paths of a moved or copied pack at where it is now."""
  m = _read_manifest(d)
  if m is None:
    raise FileNotFoundError(f"{d} is not a built task pack (no manifest.json); build it "
                            f"with `{sys.executable} -m alm.eval.tasks build`.")
  if m.get("root") != str(d.resolve()):
    m["root"] = str(d.resolve())
    _write_yamls(m, d)
    (d / "manifest.json").write_text(json.dumps(m, indent=1, ensure_ascii=False))
  return d


def _read_manifest(d: Path) -> dict | None:
  try:
    m = json.loads((d / "manifest.json").read_text())
  except (OSError, ValueError):
    return None
  return m if isinstance(m, dict) and "alm_task_pack" in m else None


def pack_tasks(pack_dir: str | os.PathLike) -> dict[str, list[str]]:
  """The groups of a built pack and their tasks (`alm_heldout_bpb` under its own name).

  Args:
    pack_dir: a directory returned by `build_task_pack`.

  Returns:
    Group or standalone task name -> task names, e.g.
    `{"alm_arithmetic": [...], "alm_bigbench": [...], "alm_heldout_bpb": ["alm_heldout_bpb"]}`.
  """
  m = _read_manifest(Path(pack_dir))
  if m is None:
    raise FileNotFoundError(f"{pack_dir} is not a built task pack (no manifest.json); build it "
                            f"with `{sys.executable} -m alm.eval.tasks build`.")
  out = {g: list(ts) for g, ts in m["groups"].items()}
  out.update({t["name"]: [t["name"]] for t in m["tasks"] if t["group"] is None})
  return out


def task_manager(pack_dir: str | os.PathLike | None = None, *, include_defaults: bool = False):
  """An `lm_eval.tasks.TaskManager` that knows the pack's tasks and groups.

  Set `HF_DATASETS_OFFLINE=1` before `datasets` is first imported to be sure
  nothing is fetched; the pack itself needs no network. A pack copied to
  another place or machine works there: its YAML data paths are rewritten.

  Args:
    pack_dir: a built pack; default: build (or reuse) the default pack.
    include_defaults: also index lm-eval's own tasks (slower to construct).

  Returns:
    The task manager, for `lm_eval.simple_evaluate(..., task_manager=tm)`.
  """
  from lm_eval.tasks import TaskManager  # the optional `eval` extra
  d = _relocate(Path(pack_dir)) if pack_dir is not None else build_task_pack()
  return TaskManager(include_path=str(d), include_defaults=include_defaults)


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m alm.eval.tasks {build,fetch-bigbench}`."""
  p = argparse.ArgumentParser(prog="python -m alm.eval.tasks", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="write (or reuse) the task pack and list its tasks")
  b.add_argument("--out_dir", default=None)
  b.add_argument("--seed", type=int, default=0)
  b.add_argument("--arithmetic_n", type=int, default=200)
  b.add_argument("--arithmetic_operands", choices=OPERANDS, default="paper")
  b.add_argument("--bigbench_tasks", default=",".join(DEFAULT_BIGBENCH),
                 help="comma-separated multiple-choice tasks ('' for none)")
  b.add_argument("--bigbench_generate", default=",".join(DEFAULT_BIGBENCH_GENERATE),
                 help="comma-separated generation tasks ('' for none)")
  b.add_argument("--bigbench_n", type=int, default=300)
  b.add_argument("--bigbench_sdist", default=None)
  b.add_argument("--heldout_docs", type=int, default=64)
  b.add_argument("--heldout_max_bytes", type=int, default=4000)
  b.add_argument("--force", action="store_true")
  sub.add_parser("fetch-bigbench", help=f"download {BIGBENCH_SDIST} into the cache")
  a = p.parse_args(argv)
  if a.command == "fetch-bigbench":
    t0 = time.perf_counter()
    path = bigbench_sdist()
    print(f"{path} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.1f} s)")
    return
  split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
  t0 = time.perf_counter()
  d = build_task_pack(a.out_dir, seed=a.seed, arithmetic_n=a.arithmetic_n,
                      arithmetic_operands=a.arithmetic_operands,
                      bigbench_tasks=split(a.bigbench_tasks),
                      bigbench_generate=split(a.bigbench_generate), bigbench_n=a.bigbench_n,
                      bigbench_sdist=a.bigbench_sdist, heldout_docs=a.heldout_docs,
                      heldout_max_bytes=a.heldout_max_bytes, force=a.force)
  m = _read_manifest(d)
  print(f"Task pack: {d}  ({time.perf_counter() - t0:.1f} s; built in {m['build_seconds']} s)")
  counts = {t["name"]: f"{t['count']} docs, {t['kind']}" for t in m["tasks"]}
  for group, names in pack_tasks(d).items():
    print(f"{group}:")
    for n in names:
      print(f"  {n}  ({counts[n]})")
  print(f"Use: lm_eval.simple_evaluate(..., tasks=[...], "
        f"task_manager=alm.eval.tasks.task_manager({str(d)!r}))")


if __name__ == "__main__":
  main()
