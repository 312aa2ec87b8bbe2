"""A fast, read-only view of a GGUF file: scalar metadata and lazily dequantized tensors.

`gguf.GGUFReader` builds one numpy object per vocabulary string and takes tens
of seconds on Gemma 3's 262k pieces; a model loader needs none of them. This
reader walks the key-value section once, keeps scalars and small arrays,
records only the length of large string arrays (the tokenizer's pieces, which
`alm.tokenization.gguf` reads itself), then memory-maps the tensor data and
dequantizes one tensor at a time with `gguf.quants.dequantize`.

A truncated or corrupt file (an interrupted download) is refused when it is
opened, with a `GGUFFormatError` naming the file and what is wrong, instead of
a `struct.error` or a reshape error deep in the loader: every read of the
header is bounds-checked, and every tensor's data must lie inside the file.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 1024  # arrays longer than this keep only their length


_MAX_DIMS = 4  # GGML_MAX_DIMS
_FIX = "re-download or re-convert it"


class ModelFileError(ValueError):
  """A model weights file is truncated, corrupt or not what its name says; names the file."""


class GGUFFormatError(ModelFileError):
  """The file is not a (supported) GGUF file, or it is truncated or corrupt."""


@dataclasses.dataclass(frozen=True)
class ArrayLength:
  """Placeholder for a large metadata array that was skipped; holds its length."""

  length: int

  def __len__(self) -> int:
    return self.length


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a GGUF file.

  Attributes:
    name: llama.cpp tensor name (e.g. "blk.0.attn_q.weight").
    shape: numpy-order shape (GGUF stores dims innermost first; reversed here).
    ggml_type: the `gguf.GGMLQuantizationType` value.
    offset: absolute byte offset of the data in the file.
  """

  name: str
  shape: tuple[int, ...]
  ggml_type: int
  offset: int


class GGUFFile:
  """Metadata and tensors of a GGUF file.

  Attributes:
    path: the file.
    metadata: key -> value (scalars, strings, lists for small arrays,
      `ArrayLength` for large ones).
    tensors: name -> TensorInfo, in file order.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file {str(self.path)!r} does not exist.")
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise GGUFFormatError(f"{self.path} is not a GGUF file (magic {magic!r}).")
    if size < 24:
      raise GGUFFormatError(f"{self.path}: truncated: {size} bytes, shorter than a GGUF "
                            f"header; {_FIX}.")
    self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
    try:
      self._parse(memoryview(self._buf), size)
    except (struct.error, OverflowError, MemoryError, UnicodeDecodeError) as e:
      raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF header ({e}); "
                            f"{_FIX}.") from None

  def _parse(self, mv, size: int) -> None:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mv, 4)
    if version < 2:
      raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (need >= 2).")
    # Each key-value pair and tensor record takes more than 12 bytes.
    if (n_kv + n_tensors) * 12 > size:
      raise GGUFFormatError(f"{self.path}: corrupt GGUF header ({n_kv} metadata entries and "
                            f"{n_tensors} tensors cannot fit in {size} bytes); {_FIX}.")
    pos = 24
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key, pos = self._str(mv, pos)
      vtype, = struct.unpack_from("<I", mv, pos)
      value, pos = self._value(mv, vtype, pos + 4)
      self.metadata[key] = value
    infos = []
    for _ in range(n_tensors):
      name, pos = self._str(mv, pos)
      n_dims, = struct.unpack_from("<I", mv, pos)
      if n_dims > _MAX_DIMS:
        raise GGUFFormatError(f"{self.path}: corrupt tensor record {name!r} ({n_dims} "
                              f"dimensions); {_FIX}.")
      dims = struct.unpack_from(f"<{n_dims}Q", mv, pos + 4)
      pos += 4 + 8 * n_dims
      ggml_type, offset = struct.unpack_from("<IQ", mv, pos)
      pos += 12
      infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
    align = int(self.metadata.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    self.tensors = {n: TensorInfo(n, s, t, start + o) for n, s, t, o in infos}
    for info in self.tensors.values():
      end = info.offset + self._nbytes(info)
      if end > size:
        raise GGUFFormatError(f"{self.path}: truncated: expected at least {end} bytes (tensor "
                              f"{info.name!r} ends there), file has {size}; {_FIX}.")

  def _nbytes(self, info: TensorInfo) -> int:
    import gguf  # pylint: disable=import-outside-toplevel
    try:
      block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
    except (ValueError, KeyError):
      raise GGUFFormatError(f"{self.path}: tensor {info.name!r} has unknown GGML type "
                            f"{info.ggml_type} (corrupt file, or a newer format); "
                            f"{_FIX}.") from None
    return int(np.prod(info.shape, dtype=np.int64)) // block * type_size

  @staticmethod
  def _str(mv, pos: int) -> tuple[str, int]:
    n, = struct.unpack_from("<Q", mv, pos)
    if pos + 8 + n > len(mv):  # a slice past the end would silently come back short
      raise struct.error(f"a string of {n} bytes at offset {pos} runs past the end of the file")
    return bytes(mv[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

  def _value(self, mv, vtype: int, pos: int) -> tuple[Any, int]:
    if vtype in _SCALAR:
      fmt = _SCALAR[vtype]
      return struct.unpack_from(fmt, mv, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
      return self._str(mv, pos)
    if vtype == _ARRAY:
      etype, n = struct.unpack_from("<IQ", mv, pos)
      pos += 12
      if etype in _SCALAR:
        size = struct.calcsize(_SCALAR[etype]) * n
        value = (list(struct.unpack_from(f"<{n}{_SCALAR[etype][1]}", mv, pos))
                 if n <= _SMALL_ARRAY else ArrayLength(n))
        return value, pos + size
      if etype == _STRING and n > _SMALL_ARRAY:
        for _ in range(n):
          ln, = struct.unpack_from("<Q", mv, pos)
          pos += 8 + ln
        return ArrayLength(n), pos
      items = []
      for _ in range(n):
        v, pos = self._value(mv, etype, pos)
        items.append(v)
      return items, pos
    raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} (corrupt file?).")

  def get(self, key: str, default: Any = None) -> Any:
    """Metadata value of `key`, or `default`."""
    return self.metadata.get(key, default)

  def has_tensor(self, name: str) -> bool:
    return name in self.tensors

  def tensor(self, name: str) -> np.ndarray:
    """Tensor `name` dequantized to float32, numpy-order shape (e.g. [out, in])."""
    import gguf  # pylint: disable=import-outside-toplevel

    info = self.tensors[name]
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(info.shape))
    plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    if qtype in plain:
      dt = np.dtype(plain[qtype])
      raw = self._buf[info.offset:info.offset + n * dt.itemsize]
      return np.frombuffer(raw, dtype=dt).reshape(info.shape).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.BF16:
      raw = self._buf[info.offset:info.offset + n * 2]
      return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(
          info.shape)
    nbytes = n * type_size // block
    raw = np.asarray(self._buf[info.offset:info.offset + nbytes])
    raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(info.shape)
