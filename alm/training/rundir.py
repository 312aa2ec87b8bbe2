"""A run's output directories: held by one run at a time, checked writable up front.

Two runs writing into the same `out_dir` interleave their metrics, and one's
start-up cleanup of "stale" checkpoint temporaries deletes the other's save in
progress. `RunLock` gives a directory to one run at a time: an exclusive
`fcntl.flock` on `<dir>/.lock`, held for the whole run, with the holder's pid,
host, start time and command written inside so that a refused run can name
it. The kernel drops a flock when its process dies (even by SIGKILL), so a
crashed run never blocks the next one; the text it left is overwritten.

Locks are re-entrant within a process (a count per directory): the binary
takes the run's locks before loading anything, and the `Trainer` it builds
takes the same ones again, so library users are protected as well.

flock is advisory, and on some network filesystems it does not reach other
hosts: runs sharing a directory across hosts over NFS are not protected.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"

# Resolved directory -> [fd, count] of the locks this process holds.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


class OutputDirError(RuntimeError):
  """An output directory cannot be used: held by another run, not writable, or disk full."""


class RunDirectoryLockedError(OutputDirError):
  """Another live run holds the directory; the message names it (pid, host, command, since)."""


def describe_os_error(e: OSError) -> str:
  """A short reason for an OS error ("disk full (...)" for ENOSPC / EDQUOT)."""
  reason = e.strerror or str(e) or type(e).__name__
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return f"disk full ({reason})"
  return reason


def find_os_error(e: BaseException | None) -> OSError | None:
  """The OS error behind `e`: an `OSError` in its cause/context chain, or one in its text.

  Libraries wrap OS errors: orbax / tensorstore raise `ValueError("RESOURCE_EXHAUSTED:
  ... No space left on device [os_error_code='28']")`, safetensors "... (os error 28)".
  """
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    m = _OS_CODE.search(str(e))
    if m:
      code = int(m.group(1) or m.group(2))
      return OSError(code, os.strerror(code))
    if "No space left on device" in str(e):
      return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


_OS_CODE = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")


class _DropLibraryErrors(logging.Filter):
  """Drops ERROR records (with their tracebacks) logged by a library's worker threads."""

  def __init__(self, path_part: str):
    super().__init__()
    self.path_part = path_part

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and self.path_part in record.pathname)


@contextlib.contextmanager
def quiet_library_errors(path_part: str = f"{os.sep}orbax{os.sep}") -> Iterator[None]:
  """Hides a library's own ERROR logs inside the block (e.g. orbax's, on a full disk).

  Orbax's save threads log each failure with a full traceback (hundreds of
  lines for one full disk) before the save raises; the caller turns that
  exception into one clear line, so the logs only bury it.
  """
  filt = _DropLibraryErrors(path_part)
  loggers = [logging.getLogger("absl"), logging.getLogger()]
  for lg in loggers:
    lg.addFilter(filt)
  try:
    yield
  finally:
    for lg in loggers:
      lg.removeFilter(filt)


class RunLock:
  """An exclusive, re-entrant (per process) lock on a run directory; see the module docstring.

  Use as a context manager, or `acquire()` / `release()`.

  Args:
    directory: the directory (created).
    what: how the directory is named to users (a flag name, e.g. "out_dir").
    command: the holder's command line, recorded for a refused run to show
      (default: this process's argv).
  """

  def __init__(self, directory: str | os.PathLike, *, what: str = "out_dir",
               command: str | None = None):
    self.directory = Path(directory).expanduser().absolute()
    self.what = what
    self.command = command if command is not None else " ".join(sys.argv)
    self._held = False

  def acquire(self) -> "RunLock":
    """Takes the lock, or raises `RunDirectoryLockedError` at once (never waits)."""
    if self._held:
      return self
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise OutputDirError(f"--{self.what}={self.directory}: cannot create it "
                           f"({describe_os_error(e)}).") from None
    key = self._key = str(self.directory.resolve())
    with _HELD_GUARD:
      if key in _HELD:
        _HELD[key][1] += 1
        self._held = True
        return self
      try:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      except OSError as e:
        raise OutputDirError(f"--{self.what}={self.directory}: cannot write there "
                             f"({describe_os_error(e)}).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise
        raise RunDirectoryLockedError(
            f"--{self.what}={self.directory} is in use by another run: {holder}. Wait for it "
            f"to finish or stop it, or pass another --{self.what}.") from None
      info = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": self.command}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
      _HELD[key] = [fd, 1]
    self._held = True
    return self

  def release(self) -> None:
    """Gives the lock back (the flock is dropped when the last holder in this process releases)."""
    if not self._held:
      return
    self._held = False
    with _HELD_GUARD:
      entry = _HELD.get(self._key)
      if entry is None:
        return
      entry[1] -= 1
      if entry[1] == 0:
        del _HELD[self._key]
        os.close(entry[0])  # drops the flock

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
    return (f"pid {info['pid']} on {info['host']}, since {info['since']}: "
            f"{info['command']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its name yet"


def check_writable(path: str | os.PathLike, flag: str) -> None:
  """Checks, without creating it, that directory `path` can be created and written.

  Probes the directory itself, or its nearest existing ancestor, by creating
  and removing a temporary file there (permission bits alone miss read-only
  mounts and root squashing).

  Args:
    path: the directory a run will write.
    flag: how to name it in the error, e.g. "--out_dir".

  Raises:
    OutputDirError: an ancestor is a file, or the directory cannot be written;
      the message names `flag` and the reason.
  """
  p = Path(path).expanduser().absolute()
  existing = p
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise OutputDirError(f"{flag}={path}: cannot create it, {existing} is a file, not a "
                         "directory.")
  try:
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".alm-write-probe-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise OutputDirError(f"{flag}={path}: cannot write in {existing} "
                         f"({describe_os_error(e)}).") from None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, flag: str) -> Iterator[Path]:
  """Yields a temporary sibling of `path` to fill; renames it into place only when complete.

  A failure (or an interruption) inside the block removes the temporary and
  leaves any previous `path` as it was, so a half-written directory never
  looks valid.

  Args:
    path: the final directory (replaced if it exists).
    flag: how to name it in errors, e.g. "--export_dir".

  Raises:
    OutputDirError: writing failed with an OS error (e.g. disk full); one line
      naming `flag`, the path and the reason.
  """
  final = Path(path).expanduser().absolute()
  tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
  try:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    yield tmp
    old = None
    if final.exists():
      # A directory cannot be os.replace'd onto a non-empty one: move the old aside first.
      old = final.parent / f".old-{final.name}-{os.getpid()}-{time.time_ns()}"
      os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    os_err = find_os_error(e)
    if os_err is not None:
      raise OutputDirError(f"{flag}={path}: could not write it: {describe_os_error(os_err)}; "
                           "nothing half-written was left there.") from None
    raise
