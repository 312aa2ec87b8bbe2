"""The hypernetwork zoo: named hypernetworks, each with the recipe that trains it.

  import alm.hypernet
  hn = alm.hypernet.load("smollm2-135m-unigram")         # a built entry
  student = alm.hypernet.transfer(base, base_tok, new_tok, hn)

  python -m experiments.hypernet_zoo --list                          # names, status, tables
  python -m experiments.hypernet_zoo --build=smollm2-135m-unigram    # train it, offline

An entry names its base model, the tokenizer distribution it was trained on
(the sampler's settings, SPEC §11), its recipe (the `experiments.
train_hypernet` flags) and, once built, its directory in the local zoo
(`$ALM_ZOO_DIR`, default `<alm cache>/hypernet_zoo/<name>/`): the training
run itself — orbax checkpoints (so an interrupted build resumes), metrics,
report.md, summary.json — and the hypernetwork (`hypernet/`: safetensors +
json, `alm.hypernet.student.load_hypernet`). The zero-shot evaluation of an
entry (`python -m experiments.hypernet_zero_shot --hypernet=NAME`) writes its
table next to it (`zero_shot.md`), which `--list` shows.

Why the recipe and not the weights: nothing here can be downloaded, so the
zoo ships what rebuilds each entry bit for bit on any machine (the runs are
deterministic from their seed), and the numbers measured on the entries we
built are in README.md / BUILD_NOTES.md with their commands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from alm.hypernet.hypernet import HypernetError


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """A named hypernetwork and its recipe.

  Attributes:
    name: the zoo name.
    model: the base model (asset name).
    distribution: the tokenizer distribution it is trained on, in words.
    flags: the `experiments.train_hypernet` flags of its recipe (the output
      directories are the zoo's).
    note: what to expect (time on the 2-core CI-class machine, etc.).
  """

  name: str
  model: str
  distribution: str
  flags: tuple[str, ...]
  note: str = ""

  def command(self, zoo: str | Path | None = None) -> list[str]:
    """The command line that builds (or resumes building) this entry."""
    d = entry_dir(self.name, zoo)
    return [sys.executable, "-m", "experiments.train_hypernet", f"--model={self.model}",
            *self.flags, f"--out_dir={d}", f"--export_dir={d / 'hypernet'}"]

  def command_text(self) -> str:
    return "python -m experiments.hypernet_zoo --build=" + shlex.quote(self.name)


_SAMPLED = ("ZeTT Unigram tokenizers sampled each step from the substrings of the last 64 "
            "training documents of the default corpus (log-normal noise sigma 1, up to "
            "{v} pieces of <= 16 characters + {bytes}); tokens the base also has keep "
            "its embeddings, the others are predicted")
# LR and K from a 30-step study (BUILD_NOTES, #14): 3e-4 made the held-out sampled
# tokenizer worse over 300 steps; 3e-5 and 1e-4 both improved on FVT at 30 steps, and
# K = 4608 (the whole sampled vocabulary, in piece buckets) beat K = 1024 at the same cost.
# A second study (zero-shot on Qwen3 after 30 steps) chose --copy_shared over predicting
# every token, the lexical term, and 32k-piece sampled tokenizers.
_RECIPE = ("--preset=hypernet-demo", "--steps=200", "--learning_rate=5e-5", "--warmup_steps=10",
           "--vocab_rows=4608", "--sampler_vocab_size=4096", "--copy_shared",
           "--eval_tokenizers=qwen3",
           "--eval_batches=2", "--checkpoint_every=25", "--seed=0")

_NOTE = "CPU recipe: 200 steps of 4 x 64 tokens, ALM against the frozen base ({time})."
# name -> (base model, the base's alphabet in the sampled tokenizers, the build's time)
_BASES = {
    "smollm2-135m-unigram": ("smollm2-135m-instruct",
                             "the 256 byte symbols; SmolLM2's byte-level pre-tokenizer",
                             "about 35 minutes on 2 cores"),
    "gemma3-270m-unigram": ("gemma3-270m", "the 256 byte-fallback tokens; Gemma's '▁' "
                            "spaces, SentencePiece-style",
                            "about 55 minutes on 2 cores (15 s a step)"),
}
ENTRIES: dict[str, ZooEntry] = {
    name: ZooEntry(name=name, model=model, distribution=_SAMPLED.format(v=4096, bytes=alphabet),
                   flags=_RECIPE, note=_NOTE.format(time=time))
    for name, (model, alphabet, time) in _BASES.items()}


def names() -> list[str]:
  """The zoo's entry names."""
  return sorted(ENTRIES)


def entry(name: str) -> ZooEntry:
  """The entry called `name`.

  Raises:
    HypernetError: no such entry (lists the names).
  """
  if name not in ENTRIES:
    raise HypernetError(f"No hypernetwork called {name!r} in the zoo; the zoo has: "
                        f"{', '.join(names())}. (A directory written by "
                        "experiments.train_hypernet loads by its path.)")
  return ENTRIES[name]


def zoo_dir() -> Path:
  """The local zoo: `$ALM_ZOO_DIR`, default `<alm cache>/hypernet_zoo`."""
  if os.environ.get("ALM_ZOO_DIR"):
    return Path(os.environ["ALM_ZOO_DIR"]).expanduser()
  from alm import assets  # pylint: disable=import-outside-toplevel
  return assets.cache_dir() / "hypernet_zoo"


def entry_dir(name: str, zoo: str | Path | None = None) -> Path:
  """Where entry `name` lives in the zoo `zoo` (default `zoo_dir()`)."""
  return (Path(zoo) if zoo is not None else zoo_dir()) / name


def is_built(name: str) -> bool:
  d = entry_dir(entry(name).name)
  return (d / "hypernet" / "hypernet.json").exists()


def load(name_or_dir: str):
  """A zoo hypernetwork by name (or one written by `experiments.train_hypernet`, by path).

  Raises:
    HypernetError: an unknown name (lists the zoo's names), or an entry not
      built yet (gives the command that builds it).
  """
  from alm.hypernet.student import load_hypernet  # pylint: disable=import-outside-toplevel
  p = Path(str(name_or_dir)).expanduser()
  if p.is_dir():
    warn_if_worse_than_fvt(p)
    return load_hypernet(p / "hypernet" if (p / "hypernet").is_dir() else p)
  e = entry(str(name_or_dir))
  if not is_built(e.name):
    raise HypernetError(f"The zoo entry {e.name!r} is not built in {zoo_dir()} yet. Build it "
                        f"(offline, resumable; {e.note}): {e.command_text()}")
  warn_if_worse_than_fvt(entry_dir(e.name))
  return load_hypernet(entry_dir(e.name) / "hypernet")


def worse_than_fvt(d: str | Path) -> list[str]:
  """The rows of `d`'s measured zero-shot table where the hypernetwork lost to FVT.

  Each as "set/tokenizer"; [] when nothing was measured (no zero_shot.json) or
  the table cannot be read (logged).
  """
  p = Path(d) / "zero_shot.json"
  if not p.exists():
    return []
  try:
    rows = json.loads(p.read_text())["rows"]
    return [f"{r['set']}/{r['tokenizer']}" for r in rows if r["hypernet_bpb"] > r["fvt_bpb"]]
  except (ValueError, KeyError, TypeError) as e:  # a report, never a reason not to load
    logging.warning("Ignoring the unreadable zero-shot table %s (%s: %s); rerun "
                    "experiments.hypernet_zero_shot to measure it again.", p, type(e).__name__, e)
    return []


def warn_if_worse_than_fvt(d: str | Path) -> None:
  """Logs a warning when `d`'s zero-shot table has the hypernetwork behind FVT."""
  lost = worse_than_fvt(d)
  if lost:
    logging.warning("The hypernetwork in %s was measured worse than FVT zero-shot on %s "
                    "(%s): FVT embeddings (the default init) may be the better start.",
                    d, ", ".join(lost), Path(d) / "zero_shot.md")


def build(name: str, *, extra_flags: tuple[str, ...] = (), rebuild: bool = False) -> Path:
  """Trains (or finishes training) a zoo entry from its recipe; returns its directory.

  Runs `experiments.train_hypernet` with the entry's flags (plus `extra_flags`)
  into the zoo directory, so an interrupted build resumes from its last
  checkpoint. `rebuild`: start over (`--noresume`), replacing the checkpoints
  and dropping the zero-shot table of what the directory held (a build of
  an older recipe is refused otherwise).

  Raises:
    HypernetError: an unknown name.
    subprocess.CalledProcessError: the training run failed (its output is shown).
  """
  e = entry(name)
  d = entry_dir(e.name)
  d.mkdir(parents=True, exist_ok=True)
  if rebuild:
    for stale in ("zero_shot.json", "zero_shot.md"):
      (d / stale).unlink(missing_ok=True)
  subprocess.run([*e.command(), *(("--noresume",) if rebuild else ()), *extra_flags], check=True,
                 cwd=Path(__file__).resolve().parents[2])
  return d


def describe() -> str:
  """The zoo as text: each entry, its status and (when measured) its zero-shot table."""
  lines = [f"Hypernetwork zoo ({zoo_dir()}):"]
  for n in names():
    e = ENTRIES[n]
    built = is_built(n)
    lines += [f"\n{n}  [{'built' if built else 'not built'}]", f"  base: {e.model}",
              f"  tokenizers: {e.distribution}", f"  recipe: {e.note} Build: {e.command_text()}",
              f"    = python -m experiments.train_hypernet --model={e.model} "
              + " ".join(e.flags)]
    table = entry_dir(n) / "zero_shot.md"
    if table.exists():
      lines += ["  zero-shot (measured here):"] + ["    " + l for l in
                                                   table.read_text().splitlines()]
      lost = worse_than_fvt(entry_dir(n))
      if lost:
        lines.append(f"  worse than FVT on: {', '.join(lost)}")
  return "\n".join(lines)
