"""The hypernetwork zoo: list its entries, or build one from its recipe (offline).

  python -m experiments.hypernet_zoo --list
  python -m experiments.hypernet_zoo --build=smollm2-135m-unigram

Each entry (`alm.hypernet.zoo.ENTRIES`) is a base model, a tokenizer
distribution and the `experiments.train_hypernet` recipe that trains its
hypernetwork; `--build` runs that recipe into the local zoo (`$ALM_ZOO_DIR`,
default ~/.cache/alm/hypernet_zoo/NAME), resuming an interrupted build from
its last checkpoint (`--rebuild` starts over). Then `alm.hypernet.load(NAME)` returns it and
`python -m experiments.hypernet_zero_shot --hypernet=NAME` measures it.
"""

from __future__ import annotations

import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("list", False, "List the entries, whether each is built, and their tables.")
flags.DEFINE_string("build", "", "Train this entry from its recipe into the zoo.")
flags.DEFINE_bool("rebuild", False, "With --build: start over, replacing what the entry's "
                  "directory holds (e.g. a build of an older recipe, which is not resumed).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from alm.hypernet import zoo  # pylint: disable=import-outside-toplevel
  from alm.hypernet.hypernet import HypernetError  # pylint: disable=import-outside-toplevel
  if FLAGS.rebuild and not FLAGS.build:
    raise app.UsageError("--rebuild starts an entry's build over; pass it with --build=NAME.")
  if not FLAGS.build and not FLAGS.list:
    raise app.UsageError("Pass --list or --build=NAME (names: " + ", ".join(zoo.names()) + ").")
  if FLAGS.build:
    try:
      e = zoo.entry(FLAGS.build)
    except HypernetError as err:
      print(f"error: {err}", file=sys.stderr)
      sys.exit(2)
    print(f"Building {e.name} ({e.note}) into {zoo.entry_dir(e.name)}", flush=True)
    try:
      zoo.build(e.name, rebuild=FLAGS.rebuild)
    except subprocess.CalledProcessError as err:
      print(f"error: the recipe of {e.name} failed (exit {err.returncode}); rerun the same "
            "command to resume from its last checkpoint, or add --rebuild to start over if "
            "the directory holds a build of another recipe (\"written by a different run\" "
            "above).", file=sys.stderr)
      sys.exit(1)
  if FLAGS.list or FLAGS.build:
    print(zoo.describe())


if __name__ == "__main__":
  app.run(main)
